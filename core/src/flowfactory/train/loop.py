"""THE training loop. It reads top to bottom, one epoch at a time:

prompts (K copies each = a group) -> cached conditioning -> rollout (no grad) -> decode -> rewards ->
advantages -> inner epochs x optimizer steps x micro-batches x the algorithm's units: loss, backward ->
clip, step -> EMA -> the algorithm's epoch end -> metrics, sample grid -> eval on held-out prompts ->
checkpoint.

Every random draw is seeded from (seed, epoch, global sample index), never from a running RNG, so a run
is reproducible, a resumed run equals an uninterrupted one, and a sample draws the same noise whichever
process rolls it out. Algorithms get the same keys (`TrainBatch.sample_keys`) for their own draws. The
core never looks inside a policy, sampler, reward or algorithm.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowfactory.config import RunConfig, sampler_mismatch
from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.seeding import generators, sample_seed  # noqa: F401  (sample_seed: old import path)
from flowfactory.train import checkpoint as ckpt
from flowfactory.train.advantages import compute_advantages
from flowfactory.train.conditioning import ConditioningCache
from flowfactory.train.data import load_prompts
from flowfactory.train.ema import EMA
from flowfactory.train.logging import MetricsLog, save_grid
from flowfactory.train.rewards import RewardSet
from flowfactory.types import Conditioning, OptimizerHooks, Samples, TrainBatch, Trajectory, select_rows


@dataclass
class RunSummary:
    output_dir: str
    epochs: int
    reward_first: float
    reward_last: float
    final_dir: str
    metrics_path: str
    samples_dir: str
    wall_seconds: float
    resumed_from: int | None


def cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals)

    return Trajectory(sigmas=first.sigmas, stochastic=first.stochastic, final=cat("final"),
                      latents=cat("latents"), log_probs=cat("log_probs"))


def _config_dump(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json())


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ (train.epochs may grow on resume)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}.{k}" if prefix else k
        if key in ("train.epochs", "output_dir"):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, key)
        elif a != b:
            out.append(key)
    return out


def run(cfg: RunConfig, options: dict[str, Any], *, output_dir: str | None = None, resume: bool = False,
        source: str = "<config>", show_progress: bool = True, registry: Any = None) -> RunSummary:
    """Train; `registry` defaults to the process-wide one (`flowfactory.plugins.get_registry()`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from flowfactory.plugins import get_registry
    from flowfactory.train.progress import Progress

    t_start = time.perf_counter()
    t = cfg.train
    out = Path(output_dir or cfg.output_dir or f"runs/{cfg.name}")
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if accelerator.distributed_type.value == "FSDP":
        # Checkpoints and final/ save each trainable tensor as this process holds it; with FSDP that is a
        # shard. Refuse rather than write partial weights.
        raise FlowFactoryError(
            "this Accelerate launch uses FSDP, which flowfactory's checkpointing does not gather yet; launch "
            "with DDP (`accelerate launch --multi_gpu ...` without an FSDP config) and use LoRA or gradient "
            "checkpointing (policy options) to fit memory.")
    n_global = t.prompts_per_epoch * t.group_size
    if n_global % (world * t.steps_per_epoch):
        raise FlowFactoryError(
            f"{source}: train.prompts_per_epoch * train.group_size = {n_global} rollouts per epoch must split "
            f"evenly over {world} processes x {t.steps_per_epoch} steps_per_epoch; change one of them.")
    n_local = n_global // world

    # --- output folder: never overwrite a run unless asked to resume it ---------------------------------
    resume_from = ckpt.latest(out / "checkpoints") if resume else None
    if not resume and (out / "metrics.jsonl").exists():
        raise FlowFactoryError(
            f"{out} already holds a run. Continue it with `ff run {source} --resume`, or write elsewhere "
            f"with `--output DIR`.")
    if resume and resume_from is None and (out / "metrics.jsonl").exists():
        raise FlowFactoryError(f"{out} holds no complete checkpoint to resume; start afresh with another --output.")
    if resume_from is not None:
        saved = json.loads((out / "config.json").read_text())
        changed = _config_changes(saved, _config_dump(cfg))
        if changed:
            raise FlowFactoryError(
                f"{source}: cannot resume {out}: the config changed at {', '.join(changed)}. Resume with the "
                f"config the run started with (only train.epochs may grow), or use another --output.")
    accelerator.wait_for_everyone()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_config_dump(cfg), indent=2))

    # --- prompts first: a bad prompt file must not cost a model load -------------------------------------
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    train_prompts = load_prompts(cfg.data.train, base_dir, "data.train")
    eval_prompts = load_prompts(cfg.data.eval, base_dir, "data.eval")[: t.eval_prompts] if cfg.data.eval else []

    # --- components, built from the registry ------------------------------------------------------------
    registry = registry if registry is not None else get_registry()
    ctx = BuildContext(seed=cfg.seed, device=accelerator.device, output_dir=str(out))
    sampler = registry.get("sampler", cfg.sampler.name).create(options["sampler"], ctx)
    algorithm = registry.get("optimizer", cfg.optimizer.name).create(options["optimizer"], ctx)
    mismatch = sampler_mismatch(cfg, sampler, algorithm)  # before any weights are loaded
    if mismatch:
        raise FlowFactoryError(f"{source}: {mismatch[0]}: {mismatch[1]}")
    set_seed(cfg.seed)
    # an algorithm that never calls policy.reference() (no KL term) spares a full finetune its frozen copy
    policy_ctx = replace(ctx, reference=algorithm.requirements.reference)
    policy = registry.get("policy", cfg.policy.name).create(options["policy"], policy_ctx)
    rewards = RewardSet([(r.name, registry.get("reward", r.name).create(options[f"rewards[{i}]"], ctx), r.weight)
                         for i, r in enumerate(cfg.rewards)])
    algorithm.setup(policy, sampler)
    need = algorithm.requirements
    hooks = AlgorithmHooks(algorithm)

    params = policy.trainable_parameters()
    if not params:
        raise FlowFactoryError(f"{source}: policy {cfg.policy.name!r} has no trainable parameters with these options.")
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    policy.module, optimizer = accelerator.prepare(policy.module, optimizer)
    ema = EMA(params, t.ema.decay) if t.ema.enabled else None
    encode = ConditioningCache(policy)

    start_epoch = 0
    if resume_from is not None:
        state, meta = ckpt.load(resume_from)
        with torch.no_grad():
            for p, saved_p in zip(params, state["params"], strict=True):
                p.copy_(saved_p.to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        hooks.load_state_dict(state.get("algorithm") or {})
        start_epoch = meta["epoch"]
        if start_epoch >= t.epochs:
            raise FlowFactoryError(
                f"{source}: {out} already trained {start_epoch} epochs; to continue, raise train.epochs above "
                f"{start_epoch} (e.g. --set train.epochs={start_epoch + 10}).")
    log = MetricsLog(out, t.tensorboard, start_epoch) if main else None

    def save_checkpoint(epoch: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            state = {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "algorithm": hooks.state_dict()}
            ckpt.save(out / "checkpoints", epoch, state, {"name": cfg.name}, t.keep_checkpoints)
        accelerator.wait_for_everyone()

    def rollout(prompts: list[str], keys: list[tuple[int, ...]], *, deterministic: bool, keep: str,
                epoch: int) -> tuple[Trajectory, Conditioning, torch.Tensor]:
        """Roll out one sample per prompt (no grad), in chunks; returns trajectory, conditioning, decoded."""
        cond = encode(prompts)
        trajs, decoded = [], []
        for lo in range(0, len(prompts), t.rollout_batch_size):
            sl = slice(lo, lo + t.rollout_batch_size)
            gens = generators(cfg.seed, keys[sl])
            with torch.no_grad(), accelerator.autocast():
                traj = sampler.rollout(policy, select_rows(cond, sl), policy.noise(gens), gens, keep=keep,
                                       deterministic=deterministic, epoch=epoch)
                decoded.append(policy.decode(traj.final).float())
            trajs.append(traj)
        return cat_trajectories(trajs), cond, torch.cat(decoded)

    def evaluate(epoch: int) -> dict[str, float]:
        """ODE rollouts on held-out prompts (one each, fixed noise), split over processes."""
        mine = list(range(rank, len(eval_prompts), world))
        per = math.ceil(len(eval_prompts) / world)
        scores = torch.full((per, len(rewards) + 1), float("nan"), device=accelerator.device)
        images = None
        if mine:
            prompts = [eval_prompts[i] for i in mine]
            with ema.swapped(params) if ema is not None else nullcontext():
                _, _, images = rollout(prompts, [(2**31 - 1, i) for i in mine], deterministic=True,
                                       keep="final", epoch=epoch)
            per_reward, total = rewards.score(Samples(prompts=prompts, **_media(images)))
            scores[: len(mine)] = torch.stack([total, *per_reward.values()], 1).to(scores)
        allscores = accelerator.gather(scores)
        allscores = allscores[~allscores[:, 0].isnan()].cpu()
        if main and images is not None:
            save_grid(images, [f"{p}" for p in (eval_prompts[i] for i in mine)], out / "samples" / f"eval-{epoch:06d}.png")
        row = {"eval/reward/mean": float(allscores[:, 0].mean())}
        for j, name in enumerate(rewards.names, 1):
            row[f"eval/reward/{name}/mean"] = float(allscores[:, j].mean())
        return row

    progress = Progress(cfg.name, start_epoch, t.epochs, enabled=show_progress and main)
    last_done, last_saved, consistent = start_epoch, start_epoch, True
    try:
        for epoch in range(start_epoch + 1, t.epochs + 1):
            t0 = time.perf_counter()
            # 1. prompts: P distinct prompts, K rollouts each; this process takes a contiguous slice
            rng = np.random.default_rng([cfg.seed, epoch, 1])
            chosen = rng.choice(len(train_prompts), size=t.prompts_per_epoch,
                                replace=t.prompts_per_epoch > len(train_prompts))
            group_ids = torch.arange(t.prompts_per_epoch).repeat_interleave(t.group_size)
            local = range(rank * n_local, (rank + 1) * n_local)
            prompts = [train_prompts[chosen[int(group_ids[i])]] for i in local]

            # 2. rollout under no grad, keeping what the algorithm needs
            policy.module.eval()
            with hooks.sampling(policy):
                traj, cond, images = rollout(prompts, [(epoch, i) for i in local], deterministic=not need.stochastic,
                                             keep=need.keep, epoch=epoch)
            hooks.on_rollout(policy)
            t1 = time.perf_counter()

            # 3. rewards (checked before any weight changes) and advantages over the global batch
            per_reward, total = rewards.score(Samples(prompts=prompts, **_media(images),
                                                      group_ids=[int(group_ids[i]) for i in local]))
            gathered = {k: accelerator.gather(v.to(accelerator.device)).cpu() for k, v in per_reward.items()}
            adv_all, reward_all = compute_advantages(gathered, rewards.weights, group_ids, std=t.adv_std,
                                                     clip=t.adv_clip, combine=t.reward_combine)
            advantages = adv_all[local.start:local.stop].to(accelerator.device)

            # 4. policy optimisation: inner epochs x optimizer steps x micro-batches x units
            policy.module.train()
            consistent = False
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            maxes: dict[str, float] = {}
            grad_norms = []
            per_step = n_local // t.steps_per_epoch
            for inner in range(t.inner_epochs):
                order = torch.from_numpy(np.random.default_rng([cfg.seed, epoch, 2, inner, rank]).permutation(n_local))
                for step in range(t.steps_per_epoch):
                    idx = order[step * per_step:(step + 1) * per_step]
                    micro = idx.split(t.micro_batch_size)
                    for m, mb in enumerate(micro):
                        batch = TrainBatch(trajectory=traj.select(mb), cond=select_rows(cond, mb),
                                           advantages=advantages[mb], fresh=inner == 0 and step == 0,
                                           sample_keys=tuple((epoch, inner, local.start + int(i)) for i in mb))
                        units = algorithm.units(batch)
                        for u, unit in enumerate(units):
                            last = m == len(micro) - 1 and u == len(units) - 1
                            with (nullcontext() if last else accelerator.no_sync(policy.module)):
                                with accelerator.autocast():
                                    res = algorithm.loss(policy, sampler, batch, unit)
                                # The gradient is the mean over every (sample, unit) of the global step:
                                # this process's sum / (per_step * world * units), times world because
                                # DDP averages over processes. Exact whatever the process count.
                                accelerator.backward(res.loss.float().sum() / (per_step * len(units)))
                            _accumulate(sums, counts, maxes, res, float(res.loss.detach().float().mean()))
                    if t.max_grad_norm is not None:
                        grad_norms.append(float(accelerator.clip_grad_norm_(params, t.max_grad_norm)))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    hooks.on_step(policy)
                    if ema is not None:
                        ema.update(params)
            hooks.on_epoch_end(policy)
            consistent = True
            t2 = time.perf_counter()

            # 5. metrics, samples, eval, checkpoint
            row: dict[str, Any] = {"epoch": epoch, "reward/mean": float(reward_all.mean()),
                                   "reward/std": float(reward_all.std(unbiased=False))}
            for name, vals in gathered.items():
                row[f"reward/{name}/mean"] = float(vals.mean())
            row.update(_reduce(accelerator, sums, counts, maxes))
            if grad_norms:
                row["grad_norm"] = float(np.mean(grad_norms))
            row["time/rollout_s"], row["time/train_s"] = t1 - t0, t2 - t1
            if main and t.sample_every and (epoch % t.sample_every == 0 or epoch == t.epochs):
                first = [i for i in range(n_local) if i % t.group_size == 0][:16]
                save_grid(images[first], [f"{prompts[i]} | {float(total[i]):.3f}" for i in first],
                          out / "samples" / f"train-{epoch:06d}.png")
            if eval_prompts and t.eval_every and (epoch % t.eval_every == 0 or epoch == t.epochs):
                row.update(evaluate(epoch))
            row["time/epoch_s"] = time.perf_counter() - t0
            if main:
                log.log(row)
            last_done = epoch
            progress.update(epoch, row)
            if t.checkpoint_every and (epoch % t.checkpoint_every == 0 or epoch == t.epochs):
                save_checkpoint(epoch)
                last_saved = epoch
    except BaseException:
        # lose nothing: keep the last complete epoch when the failure left the weights consistent
        if consistent and last_done > last_saved and t.checkpoint_every:
            save_checkpoint(last_done)
        raise
    finally:
        progress.close()
        if log is not None:
            log.close()

    accelerator.wait_for_everyone()
    final = out / "final"
    if main:
        policy.save(str(final))
        if ema is not None:
            with ema.swapped(params):
                policy.save(str(final / "ema"))
    accelerator.wait_for_everyone()
    rows = _read_rows(out / "metrics.jsonl")
    first5 = [r["reward/mean"] for r in rows[:5]]
    last5 = [r["reward/mean"] for r in rows[-5:]]
    summary = RunSummary(output_dir=str(out), epochs=last_done, reward_first=float(np.mean(first5)) if first5 else math.nan,
                         reward_last=float(np.mean(last5)) if last5 else math.nan, final_dir=str(final),
                         metrics_path=str(out / "metrics.jsonl"), samples_dir=str(out / "samples"),
                         wall_seconds=time.perf_counter() - t_start,
                         resumed_from=start_epoch if resume_from is not None else None)
    return summary


class AlgorithmHooks:
    """The algorithm's optional methods (`flowfactory.types.OptimizerHooks`), with no-op defaults."""

    def __init__(self, algorithm: Any):
        self.algorithm = algorithm

    def _get(self, name: str) -> Any:
        return getattr(self.algorithm, name, None) or getattr(OptimizerHooks(), name)

    def sampling(self, policy: Any) -> Any:
        return self._get("sampling")(policy)

    def on_rollout(self, policy: Any) -> None:
        self._get("on_rollout")(policy)

    def on_step(self, policy: Any) -> None:
        self._get("on_step")(policy)

    def on_epoch_end(self, policy: Any) -> None:
        self._get("on_epoch_end")(policy)

    def state_dict(self) -> dict[str, Any]:
        return self._get("state_dict")()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._get("load_state_dict")(state)


def _media(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"videos": images} if images.ndim == 5 else {"images": images}


def _accumulate(sums: dict[str, float], counts: dict[str, int], maxes: dict[str, float], res: Any,
                loss: float) -> None:
    for k, v in {"loss": loss, **{k: float(v) for k, v in res.metrics.items()}}.items():
        sums[k] = sums.get(k, 0.0) + v
        counts[k] = counts.get(k, 0) + 1
    for k, v in res.max_metrics.items():
        maxes[k] = max(maxes.get(k, -math.inf), float(v))


def _reduce(accelerator: Any, sums: dict[str, float], counts: dict[str, int], maxes: dict[str, float]) -> dict[str, float]:
    """Means across micro-batches and processes; maxima for max-metrics."""
    out = {}
    keys = sorted(sums)
    if keys:
        means = torch.tensor([sums[k] / counts[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        means = accelerator.reduce(means, reduction="mean")
        out.update({k: float(v) for k, v in zip(keys, means.tolist())})
    mkeys = sorted(maxes)
    if mkeys:
        mx = torch.tensor([maxes[k] for k in mkeys], dtype=torch.float64, device=accelerator.device)
        mx = accelerator.gather(mx[None]).amax(0)
        out.update({k: float(v) for k, v in zip(mkeys, mx.tolist())})
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
