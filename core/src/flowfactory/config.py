"""Run configuration: YAML + `--set a.b=value` overrides, validated by pydantic.

Unknown keys are errors. Each component's `options` are validated by that component's own options
model, and every problem in a file is reported at once with its location.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowfactory.errors import ConfigError, FlowFactoryError, UnknownComponentError
from flowfactory.registry import BuildContext
from flowfactory.types import OptimizerHooks

# Mark a component option that names a local folder or a hub id with `json_schema_extra=PATH_OR_HUB_ID`: a
# relative path is then resolved like the data files (the config's folder first, then the working directory),
# and a value that is neither an existing folder nor shaped like a hub id (owner/name) is a config error.
PATH_OR_HUB_ID: dict[str, Any] = {"flowfactory_path": "local-or-hub"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# The run seed reaches numpy's legacy global seeding (Accelerate's `set_seed`), which takes [0, 2**32 - 1].
SEED_MAX = 2**32 - 1
# An AdamW beta: torch.optim.AdamW takes [0, 1).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Strict(BaseModel):
    # every float key is finite: NaN or inf is a config error at `ff validate`, not a failure after model load
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ComponentConfig(_Strict):
    name: str = Field(description="Registered component name (`ff list` shows them).")
    options: dict[str, Any] = Field(default_factory=dict, description="Validated by the component's own model.")

    @field_validator("options", mode="before")
    @classmethod
    def _null_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class RewardConfig(ComponentConfig):
    weight: float = Field(1.0, description="Weight in the combined reward (any finite number; negative penalises).")
    timeout: float | None = Field(
        None, gt=0, description="Seconds the reward's score may take per call; a call that takes longer stops the "
                                "run (no weights changed, the last complete epoch checkpointed). null: no limit.")


class DataConfig(_Strict):
    train: str = Field("colours", description=(
        "Prompt file (.txt, one per line; .jsonl, one record per line: 'prompt', input 'image'/'images', target "
        "images, metadata) or a built-in set."))
    eval: str | None = Field("colours-eval", description="Held-out prompts, same forms; null disables eval.")
    replay: str | None = Field(
        None, description="Train on another run's stored rollouts (its folder, or its rollouts/ folder; written with "
                          "train.store_rollouts) instead of sampling: epoch e replays stored epoch e. null: sample.")
    replay_rescore: bool = Field(
        False, description="Score the replayed samples with this run's rewards even when the stored scores are of "
                           "the same rewards (they are re-scored anyway when the rewards differ).")


class EMAConfig(_Strict):
    enabled: bool = Field(False, description="Keep an EMA of the trainable weights, used for eval and saved as final/ema.")
    decay: float = Field(0.95, gt=0.0, lt=1.0, description="EMA decay per optimizer step.")


class ParallelConfig(_Strict):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Data parallelism over processes: `ddp` replicates the trained model on every process; "
                           "`fsdp` shards it (FSDP2 `fully_shard` per block of the policy, then the root).")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each block's gathered parameters after its forward (less memory, one more "
                          "all-gather in backward).")
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="fsdp: dtype the sharded parameters are gathered and computed in (mixed precision); "
                          "null: their own dtype.")
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="fsdp: dtype gradients are reduced in across processes.")
    cpu_offload: bool = Field(
        False, description="fsdp: keep parameter shards, gradients and optimizer state in CPU memory between uses.")


class WandbConfig(_Strict):
    enabled: bool = Field(False, description="Also log to Weights & Biases: the run's config, every metrics row and the "
                                             "sample grids (needs `pip install 'flowfactory[wandb]'`).")
    project: str = Field("flowfactory", min_length=1, description="W&B project the run is logged to.")
    entity: str | None = Field(None, description="W&B entity (user or team); null: your default entity.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="`online` (needs `wandb login`), `offline` (logged into the run folder's wandb/, "
                          "uploaded later with `wandb sync`) or `disabled`; null: WANDB_MODE, else online.")
    tags: list[str] = Field(default_factory=list, description="Tags of the W&B run.")


class TrainConfig(_Strict):
    epochs: int = Field(40, ge=1, description="Rollout/update rounds.")
    prompts_per_epoch: int = Field(4, ge=1, description="Distinct prompts sampled per epoch (global).")
    group_size: int = Field(8, ge=2, description="Rollouts per prompt; advantages are relative within a group.")
    micro_batch_size: int = Field(8, ge=1, description="Rollouts per forward/backward, per process.")
    rollout_batch_size: int = Field(16, ge=1, description="Rollouts sampled at once, per process.")
    steps_per_epoch: int = Field(1, ge=1, description="Optimizer steps the epoch's samples are split into.")
    store_rollouts: bool = Field(
        False, description="Save every epoch's rollouts (prompts, trajectories as the algorithm kept them, samples, "
                           "rewards, keys) under <run>/rollouts/ as safetensors, for data.replay in other runs.")
    store_media: Literal["uint8", "float32", "none"] = Field(
        "uint8", description="How stored rollouts keep the decoded samples: 8-bit (like a PNG), exact float32, or "
                             "not at all (a replay then cannot re-score).")
    overlap_rewards: bool = Field(
        True, description="Score each rollout chunk (whole groups) in a worker thread while the next one samples; "
                          "false scores inline. The scores are identical either way.")
    inner_epochs: int = Field(1, ge=1, description="Passes over the epoch's samples.")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (> 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (>= 0).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (> 0).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (> 0); null disables.")
    adv_std: Literal["group", "global", "none"] = Field("group", description="Std used to scale advantages.")
    adv_clip: float | None = Field(5.0, gt=0, description="Advantages clipped to [-c, c] (c > 0); null disables.")
    reward_combine: Literal["sum", "group-normalize", "gdpo"] = Field(
        "sum", description="`sum`: normalise the weighted sum of rewards; `group-normalize`: weighted sum of each "
                           "reward's group-normalised advantage; `gdpo`: that sum, normalised again over the batch.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Accelerate autocast for rollouts and losses; bf16 on GPUs that support it.")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="Exponential moving average of the weights.")
    eval_every: int = Field(10, ge=0, description="Epochs between evals on held-out prompts; 0 disables.")
    eval_prompts: int = Field(4, ge=1, description="Held-out prompts used per eval (the first N of data.eval).")
    sample_every: int = Field(10, ge=0, description="Epochs between PNG sample grids; 0 disables.")
    checkpoint_every: int = Field(10, ge=0, description="Epochs between checkpoints; 0 disables.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    tensorboard: bool = Field(True, description="Log to tensorboard when the package is installed.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging (off by default).")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN or infinite loss or gradient is never applied: `stop` ends the run (the last "
                            "consistent epoch is checkpointed), `skip` skips that optimizer step and goes on.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig,
                                     description="How the trained model is spread over processes (ddp or fsdp).")
    conditioning_cache: str | None = Field(
        None, description="Folder of an on-disk cache of encoded prompts, shared by the processes of a run and by "
                          "later runs of the same model (relative paths: to the config's folder); null: memory only.")


class GuardConfig(_Strict):
    drop: float | None = Field(
        None, gt=0, description="Stop the run when the `eval.best` metric has stayed more than this far from its best "
                                "value (in the metric's units) for `patience` evals in a row while the training reward "
                                "rose above its value at the best eval: the reward is being hacked. null: off.")
    patience: int = Field(2, ge=1, description="Evals in a row the fall must last before the guard stops the run.")
    train_metric: str = Field("reward/mean", description="Training metric that must have risen (mean over the epochs "
                                                         "since the previous eval, against the same at the best eval).")
    max_kl: float | None = Field(
        None, gt=0, description="Stop the run when the estimated KL to the reference policy (`kl/reference`, "
                                "estimated every epoch) exceeds this. null: no bound.")


class EvalConfig(_Strict):
    rewards: list[RewardConfig] | None = Field(
        None, description="Rewards scored at eval only (e.g. a held-out \"gold\" scorer the policy never trains on), "
                          "logged as eval/reward/<name>/mean; null: the training rewards.")
    best: str | None = Field(
        None, description="Eval metric (e.g. eval/reward/gold/mean) whose best value's weights are kept in best/, in "
                          "the same format as final/; null: no best/.")
    best_mode: Literal["max", "min"] = Field("max", description="Whether a higher or a lower `best` metric is better.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Stops on reward hacking (see docs/rewards.md).")
    kl_every: int = Field(
        0, ge=0, description="Epochs between estimates of the KL to the reference policy (`kl/reference`); 0: off, "
                             "unless guard.max_kl is set (then every epoch).")

    @field_validator("rewards")
    @classmethod
    def _unique_rewards(cls, v: list[RewardConfig] | None) -> list[RewardConfig] | None:
        names = [r.name for r in v or []]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward {dup[0]!r} is listed twice; list each reward once")
        if v is not None and not v:
            raise ValueError("list at least one reward, or null to score eval with the training rewards")
        return v

    def kl_period(self) -> int:
        """Epochs between KL estimates (0: never)."""
        return self.kl_every or (1 if self.guard.max_kl is not None else 0)


class RunConfig(_Strict):
    name: str = Field("run", description="Run name; the default output folder is runs/<name>.")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seeds every random draw, keyed by (seed, epoch, sample "
                                                        "index); in [0, 2**32 - 1].")
    output_dir: str | None = Field(None, description="Defaults to runs/<name>; `ff run --output` overrides it.")
    policy: ComponentConfig = Field(description="The model being trained (`ff list policy`).")
    sampler: ComponentConfig = Field(description="How rollouts are sampled (`ff list sampler`).")
    rewards: list[RewardConfig] = Field(min_length=1, description="One or more rewards with weights.")
    optimizer: ComponentConfig = Field(description="The RL algorithm (`ff list optimizer`).")
    data: DataConfig = Field(default_factory=DataConfig, description="Train and eval prompts.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The loop's settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description=(
        "Eval rewards, the best/ checkpoint and the reward-hacking guard (prompts: data.eval; how often: "
        "train.eval_every)."))

    def eval_metrics(self) -> list[str]:
        """The metrics each eval logs."""
        names = [r.name for r in (self.eval.rewards or self.rewards)]
        return ["eval/reward/mean", *(f"eval/reward/{n}/mean" for n in names)]

    @field_validator("rewards")
    @classmethod
    def _unique_rewards(cls, v: list[RewardConfig]) -> list[RewardConfig]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward {dup[0]!r} is listed twice; list each reward once")
        return v


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _model_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the key at `path` inside `model` (list indexes skipped), if any."""
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _first_model(field.annotation)
    return model


def _first_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):  # Optional[M], list[M], dict[str, M]
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _unknown_key_message(model: type[BaseModel] | None, loc: tuple[Any, ...], listing: str) -> str:
    """'unknown key; did you mean ...?' with the closest valid key of the model that holds it."""
    msg = "unknown key; remove it or check its spelling"
    holder = _model_at(model, loc[:-1]) if loc else None
    if holder is not None and isinstance(loc[-1], str):
        close = difflib.get_close_matches(loc[-1], list(holder.model_fields), n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return msg + (f"; {listing}" if listing else "")


def _pydantic_problems(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                       listing: str = "") -> list[tuple[str, str]]:
    """(location, message) for every error; `model` is the validated model (for spelling suggestions) and
    `listing` says where its valid keys are listed."""
    probs = []
    for e in err.errors():
        loc = _loc(tuple(e["loc"]))
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_message(model, tuple(e["loc"]), listing)
        elif e["type"] == "missing":
            msg = "required key is missing"
        probs.append((loc, msg))
    return probs


def parse_value(text: str) -> Any:
    """A `--set` value: parsed as YAML (numbers, booleans, lists), else kept as a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; list items by index (`rewards.0.weight=2`)."""
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(("--set " + item, "expected KEY=VALUE, e.g. --set train.epochs=5"))
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(("--set " + item, "the key has an empty part; write it like train.epochs=5"))
            continue
        node: Any = data
        try:
            for p in parts[:-1]:
                if isinstance(node, list):
                    node = node[int(p)]
                else:
                    node = node.setdefault(p, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = parse_value(value)
            else:
                node[last] = parse_value(value)
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append(("--set " + key, "this path does not exist in the config"))
    if problems:
        raise ConfigError(source, problems)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FlowFactoryError(f"{p}: no such config file; check the path")
    if not p.is_file():
        raise FlowFactoryError(f"{p}: is not a file; give the path of a YAML run config")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FlowFactoryError(f"{p}: cannot be read ({exc}); it must be a readable UTF-8 YAML file") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [("", f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError(str(p), [("", "the top level must be a mapping of keys (name, policy, sampler, ...)")])
    return data


def validate(data: dict[str, Any], source: str = "<config>", registry: Any = None,
             processes: int = 1) -> tuple[RunConfig, dict[str, BaseModel]]:
    """Validate a config dict for a launch over `processes` processes. Returns the RunConfig and each
    component's validated options.

    Keys of the options dict: "policy", "sampler", "optimizer", "rewards[i]". Raises ConfigError with
    every problem found (structure, unknown components, component options).
    """
    if registry is None:
        from flowfactory.plugins import get_registry

        registry = get_registry()
    problems: list[tuple[str, str]] = []
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, model=RunConfig)
        cfg = None

    # Component options are checked even when the top level has problems, so one pass shows all.
    comps: list[tuple[str, str, Any, Any]] = []
    for kind in ("policy", "sampler", "optimizer"):
        node = data.get(kind)
        if isinstance(node, dict) and isinstance(node.get("name"), str):
            comps.append((kind, kind, node["name"], node.get("options") or {}))
    rewards = data.get("rewards")
    if isinstance(rewards, list):
        for i, node in enumerate(rewards):
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                comps.append((f"rewards[{i}]", "reward", node["name"], node.get("options") or {}))
    eval_rewards = data.get("eval", {}).get("rewards") if isinstance(data.get("eval"), dict) else None
    if isinstance(eval_rewards, list):
        for i, node in enumerate(eval_rewards):
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                comps.append((f"eval.rewards[{i}]", "reward", node["name"], node.get("options") or {}))

    options: dict[str, BaseModel] = {}
    for key, kind, name, raw in comps:
        try:
            spec = registry.get(kind, name)
        except UnknownComponentError as exc:
            problems.append((f"{key}.name", str(exc)))
            continue
        if not isinstance(raw, dict):
            continue  # already reported by RunConfig
        try:
            options[key] = spec.validate_options(raw)
        except ValidationError as exc:
            problems += _pydantic_problems(exc, prefix=f"{key}.options", model=spec.options,
                                           listing=f"`ff show {kind} {name}` lists the options")
            continue
        options[key], found = resolve_paths(options[key], config_dir(source), f"{key}.options")
        problems += found

    if cfg is not None and not problems:
        problems += _cross_checks(cfg, source, processes)
    if cfg is not None and not problems:
        problems += input_image_problems(cfg, options["policy"], source)
    if cfg is not None and not problems:
        # Builds the sampler and the algorithm (cheap: no weights) to check they fit together.
        ctx = BuildContext(seed=cfg.seed)
        algorithm = registry.get("optimizer", cfg.optimizer.name).create(options["optimizer"], ctx)
        mismatch = sampler_mismatch(cfg, registry.get("sampler", cfg.sampler.name).create(options["sampler"], ctx),
                                    algorithm)
        if mismatch:
            problems.append(mismatch)
        else:
            problems += dataset_problems(cfg, algorithm, source)
    if problems:
        raise ConfigError(source, problems)
    assert cfg is not None
    return cfg, options


def input_image_problems(cfg: RunConfig, policy_options: BaseModel, source: str) -> list[tuple[str, str]]:
    """For a policy whose options declare `input_images = (least, most)` (a class attribute or property: an
    editing model reads that many input images per prompt), the first record of data.train and of data.eval
    that gives another number of them."""
    need = getattr(policy_options, "input_images", None)
    if need is None:
        return []
    from flowfactory.train.data import load_prompts

    least, most = need
    want = f"exactly {least}" if least == most else f"{least} to {most}"
    probs = []
    for key, spec in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if spec is None:
            continue
        records = load_prompts(spec, config_dir(source), key)
        bad = [(i, r) for i, r in enumerate(records, 1) if not least <= len(r.images) <= most]
        if bad:
            i, r = bad[0]
            more = f" (and {len(bad) - 1} more of its {len(records)})" if len(bad) > 1 else ""
            probs.append((key, f"policy {cfg.policy.name!r} reads {want} input image(s) per prompt, but record {i} "
                               f"({r.text!r}) has {len(r.images)}{more}: give each line of {spec} its input image(s) "
                               f"('image' or 'images' in a .jsonl file; .txt files and built-in sets are text only)"))
    return probs


def dataset_problems(cfg: RunConfig, algorithm: Any, source: str) -> list[tuple[str, str]]:
    """For an algorithm that learns from target images (`requirements.source == "dataset"`): groups that hold
    whole sets of targets, no replay, and every training record with each target image it reads."""
    need = algorithm.requirements  # an OptimizerHooks: sampler_mismatch refused anything else first
    if need.source != "dataset":
        return []
    from flowfactory.train.data import load_prompts

    name, names, probs = cfg.optimizer.name, tuple(need.targets), []
    if not names:
        return [("optimizer.name", f"optimizer {name!r} learns from a dataset but names no target images")]
    if cfg.train.group_size % len(names):
        probs.append(("train.group_size", f"optimizer {name!r} reads {len(names)} target images per record "
                                          f"({', '.join(names)}), one per row of a group: group_size must be a "
                                          f"multiple of {len(names)}, got {cfg.train.group_size}"))
    if cfg.data.replay is not None:
        probs.append(("data.replay", f"optimizer {name!r} learns from the target images of data.train; there are "
                                     f"no rollouts to replay (remove data.replay)"))
    records = load_prompts(cfg.data.train, config_dir(source), "data.train")
    for i, r in enumerate(records, 1):
        missing = [n for n in names if n not in r.targets]
        if missing:
            probs.append(("data.train", f"record {i} ({r.text!r}) has no {' or '.join(repr(m) for m in missing)} "
                                        f"image, which optimizer {name!r} learns from: give every line of "
                                        f"{cfg.data.train} {', '.join(repr(n) for n in names)} image paths"))
            break
    return probs


def sampler_mismatch(cfg: RunConfig, sampler: Any, algorithm: Any) -> tuple[str, str] | None:
    """(location, message) when the algorithm cannot run here: it does not subclass `OptimizerHooks`, its
    `sampler_problem(sampler)` names a problem (the one sampler check), or it needs whole groups in every
    micro-batch and optimizer step that these batch sizes cannot give."""
    if not isinstance(algorithm, OptimizerHooks):
        return ("optimizer.name", f"optimizer {cfg.optimizer.name!r}: its build returned {type(algorithm).__name__}, "
                                  "which does not subclass flowfactory.types.OptimizerHooks; every algorithm must "
                                  "(update its package)")
    problem = algorithm.sampler_problem(sampler, repr(cfg.sampler.name))
    if problem:
        return ("sampler.name", f"optimizer {cfg.optimizer.name!r} {problem}")
    if algorithm.requirements.whole_groups:
        t = cfg.train
        if t.micro_batch_size % t.group_size:
            return ("train.micro_batch_size", f"optimizer {cfg.optimizer.name!r} compares rollouts within a group, "
                                              f"so each micro-batch holds whole groups: use a multiple of "
                                              f"train.group_size = {t.group_size}")
        if (t.prompts_per_epoch * t.group_size) % (t.steps_per_epoch * t.group_size):
            return ("train.steps_per_epoch", f"optimizer {cfg.optimizer.name!r} needs whole groups in every "
                                             f"optimizer step: prompts_per_epoch ({t.prompts_per_epoch}) per process "
                                             f"must split evenly into {t.steps_per_epoch} steps")
    return None


def config_dir(source: str) -> Path | None:
    """The folder of the config file `source`, which relative paths in it are resolved against; None for a
    config that came from no file (`<config>`)."""
    return Path(source).parent if source and not source.startswith("<") else None


def resolve_paths(options: BaseModel, base: Path | None, location: str) -> tuple[BaseModel, list[tuple[str, str]]]:
    """`options` with every field marked PATH_OR_HUB_ID resolved: a relative path that exists under the config's
    folder (`base`), else under the working directory, becomes that absolute folder; a hub-id-shaped value that
    exists in neither stays a hub id; anything else is a problem at its location."""
    updates: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, field in type(options).model_fields.items():
        value = getattr(options, name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if isinstance(value, BaseModel):
            new, found = resolve_paths(value, base, f"{location}.{name}")
            problems += found
            if new is not value:
                updates[name] = new
        elif extra.get("flowfactory_path") == "local-or-hub" and isinstance(value, str) and value:
            path = Path(value).expanduser()
            tried = [path] if path.is_absolute() else ([base / path] if base is not None else []) + [Path.cwd() / path]
            found_at = next((c for c in tried if c.exists()), None)
            if found_at is not None:
                updates[name] = str(found_at.resolve())
            elif path.is_absolute() or not HUB_ID.match(value):
                where = " nor ".join(str(c) for c in tried)
                problems.append((f"{location}.{name}", f"{value!r} is not a folder (looked for {where}) and not a hub "
                                                       f"id (owner/name); give the folder a pipeline was saved to "
                                                       f"(relative paths: to the config's folder) or a hub id"))
    return (options.model_copy(update=updates) if updates else options), problems


def split_problems(cfg: RunConfig, processes: int = 1) -> list[tuple[str, str]]:
    """Why the epoch cannot be split over `processes` processes and `train.steps_per_epoch` optimizer steps.

    Each process takes whole groups (prompts_per_epoch / processes of them), so a groupwise reward always sees
    every rollout of a prompt and the rollouts of a prompt stay on one process; each process's rows then split
    evenly into the optimizer steps."""
    t = cfg.train
    if t.prompts_per_epoch % processes:
        return [("train.prompts_per_epoch",
                 f"{t.prompts_per_epoch} prompts (groups) per epoch do not split evenly over {processes} processes: "
                 f"each process takes whole groups. Use a multiple of {processes}, or launch a divisor of "
                 f"{t.prompts_per_epoch} processes")]
    local = t.prompts_per_epoch // processes * t.group_size
    if local % t.steps_per_epoch:
        per = f"{processes} processes, so {local} per process" if processes > 1 else "one process"
        return [("train.steps_per_epoch",
                 f"must divide the rollouts each process trains on: prompts_per_epoch * group_size = "
                 f"{t.prompts_per_epoch * t.group_size} over {per}")]
    return []


def _eval_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """eval.best names a metric the eval logs, and what needs evals (best/, the guard) has them."""
    e, probs = cfg.eval, []
    evals = cfg.data.eval is not None and cfg.train.eval_every > 0
    if e.best is not None:
        valid = cfg.eval_metrics()
        if e.best not in valid:
            close = difflib.get_close_matches(e.best, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            probs.append(("eval.best", f"{e.best!r} is not an eval metric{hint}; evals log {', '.join(valid)}"))
        elif not evals:
            probs.append(("eval.best", "needs evals: set data.eval to a prompt file and train.eval_every > 0"))
    if e.guard.drop is not None and e.best is None:
        probs.append(("eval.guard.drop", "the guard watches the eval.best metric: set eval.best (e.g. "
                                         "eval/reward/<gold reward>/mean)"))
    if e.guard.drop is not None and e.guard.train_metric != "reward/mean" and not (
            e.guard.train_metric.startswith("reward/") and e.guard.train_metric.endswith("/mean")
            and e.guard.train_metric[len("reward/"):-len("/mean")] in {r.name for r in cfg.rewards}):
        valid = ["reward/mean", *(f"reward/{r.name}/mean" for r in cfg.rewards)]
        probs.append(("eval.guard.train_metric", f"{e.guard.train_metric!r} is not a training reward metric; use one "
                                                 f"of {', '.join(valid)}"))
    return probs


def _cross_checks(cfg: RunConfig, source: str, processes: int = 1) -> list[tuple[str, str]]:
    from flowfactory.train.data import load_prompts

    t = cfg.train
    probs = []
    base = config_dir(source)
    for key, spec in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if spec is None:
            continue
        try:
            load_prompts(spec, base, key)
        except FlowFactoryError as exc:
            probs.append((key, str(exc).removeprefix(f"{key}: ")))
    probs += split_problems(cfg, processes)
    if cfg.data.replay is not None:
        from flowfactory.train.store import find_store

        replay = Path(cfg.data.replay)
        try:
            find_store(replay if replay.is_absolute() or base is None else base / replay)
        except FlowFactoryError as exc:
            probs.append(("data.replay", str(exc).removeprefix("data.replay: ")))
    probs += _eval_problems(cfg)
    if t.wandb.enabled and importlib.util.find_spec("wandb") is None:
        probs.append(("train.wandb.enabled", "wandb is not installed; `pip install 'flowfactory[wandb]'`, or set "
                                             "train.wandb.enabled: false"))
    if t.parallel.strategy == "fsdp" and t.mixed_precision == "fp16":
        probs.append(("train.mixed_precision", "fp16 needs a gradient scaler, which FSDP2 sharding does not use; "
                                               "use bf16, or train.parallel.param_dtype: bfloat16"))
    return probs


def load(path: str | Path, overrides: list[str] | None = None, registry: Any = None,
         processes: int = 1) -> tuple[RunConfig, dict[str, BaseModel]]:
    """Load, override and validate a YAML run config (for a launch over `processes` processes)."""
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, str(path))
    return validate(data, str(path), registry, processes)
