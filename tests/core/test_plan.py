"""`flowfactory.plan`: the per-process memory accounting, checked against the bytes of real tensors of the toy
policy (parameters, gradients, AdamW state after a step, a rollout, conditioning), and its rules (FSDP shares,
DDP buckets, EMA, what the algorithm keeps)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from flowfactory import config as ff_config
from flowfactory.errors import FlowFactoryError, PluginError
from flowfactory.plan import MemoryPlan, human_bytes, plan_memory
from flowfactory.plugins import load
from flowfactory.registry import BuildContext, Registry
from flowfactory.seeding import randn_per_sample
from flowfactory.testing import plugin as toy_plugin


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load(entry_points=False, extra_plugins=[(toy_plugin, "flowfactory-testing", "0")]).registry


def toy_config(registry: Registry, **train: Any) -> tuple[Any, dict[str, Any]]:
    data = {"name": "plan", "policy": {"name": "toy", "options": {"size": 8, "hidden": 16}},
            "sampler": {"name": "flow-sde", "options": {"steps": 4}},
            "rewards": [{"name": "brightness"}], "optimizer": {"name": "toy-grpo"},
            "data": {"train": "colours", "eval": None},
            "train": {"prompts_per_epoch": 2, "group_size": 4} | train}
    return ff_config.validate(data, "<test>", registry)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture(scope="module", autouse=True)
def toy_grpo(registry: Registry) -> None:
    """A stochastic algorithm keeping every step (GRPO's requirements) without a plugin package."""
    from flowfactory.types import OptimizerHooks, Requirements

    class Algo(OptimizerHooks):
        requirements = Requirements(keep="steps", stochastic=True, reference=True)

    if "toy-grpo" not in registry.names("optimizer"):
        registry.registrar("optimizer", "tests", "0")("toy-grpo", lambda o, c: Algo())


def test_toy_plan_equals_the_bytes_of_real_tensors(registry: Registry) -> None:
    cfg, options = toy_config(registry)
    plan = plan_memory(cfg, options, registry)
    policy = registry.get("policy", "toy").create(options["policy"], BuildContext(seed=0))
    params = policy.trainable_parameters()
    assert plan.row("trainable parameters").bytes == tensor_bytes(*params) == 4 * 3779

    # gradients from a real backward, AdamW state after a real step
    prompts = ["red", "blue"] * 4
    cond = policy.encode(prompts)
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    x = policy.noise(gens)
    policy.velocity(x, torch.full((8,), 0.5), cond).pow(2).mean().backward()
    assert plan.row("gradients").bytes == tensor_bytes(*(p.grad for p in params))
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    state = [t for s in opt.state.values() for t in s.values()]
    assert plan.row("optimizer state (AdamW)").bytes == tensor_bytes(*state)

    # the frozen copy and the character table
    assert plan.row("reference copy").bytes == tensor_bytes(*policy._frozen.parameters())
    assert plan.row("text encoders").bytes == tensor_bytes(policy.char_table)

    # a real rollout of this process's 8 rollouts, keeping every step, and its decoded images
    sampler = registry.get("sampler", "flow-sde").create(options["sampler"], BuildContext(seed=0))
    traj = sampler.rollout(policy, cond, x.detach(), gens, keep="steps")
    assert plan.row("rollout buffer").bytes == tensor_bytes(traj.latents, traj.final, traj.log_probs, traj.sigmas,
                                                            traj.stochastic)
    assert plan.row("decoded samples").bytes == tensor_bytes(policy.decode(traj.final))
    assert plan.row("epoch conditioning").bytes == tensor_bytes(*cond.values())
    per_prompt = tensor_bytes(*policy.encode(["one"]).values())
    from flowfactory.train.data import load_prompts

    assert plan.row("conditioning cache").bytes == len(set(load_prompts("colours", None, "data.train"))) * per_prompt
    assert plan.device_total == sum(r.bytes for r in plan.rows)


def test_fsdp_shards_the_trained_model_and_ddp_adds_buckets(registry: Registry) -> None:
    one = plan_memory(*toy_config(registry), registry)
    # 4 prompts: each of the 4 processes takes one whole group
    fsdp = plan_memory(*toy_config(registry, prompts_per_epoch=4, parallel={"strategy": "fsdp"}), registry, processes=4)
    ddp = plan_memory(*toy_config(registry, prompts_per_epoch=4), registry, processes=4)
    trainable = one.row("trainable parameters").bytes
    assert fsdp.row("trainable parameters").bytes == math.ceil(trainable / 4)
    assert fsdp.row("gradients").bytes == math.ceil(trainable / 4)
    assert fsdp.row("optimizer state (AdamW)").bytes == 2 * math.ceil(trainable / 4) + 4 * 8  # 8 tensors' steps
    assert ddp.row("trainable parameters").bytes == trainable  # replicated
    assert ddp.row("ddp gradient buckets").bytes == trainable
    with pytest.raises(KeyError):
        fsdp.row("ddp gradient buckets")
    # the rollouts split over processes either way; the frozen copy is sharded like the trained module
    assert ddp.row("rollout buffer").bytes == fsdp.row("rollout buffer").bytes
    assert fsdp.row("reference copy").bytes == math.ceil(one.row("reference copy").bytes / 4)
    assert ddp.row("reference copy").bytes == one.row("reference copy").bytes


def test_ema_offload_and_gathered_weights(registry: Registry) -> None:
    base = plan_memory(*toy_config(registry), registry)
    ema = plan_memory(*toy_config(registry, ema={"enabled": True}), registry)
    assert ema.row("EMA shadow").bytes == 4 * 3779
    assert ema.device_total == base.device_total + 4 * 3779
    off = plan_memory(*toy_config(registry, parallel={"strategy": "fsdp", "cpu_offload": True,
                                                      "reshard_after_forward": False, "param_dtype": "bfloat16"}),
                      registry, processes=2)
    assert off.row("optimizer state (AdamW)").host and off.host_total > 0
    assert off.row("gathered weights (fsdp)").bytes == 2 * 3779  # the whole net in bfloat16


def test_uneven_split_and_unplannable_policy_are_clear_errors(registry: Registry, plugin_state: Any) -> None:
    with pytest.raises(FlowFactoryError, match=r"2 prompts \(groups\) per epoch do not split evenly over 3 processes"):
        plan_memory(*toy_config(registry), registry, processes=3)
    reg = plugin_state.registry
    data = {"policy": {"name": "tiny-policy"}, "sampler": {"name": "ode", "options": {"steps": 2}},
            "rewards": [{"name": "brightness"}], "optimizer": {"name": "fake-opt"}, "data": {"eval": None}}
    cfg, options = ff_config.validate(data, "<test>", reg)
    with pytest.raises(FlowFactoryError, match=r"policy 'tiny-policy' \(test-plugins 1.0\) cannot be planned.*plan="):
        plan_memory(cfg, options, reg)


def test_plan_is_for_policies_only() -> None:
    register = Registry().registrar("reward", "pkg", "1")
    with pytest.raises(PluginError, match="applies to policies only"):
        register("r", lambda o, c: None, plan=lambda o, c: None)


def test_json_record_and_units(registry: Registry) -> None:
    plan: MemoryPlan = plan_memory(*toy_config(registry), registry)
    record = plan.to_dict()
    assert record["activations"] == "not estimated"
    assert record["device_total"] == plan.device_total
    assert [p["name"] for p in record["parts"]] == ["net", "net (reference copy)", "char_table"]
    assert (human_bytes(512), human_bytes(3 * 2**20), human_bytes(int(22.17 * 2**30))) == (
        "512 B", "3.00 MiB", "22.17 GiB")


def test_randn_latents_are_float32() -> None:
    """The toy plan says float32 latents: what `randn_per_sample` draws by default."""
    assert randn_per_sample((2,), [torch.Generator()]).dtype == torch.float32
