"""Every numeric key is range-checked at `ff validate`: what validation accepts, the run accepts too.

A walk over the run config's models and every built-in and first-party component's options model checks that
each float rejects NaN and +-inf and that each number has bounds (or is listed below as free with a reason);
value tests pin the specific ranges to what their consumers (AdamW, the RNGs, the losses) take.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import annotated_types
import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError

from flowfactory import config as ff_config
from flowfactory.errors import ConfigError
from flowfactory.plugins import load
from flowfactory.seeding import sample_seed
from flowfactory.testing import plugin as toy_plugin

FIRST_PARTY = {("policy", "flux"), ("policy", "sd3"), ("policy", "qwen-image"), ("policy", "wan"),
               ("policy", "flux2"), ("policy", "flux2-klein"),
               ("policy", "toy"), ("optimizer", "grpo"), ("optimizer", "nft"), ("optimizer", "awm"),
               ("sampler", "ode"), ("sampler", "flow-sde"), ("sampler", "dance-sde"), ("sampler", "cps"),
               ("reward", "brightness"), ("reward", "colour-match"), ("reward", "jpeg-compressibility"),
               ("reward", "jpeg-incompressibility")}

# numbers that may take any finite value (or whose range a model validator checks), and why
FREE = {
    "RewardConfig.weight": "any finite weight; a negative one penalises",
    "NFTOptions.logit_mean": "the mean of a normal",
    "AWMOptions.logit_mean": "the mean of a normal",
    "FlowSDEOptions.sde_window_range": "checked against steps by the model validator",
    "DanceSDEOptions.sde_window_range": "checked against steps by the model validator",
    "CPSOptions.sde_window_range": "checked against steps by the model validator",
}

BOUNDS = (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)


@pytest.fixture(scope="module")
def registry():
    return load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0")], strict=True).registry


def _base(kind: str, name: str) -> dict[str, Any]:
    """The smallest valid options of a component."""
    return {"preset": "tiny"} if kind == "policy" and name != "toy" else {}


def _contains(tp: Any, kinds: tuple[type, ...]) -> bool:
    return tp in kinds or any(_contains(a, kinds) for a in typing.get_args(tp))


def _numbers(model: type[BaseModel], path: tuple[Any, ...] = ()) -> list[tuple[type[BaseModel], str, tuple[Any, ...]]]:
    """(holder model, field name, path) of every numeric field, nested models included; a tuple of numbers
    gives one path per item."""
    out = []
    for name, field in model.model_fields.items():
        sub = ff_config._first_model(field.annotation)
        if sub is not None:
            out += _numbers(sub, (*path, name))
        elif _contains(field.annotation, (int, float)):
            out.append((model, name, (*path, name)))
    return out


def _floats(model: type[BaseModel]) -> list[tuple[Any, ...]]:
    """Paths of every float (a tuple's float items by index)."""
    paths = []
    for holder, name, path in _numbers(model):
        ann = holder.model_fields[name].annotation
        items = [a for a in typing.get_args(ann) if typing.get_origin(a) is tuple] or [ann]
        if typing.get_origin(items[0]) is tuple:
            paths += [(*path, i) for i, a in enumerate(typing.get_args(items[0])) if _contains(a, (float,))]
        elif _contains(ann, (float,)):
            paths.append(path)
    return paths


def _models(registry) -> list[tuple[str, type[BaseModel], dict[str, Any]]]:
    """(id, model, valid raw data) of the run config and of every first-party component's options."""
    found = {(s.kind, s.name) for s in registry.specs()}
    assert FIRST_PARTY <= found, f"first-party components not installed: {sorted(FIRST_PARTY - found)}"
    out = [("RunConfig", ff_config.RunConfig, _run_data())]
    out += [(f"{s.kind}:{s.name}", s.options, _base(s.kind, s.name)) for s in registry.specs()
            if (s.kind, s.name) in FIRST_PARTY]
    return out


def _run_data() -> dict[str, Any]:
    return {"policy": {"name": "toy"}, "sampler": {"name": "flow-sde"}, "optimizer": {"name": "grpo"},
            "rewards": [{"name": "brightness", "weight": 1.0, "timeout": 5.0}],
            "train": {"max_grad_norm": 1.0, "adv_clip": 5.0, "ema": {"decay": 0.9}}}


def _with(data: dict[str, Any], model: type[BaseModel], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """`data` with the value at `path` replaced (list items of the reward lists through index 0; missing nested
    models created empty; a tuple item set inside the field's default)."""
    import copy

    data = copy.deepcopy(data)
    node, holder = data, model
    for part in path[:-1]:
        if isinstance(part, int):  # inside a tuple
            break
        field = holder.model_fields[part]
        sub = ff_config._first_model(field.annotation)
        if sub is None:  # a tuple field: set the item below
            items = list(node.get(part, field.default))
            items[path[-1]] = value
            node[part] = items
            return data
        child = node.get(part)
        if child is None and typing.get_origin(typing.get_args(field.annotation)[0] if typing.get_args(
                field.annotation) else field.annotation) is list:  # an optional list of models (eval.rewards)
            child = node[part] = [{"name": "brightness"}]
        if isinstance(child, list):
            child = child[0]
        elif not isinstance(child, dict):
            child = node[part] = {}
        node, holder = child, sub
    node[path[-1]] = value
    return data


def _loc(path: tuple[Any, ...], model: type[BaseModel]) -> tuple[Any, ...]:
    """pydantic's error location of `path` (the reward lists, rewards and eval.rewards: index 0 inserted)."""
    if model is ff_config.RunConfig and "rewards" in path:
        i = path.index("rewards") + 1
        return (*path[:i], 0, *path[i:])
    return path


def test_the_walk_finds_the_floats_it_must(registry) -> None:
    floats = {m_id: _floats(m) for m_id, m, _ in _models(registry)}
    run = floats["RunConfig"]
    for path in [("rewards", "weight"), ("rewards", "timeout"), ("train", "lr"), ("train", "betas", 0),
                 ("train", "betas", 1), ("train", "ema", "decay"), ("train", "max_grad_norm")]:
        assert path in run
    assert ("lora", "alpha") in floats["policy:flux"] and ("lora", "dropout") in floats["policy:wan"]
    assert ("guidance_scale_2",) in floats["policy:wan"] and ("ema_decay",) in floats["optimizer:awm"]
    assert sum(len(v) for v in floats.values()) >= 56  # 56 today; a drop means the walk misses some


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "inf"], ids=repr)
def test_every_float_key_rejects_nan_and_inf(registry, bad) -> None:
    checked = 0
    for m_id, model, base in _models(registry):
        model.model_validate(base)  # the base is valid
        for path in _floats(model):
            with pytest.raises(ValidationError) as exc:
                model.model_validate(_with(base, model, path, bad))
            errors = {tuple(e["loc"]): e["msg"] for e in exc.value.errors()}
            assert errors.get(_loc(path, model)) == "Input should be a finite number", (m_id, path, errors)
            checked += 1
    assert checked >= 56


def test_every_numeric_key_has_a_range(registry) -> None:
    unbounded = []
    for _, model, _ in _models(registry):
        for holder, name, _ in _numbers(model):
            key = f"{holder.__name__}.{name}"
            field = holder.model_fields[name]
            bounded = any(isinstance(m, BOUNDS) for m in field.metadata)
            tuples = [a for a in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(a) is tuple]
            if tuples:  # every item bounded (Annotated items)
                items = typing.get_args(tuples[0])
                bounded = all(any(isinstance(m, BOUNDS) for inner in typing.get_args(a)[1:]
                                  for m in getattr(inner, "metadata", [])) for a in items)
            if not bounded and key not in FREE:
                unbounded.append(key)
    assert unbounded == [], "numbers without a range: bound them (ge/gt/le/lt) or list them in FREE with a reason"


# --- the ranges, value by value -----------------------------------------------------------------------------

def _problems(data: dict[str, Any], registry) -> dict[str, str]:
    with pytest.raises(ConfigError) as exc:
        ff_config.validate(data, "<test>", registry)
    return dict(exc.value.problems)


def _valid(data: dict[str, Any], registry):
    return ff_config.validate(data, "<test>", registry)


def _train(**train: Any) -> dict[str, Any]:
    data = _run_data()
    data["train"].update(train)
    return data


def test_betas_are_in_zero_one_as_adamw_takes_them(registry) -> None:
    assert _problems(_train(betas=[1.0, 0.999]), registry) == {"train.betas[0]": "Input should be less than 1"}
    assert _problems(_train(betas=[0.9, -0.1]), registry) == {
        "train.betas[1]": "Input should be greater than or equal to 0"}
    assert _problems(_train(betas=[0.9, math.nan]), registry) == {"train.betas[1]": "Input should be a finite number"}
    cfg, _ = _valid(_train(betas=[0.0, 0.999999]), registry)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr, betas=cfg.train.betas)
    with pytest.raises(ValueError):  # what validation refuses, AdamW refuses too
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], betas=(1.0, 0.999))


def test_seed_is_what_every_rng_takes(registry) -> None:
    from accelerate.utils import set_seed

    assert _problems({**_run_data(), "seed": -1}, registry) == {"seed": "Input should be greater than or equal to 0"}
    assert _problems({**_run_data(), "seed": 2**32}, registry) == {
        "seed": "Input should be less than or equal to 4294967295"}
    for seed in (0, 2**32 - 1):  # the extremes reach every consumer of the run seed
        cfg, _ = _valid({**_run_data(), "seed": seed}, registry)
        set_seed(cfg.seed)
        np.random.default_rng([cfg.seed, 3, 1]).permutation(4)
        torch.Generator().manual_seed(sample_seed(cfg.seed, 3, 7))
    with pytest.raises(ValueError):  # the bound is numpy's: one past it fails in set_seed
        set_seed(2**32)


def test_nft_seed_is_non_negative(registry) -> None:
    data = {**_run_data(), "sampler": {"name": "ode"}, "optimizer": {"name": "nft", "options": {"seed": -1}}}
    assert _problems(data, registry) == {"optimizer.options.seed": "Input should be greater than or equal to 0"}
    data["optimizer"]["options"]["seed"] = 2**40
    _, options = _valid(data, registry)
    sample_seed(0, options["optimizer"].seed, 1, 2)  # what the loss feeds it to


@pytest.mark.parametrize(("train", "where", "message"), [
    ({"lr": 0}, "train.lr", "Input should be greater than 0"),
    ({"lr": -1e-4}, "train.lr", "Input should be greater than 0"),
    ({"lr": math.inf}, "train.lr", "Input should be a finite number"),
    ({"lr": "nan"}, "train.lr", "Input should be a finite number"),
    ({"weight_decay": -0.1}, "train.weight_decay", "Input should be greater than or equal to 0"),
    ({"adam_eps": 0}, "train.adam_eps", "Input should be greater than 0"),
    ({"max_grad_norm": 0}, "train.max_grad_norm", "Input should be greater than 0"),
    ({"max_grad_norm": -1.0}, "train.max_grad_norm", "Input should be greater than 0"),
    ({"adv_clip": 0}, "train.adv_clip", "Input should be greater than 0"),
    ({"ema": {"decay": 1.0}}, "train.ema.decay", "Input should be less than 1"),
    ({"ema": {"decay": 0.0}}, "train.ema.decay", "Input should be greater than 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_train_numbers(registry, train, where, message) -> None:
    assert _problems(_train(**train), registry) == {where: message}


def test_null_disables_clipping_and_the_defaults_are_valid(registry) -> None:
    cfg, _ = _valid(_train(max_grad_norm=None, adv_clip=None), registry)
    assert (cfg.train.max_grad_norm, cfg.train.adv_clip) == (None, None)
    cfg, _ = _valid({k: v for k, v in _run_data().items() if k != "train"}, registry)
    assert (cfg.train.lr, cfg.train.betas, cfg.seed, cfg.rewards[0].weight) == (3e-4, (0.9, 0.999), 0, 1.0)


def test_reward_weight_is_any_finite_number(registry) -> None:
    for weight in (-2.0, 0.0, 1e6):
        cfg, _ = _valid({**_run_data(), "rewards": [{"name": "brightness", "weight": weight}]}, registry)
        assert cfg.rewards[0].weight == weight
    for weight in (math.nan, math.inf, -math.inf):
        assert _problems({**_run_data(), "rewards": [{"name": "brightness", "weight": weight}]}, registry) == {
            "rewards[0].weight": "Input should be a finite number"}


def test_reward_timeout_is_positive_seconds_or_null(registry) -> None:
    cfg, _ = _valid({**_run_data(), "rewards": [{"name": "brightness"}]}, registry)
    assert cfg.rewards[0].timeout is None
    cfg, _ = _valid({**_run_data(), "rewards": [{"name": "brightness", "timeout": 0.5}]}, registry)
    assert cfg.rewards[0].timeout == 0.5
    for bad, msg in ((0, "Input should be greater than 0"), (-1, "Input should be greater than 0"),
                     (math.inf, "Input should be a finite number")):
        assert _problems({**_run_data(), "rewards": [{"name": "brightness", "timeout": bad}]}, registry) == {
            "rewards[0].timeout": msg}


@pytest.mark.parametrize(("section", "component", "where", "message"), [
    ("sampler", {"name": "flow-sde", "options": {"noise_level": 0}}, "sampler.options.noise_level",
     "Input should be greater than 0"),
    ("sampler", {"name": "cps", "options": {"noise_level": 1.5}}, "sampler.options.noise_level",
     "Input should be less than or equal to 1"),
    ("sampler", {"name": "dance-sde", "options": {"eta": -0.3}}, "sampler.options.eta",
     "Input should be greater than 0"),
    ("sampler", {"name": "flow-sde", "options": {"noise_level": math.nan}}, "sampler.options.noise_level",
     "Input should be a finite number"),
    ("optimizer", {"name": "grpo", "options": {"clip_range": 0}}, "optimizer.options.clip_range",
     "Input should be greater than 0"),
    ("optimizer", {"name": "grpo", "options": {"kl_beta": -0.1}}, "optimizer.options.kl_beta",
     "Input should be greater than or equal to 0"),
    ("optimizer", {"name": "grpo", "options": {"adv_clip": math.inf}}, "optimizer.options.adv_clip",
     "Input should be a finite number"),
    ("policy", {"name": "flux", "options": {"preset": "tiny", "lora": {"dropout": 1.0}}},
     "policy.options.lora.dropout", "Input should be less than 1"),
    ("policy", {"name": "sd3", "options": {"preset": "tiny", "lora": {"alpha": 0}}},
     "policy.options.lora.alpha", "Input should be greater than 0"),
    ("policy", {"name": "qwen-image", "options": {"preset": "tiny", "lora": {"rank": 0}}},
     "policy.options.lora.rank", "Input should be greater than or equal to 1"),
    ("policy", {"name": "wan", "options": {"preset": "tiny", "boundary_ratio": 1.0}},
     "policy.options.boundary_ratio", "Input should be less than 1"),
    ("policy", {"name": "flux", "options": {"preset": "tiny", "guidance_scale": -math.inf}},
     "policy.options.guidance_scale", "Input should be a finite number"),
    ("rewards", [{"name": "colour-match", "options": {"tolerance": 0}}], "rewards[0].options.tolerance",
     "Input should be greater than 0"),
], ids=lambda v: v if isinstance(v, str) and "." in v else "")
def test_component_numbers(registry, section, component, where, message) -> None:
    assert _problems({**_run_data(), section: component}, registry) == {where: message}


@pytest.mark.parametrize(("optimizer", "where", "message"), [
    ({"name": "awm", "options": {"ema_decay": 1.0}}, "optimizer.options.ema_decay", "Input should be less than 1"),
    ({"name": "awm", "options": {"timestep_fraction": 0}}, "optimizer.options.timestep_fraction",
     "Input should be greater than 0"),
    ({"name": "awm", "options": {"clip_range": -1}}, "optimizer.options.clip_range", "Input should be greater than 0"),
    ({"name": "awm", "options": {"logit_mean": math.nan}}, "optimizer.options.logit_mean",
     "Input should be a finite number"),
    ({"name": "nft", "options": {"old_decay_max": 1.0}}, "optimizer.options.old_decay_max",
     "Input should be less than 1"),
    ({"name": "nft", "options": {"old_decay_rate": -0.001}}, "optimizer.options.old_decay_rate",
     "Input should be greater than or equal to 0"),
    ({"name": "nft", "options": {"time_shift": math.inf}}, "optimizer.options.time_shift",
     "Input should be a finite number"),
], ids=lambda v: v if isinstance(v, str) and "." in v else "")
def test_ode_algorithm_numbers(registry, optimizer, where, message) -> None:
    data = {**_run_data(), "sampler": {"name": "ode"}, "optimizer": optimizer}
    assert _problems(data, registry) == {where: message}


def test_every_problem_is_reported_at_once_with_its_location(registry) -> None:
    data = _train(lr=math.nan, betas=[0.9, 1.5])
    data["seed"] = -3
    data["rewards"] = [{"name": "brightness", "weight": math.inf, "timeout": 0}]
    data["policy"] = {"name": "toy", "options": {"shift": math.nan}}
    assert _problems(data, registry) == {
        "seed": "Input should be greater than or equal to 0",
        "rewards[0].weight": "Input should be a finite number",
        "rewards[0].timeout": "Input should be greater than 0",
        "train.lr": "Input should be a finite number",
        "train.betas[1]": "Input should be less than 1",
        "policy.options.shift": "Input should be a finite number",
    }


def test_fsdp_with_fp16_is_a_config_error(registry) -> None:
    data = _train(mixed_precision="fp16", parallel={"strategy": "fsdp"})
    problems = _problems(data, registry)
    assert list(problems) == ["train.mixed_precision"]
    assert problems["train.mixed_precision"].startswith("fp16 needs a gradient scaler")
    assert "use bf16" in problems["train.mixed_precision"]
    _valid(_train(mixed_precision="bf16", parallel={"strategy": "fsdp"}), registry)
    _valid(_train(mixed_precision="fp16"), registry)  # ddp scales fp16 gradients


def test_micro_and_rollout_batches_larger_than_a_step_are_allowed(registry) -> None:
    """The loop takes a micro-batch or rollout chunk larger than what a process has (one chunk then)."""
    cfg, _ = _valid(_train(micro_batch_size=64, rollout_batch_size=64, prompts_per_epoch=2, group_size=2,
                           steps_per_epoch=2), registry)
    assert cfg.train.micro_batch_size == 64
