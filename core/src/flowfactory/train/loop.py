"""THE training recipe: one class whose methods read in the order a run happens.

    setup()          launch, output folder, prompts, components, parallelism (DDP or FSDP2), optimizer, resume
    train()          for each epoch: train_epoch(epoch), then checkpoint; on any failure, save what is consistent
      train_epoch    prompts -> rollout (no grad), scored chunk by chunk as it decodes -> advantages -> update
                     -> metrics, samples, evaluate
      update         inner epochs x optimizer steps x micro-batches x the algorithm's units: loss, backward;
                     clip, step, EMA; the algorithm's epoch end
    finish()         final/ (the gathered weights in diffusers/peft format) and the summary

Every random draw is seeded from (seed, epoch, global sample index), never from a running RNG, so a run is
reproducible, a resumed run equals an uninterrupted one, and a sample draws the same noise whichever process
rolls it out (`flowfactory.seeding`). Algorithms get the same keys (`TrainBatch.sample_keys`). Parameters are
looked up from the policy when needed, never cached: FSDP2 replaces them when it shards. Every process reaches
the same decision after each phase that can fail on one process alone (a reward, a rollout), through one
collective, so a failure stops every process with the original message instead of leaving the others waiting
in a gather. The core never looks inside a policy, sampler, reward or algorithm.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowfactory.config import RunConfig, config_dir, dataset_problems, sampler_mismatch, split_problems
from flowfactory.errors import FlowFactoryError, NonFiniteError, RewardError, RunInterrupted
from flowfactory.prompts import Prompt, file_digest
from flowfactory.registry import BuildContext
from flowfactory.seeding import generators, sample_seed  # noqa: F401  (sample_seed: its old import path)
from flowfactory.train import checkpoint as ckpt
from flowfactory.train import parallel, provenance, runfolder
from flowfactory.train.advantages import compute_advantages
from flowfactory.train.conditioning import ConditioningCache
from flowfactory.train.data import load_prompts
from flowfactory.train.ema import EMA
from flowfactory.train.guard import EvalTracker, RewardHackingError, kl_message
from flowfactory.train.logging import MetricsLog, read_metrics, reward_windows, save_grid
from flowfactory.train.rewards import ChunkScorer, RewardSet
from flowfactory.train.state import init_optimizer_state, named_trainable, optimizer_state, raw_module
from flowfactory.train.store import find_store, load_rows, save_rows
from flowfactory.types import Conditioning, Samples, TrainBatch, Trajectory, select_rows

EVAL_KEY = 2**31 - 1  # the epoch slot of eval samples' keys: eval noise is the same at every eval


DATASET_LABEL = "dataset"  # the reward name of a dataset algorithm's labels (1 for the preferred target, else 0)
CACHE_ROWS = 4096  # encoded target images kept per process

@dataclass
class RunSummary:
    output_dir: str
    epochs: int
    reward_first: float
    reward_last: float
    final_dir: str
    metrics_path: str
    samples_dir: str | None  # None when the run wrote no sample grid
    wall_seconds: float
    resumed_from: int | None
    window: int = 5  # epochs in each of the two compared reward windows; 0: too short to compare
    best: dict[str, Any] | None = None  # {"metric", "value", "epoch", "dir"} when eval.best kept a best/
    metric: str = "reward/mean"  # what reward_first/last average: eval/reward/mean for a dataset algorithm


@dataclass
class Rollouts:
    """One process's share of an epoch: its prompts, their keys and groups, what was sampled and decoded."""

    prompts: list[Prompt]
    keys: list[tuple[int, ...]]
    group_ids: list[int]
    trajectory: Trajectory
    cond: Conditioning
    media: torch.Tensor | None  # decoded images [B, C, H, W] or videos [B, T, C, H, W] in [0, 1]; None once scored


def run(cfg: RunConfig, options: dict[str, Any], *, output_dir: str | None = None, resume: bool = False,
        source: str = "<config>", show_progress: bool = True, registry: Any = None,
        resume_command: str | None = None) -> RunSummary:
    """Train; `registry` defaults to the process-wide one (`flowfactory.plugins.get_registry()`).
    `resume_command`: the full `ff run ... --resume` line that continues this run (with the caller's --set and
    --output), named in messages; default `ff run SOURCE [--output DIR] --resume`."""
    recipe = Recipe(cfg, options, output_dir=output_dir, resume=resume, source=source, show_progress=show_progress,
                    registry=registry, resume_command=resume_command)
    try:
        with runfolder.write_errors(recipe.out):  # a full disk or a refused write: one message, not a traceback
            recipe.setup()
            recipe.train()
            return recipe.finish()
    finally:
        if recipe.lock is not None:
            recipe.lock.release()


class Recipe:
    """A training run (see the module docstring for the order of its methods)."""

    def __init__(self, cfg: RunConfig, options: dict[str, Any], *, output_dir: str | None = None,
                 resume: bool = False, source: str = "<config>", show_progress: bool = True, registry: Any = None,
                 resume_command: str | None = None):
        self.cfg, self.options, self.t = cfg, options, cfg.train
        self.resume_command = resume_command or f"ff run {source}{f' --output {output_dir}' if output_dir else ''} --resume"
        self.out = Path(output_dir or cfg.output_dir or f"runs/{cfg.name}")
        self.resume, self.source, self.show_progress = resume, source, show_progress
        self.registry = registry
        self.t_start = time.perf_counter()
        self.start_epoch = 0
        self.resume_from: Path | None = None
        self.last_logged = 0  # the last epoch whose metrics row is written: the weights' epoch when consistent
        self.last_saved = 0
        self.consistent = True  # False from the first weight change of an epoch until its row is logged
        self.log: MetricsLog | None = None
        self.progress: Any = None
        self.lock: runfolder.RunLock | None = None  # held on the output folder from setup to the run's end
        self.stop_signal: str | None = None  # set by the first SIGINT/SIGTERM: stop at the next safe point
        self.stop_agreed: str | None = None  # the stop every process saw at the last agreement point
        self.finish_only = False  # --resume of a run whose epochs are all done but whose final/ is not

    # ================================================================================================ setup
    def setup(self) -> None:
        self._launch()
        self.lock = runfolder.lock_for_run(self.out, self.main, self._agree)  # before anything reads or writes it
        self._prepare_output()
        self._load_prompts()
        self._build_components()
        self._parallelize()
        self._resume()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(_config_dump(self.cfg), indent=2))
            provenance.write(self.out, _config_dump(self.cfg), self.accelerator,
                             self.start_epoch if self.resume else None)
        self.log = MetricsLog(self.out, self.t.tensorboard, self.start_epoch, wandb=self.t.wandb,
                              config=_config_dump(self.cfg)) if self.main else None
        self.last_logged = self.last_saved = self.start_epoch
        self.tracker = EvalTracker.from_config(self.cfg)
        if self.start_epoch and (self.out / "metrics.jsonl").exists():  # decide as the uninterrupted run would
            for row in read_metrics(self.out / "metrics.jsonl"):
                if row.get("epoch", 0) <= self.start_epoch:
                    self.tracker.observe(row)

    def _launch(self) -> None:
        """Processes (Accelerate), the parallel strategy, and the epoch's split over processes and steps."""
        from accelerate import Accelerator

        t = self.t
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision)
        acc = self.accelerator
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.device = acc.device
        strategy = t.parallel.strategy
        if acc.distributed_type.value == "FSDP" and strategy != "fsdp":
            raise FlowFactoryError(
                f"{self.source}: this launch uses Accelerate's FSDP config, but train.parallel.strategy is "
                f"{strategy!r}; set train.parallel.strategy: fsdp (flowfactory applies FSDP2 itself), or launch "
                f"with configs/accelerate/ddp.yaml")
        if strategy == "fsdp" and t.mixed_precision == "fp16":
            raise FlowFactoryError(
                f"{self.source}: train.mixed_precision: fp16 needs a gradient scaler, which FSDP2 sharding does not "
                f"use; use bf16, or train.parallel.param_dtype: bfloat16")
        # FSDP over one process shards nothing: it is the plain single-process run
        self.fsdp = strategy == "fsdp" and self.world > 1
        problems = split_problems(self.cfg, self.world)
        if problems:
            raise FlowFactoryError(f"{self.source}: {problems[0][0]}: {problems[0][1]}")
        self.n_local = t.prompts_per_epoch * t.group_size // self.world

    def _prepare_output(self) -> None:
        """Never overwrite a run unless asked to resume it; a resume must use the config the run started with."""
        out, source = self.out, self.source
        if not self.resume and (out / "metrics.jsonl").exists():
            raise FlowFactoryError(
                f"{out} already holds a run. Continue it with `{self.resume_command}`, or write elsewhere "
                f"with `--output DIR`.")
        if not self.resume:
            return
        notes: list[str] = []
        self.resume_from = ckpt.latest(out / "checkpoints", notes)
        if self.main:
            for note in notes:
                print(f"flowfactory: {note}", file=sys.stderr)
        if self.resume_from is None and (out / "config.json").exists() and self.main:
            print(f"flowfactory: {out} holds no checkpoint yet; --resume starts the run from epoch 1", file=sys.stderr)
        if (out / "config.json").exists():
            saved = json.loads((out / "config.json").read_text())
            changed = _config_changes(saved, _config_dump(self.cfg))
            if changed:
                raise FlowFactoryError(
                    f"{source}: cannot resume {out}: the config changed at {', '.join(changed)}. Resume with the "
                    f"config the run started with (only train.epochs may grow), or use another --output.")

    def _load_prompts(self) -> None:
        """Prompts first: a bad prompt file must not cost a model load."""
        cfg, base_dir = self.cfg, config_dir(self.source)
        self.train_prompts = load_prompts(cfg.data.train, base_dir, "data.train")
        self.target_latents: dict[tuple[str, str, str], torch.Tensor] = {}  # dataset algorithms' encoded targets
        self.eval_prompts = (load_prompts(cfg.data.eval, base_dir, "data.eval")[: self.t.eval_prompts]
                             if cfg.data.eval else [])

    def _build_components(self) -> None:
        """Sampler and algorithm first (cheap, and their mismatch is an error before any weights load), then
        the policy and the rewards, from the registry."""
        from accelerate.utils import set_seed

        from flowfactory.plugins import get_registry

        cfg, options = self.cfg, self.options
        registry = self.registry if self.registry is not None else get_registry()
        ctx = BuildContext(seed=cfg.seed, device=self.device, output_dir=str(self.out))
        self.sampler = registry.get("sampler", cfg.sampler.name).create(options["sampler"], ctx)
        self.algorithm = registry.get("optimizer", cfg.optimizer.name).create(options["optimizer"], ctx)
        mismatch = sampler_mismatch(cfg, self.sampler, self.algorithm)
        if mismatch is None and (found := dataset_problems(cfg, self.algorithm, self.source)):
            mismatch = found[0]
        if mismatch:
            raise FlowFactoryError(f"{self.source}: {mismatch[0]}: {mismatch[1]}")
        groups_here = self.n_local // self.t.group_size
        if self.algorithm.requirements.whole_groups and groups_here % self.t.steps_per_epoch:
            raise FlowFactoryError(
                f"{self.source}: train.steps_per_epoch: optimizer {cfg.optimizer.name!r} needs whole groups in every "
                f"optimizer step, but each of the {self.world} processes holds {groups_here} groups, which do not "
                f"split into {self.t.steps_per_epoch} steps")
        set_seed(cfg.seed)
        # an algorithm that never calls policy.reference() (no KL term) spares a full finetune its frozen copy
        policy_ctx = replace(ctx, reference=self.algorithm.requirements.reference or cfg.eval.kl_period() > 0)
        self.policy = registry.get("policy", cfg.policy.name).create(options["policy"], policy_ctx)
        self.rewards = RewardSet([(r.name, registry.get("reward", r.name).create(options[f"rewards[{i}]"], ctx),
                                   r.weight) for i, r in enumerate(cfg.rewards)],
                                 timeouts={r.name: r.timeout for r in cfg.rewards})
        # eval's own rewards (a held-out gold scorer), else the training rewards
        self.eval_rewards = self.rewards if not cfg.eval.rewards else RewardSet(
            [(r.name, registry.get("reward", r.name).create(options[f"eval.rewards[{i}]"], ctx), r.weight)
             for i, r in enumerate(cfg.eval.rewards)], timeouts={r.name: r.timeout for r in cfg.eval.rewards})
        self.algorithm.bind_rewards(self.rewards)  # an algorithm that differentiates the rewards keeps them
        cache_dir = self.t.conditioning_cache
        base_dir = config_dir(self.source)
        if cache_dir is not None and not Path(cache_dir).is_absolute() and base_dir is not None:
            cache_dir = str(base_dir / cache_dir)
        self.encode = ConditioningCache(self.policy, capacity=512, directory=cache_dir)
        self.replay = None if cfg.data.replay is None else find_store(
            Path(cfg.data.replay) if Path(cfg.data.replay).is_absolute() or base_dir is None
            else base_dir / cfg.data.replay)

    def _parallelize(self) -> None:
        """Shard (FSDP2) or wrap (DDP) the trained module, then set up the algorithm, AdamW and the EMA over the
        parameters as they are after that step."""
        t = self.t
        if self.fsdp:
            parallel.shard(self.policy, t.parallel, self.device, self.world)
        self.algorithm.setup(self.policy, self.sampler)
        params = self.policy.trainable_parameters()
        if not params:
            raise FlowFactoryError(
                f"{self.source}: policy {self.cfg.policy.name!r} has no trainable parameters with these options.")
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        if not self.fsdp:
            self.policy.module, self.optimizer = self.accelerator.prepare(self.policy.module, self.optimizer)
        self.ema = EMA(named_trainable(self.policy), t.ema.decay) if t.ema.enabled else None

    def _training_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds, by name: weights, AdamW state, EMA, the algorithm's state."""
        named = named_trainable(self.policy)
        return {"model": named, "optimizer": optimizer_state(_raw_optimizer(self.optimizer), named),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "algorithm": self.algorithm.state_dict()}

    def _resume(self) -> None:
        if self.resume_from is None:
            return
        path = self.resume_from
        meta = ckpt.read_meta(path)
        named = named_trainable(self.policy)
        per_param: dict[str, dict[str, Any]] = {}
        for key, spec in ckpt.shapes(meta, "optimizer/").items():
            name, entry = key.rsplit("/", 1)
            per_param.setdefault(name, {})[entry] = spec
        init_optimizer_state(_raw_optimizer(self.optimizer), named, per_param)
        state, meta = ckpt.load(path, self._training_state())
        saved = state["model"]
        if saved.keys() != named.keys():
            diff = sorted(set(saved) ^ set(named))[:3]
            raise FlowFactoryError(
                f"{path}: its trained parameters differ from this run's (e.g. {diff}); resume with the policy options "
                f"the run started with")
        with torch.no_grad():
            for name, p in named.items():
                if saved[name] is not p:
                    p.copy_(saved[name])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.algorithm.load_state_dict(state.get("algorithm") or {})
        self.start_epoch = int(meta["epoch"])
        if self.start_epoch >= self.t.epochs and not (self.out / "final").exists():
            self.finish_only = True  # stopped after its last checkpoint, before final/ was complete
        elif self.start_epoch >= self.t.epochs:
            raise FlowFactoryError(
                f"{self.source}: {self.out} already trained {self.start_epoch} epochs; to continue, raise "
                f"train.epochs above {self.start_epoch} (e.g. --set train.epochs={self.start_epoch + 10}).")

    # ================================================================================================ train
    def train(self) -> None:
        """Every epoch, then its checkpoint. On any failure, save the last epoch whose weights and metrics agree
        (every process together: failures are agreed on first), then re-raise. A first SIGINT or SIGTERM asks
        for a stop at the next safe point (before the update, or at the epoch's end), agreed by every process;
        a second one stops at once."""
        from flowfactory.train.progress import Progress

        t = self.t
        self.progress = Progress(self.cfg.name, self.start_epoch, t.epochs,
                                 enabled=self.show_progress and self.main and not self.finish_only)
        previous = self._catch_signals()
        try:
            for epoch in range(self.start_epoch + 1, t.epochs + 1):
                row = self.train_epoch(epoch)
                improved, hacked = self.tracker.observe(row)
                if improved:
                    self.save_best(epoch, row)  # the weights as evaluated: those of this epoch's end
                bound = self.cfg.eval.guard.max_kl
                if hacked is None and bound is not None and row.get("kl/reference", 0.0) > bound:
                    hacked = kl_message(row["kl/reference"], bound, epoch)
                if self.main:
                    self.log.log(row)
                self.last_logged, self.consistent = epoch, True
                self.progress.update(epoch, row)
                if t.checkpoint_every and (epoch % t.checkpoint_every == 0 or epoch == t.epochs):
                    self.save_checkpoint(epoch)
                if hacked is not None:  # every process decides alike: the rows are the same everywhere
                    self.save_checkpoint(epoch) if t.checkpoint_every and self.last_saved < epoch else None
                    raise RewardHackingError(
                        f"{hacked}. The run stopped after epoch {epoch} (checkpointed). To train on anyway, raise "
                        f"or null eval.guard in {self.source} and run `{self.resume_command}`")
                self._agree(None)  # also tells every process whether one was asked to stop
                self._stop_if_asked()
        except BaseException:
            # lose nothing: keep the last complete epoch when the failure left the weights consistent
            if self.consistent and self.last_logged > self.last_saved and t.checkpoint_every:
                self.save_checkpoint(self.last_logged)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.progress.close()
            if self.log is not None:
                self.log.close()

    def _catch_signals(self) -> dict[int, Any]:
        """SIGINT and SIGTERM request a stop at the next safe point; a second one interrupts at once."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                raise RunInterrupted(name, 128 + signum)
            self.stop_signal = name
            if self.main:
                print(f"\nflowfactory: {name}: stopping after the current phase and saving the last complete "
                      f"epoch (send it again to stop at once)", file=sys.stderr, flush=True)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
            # restart interrupted system calls: a signal landing inside a collective (gloo/NCCL sockets) must not
            # fail it with EINTR; the flag is read at the next agreement point
            signal.siginterrupt(sig, False)
        return previous

    def _stop_if_asked(self) -> None:
        """Raise RunInterrupted on every process when the last agreement point said one was asked to stop; all
        decide from the same gathered flags, so they stop at the same point."""
        if self.stop_agreed is not None:
            code = 143 if self.stop_agreed == "SIGTERM" else 130
            raise RunInterrupted(self.stop_agreed, code)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch: rollouts, rewards and advantages over the global batch, the update, then its metrics row."""
        t0 = time.perf_counter()
        prompts, local, group_ids = self.epoch_prompts(epoch)
        keys = [(epoch, i) for i in local]
        groups = [int(group_ids[i]) for i in local]
        error: BaseException | None = None
        roll = per_reward = total = None
        scorer = self.scorer(prompts, groups)
        t1 = t0
        try:
            self.policy.module.eval()
            if self.replay is not None:  # the stored epoch instead of sampling it
                roll, per_reward, total = self.replayed(epoch, local, scorer)
                prompts = roll.prompts
            elif self.algorithm.requirements.source == "dataset":  # the records' target images: nothing sampled
                roll, per_reward, total = self.from_dataset(prompts, keys, groups)
            else:
                with self.algorithm.sampling(self.policy):
                    roll = self.rollout(prompts, keys, groups, deterministic=not self.algorithm.requirements.stochastic,
                                        keep=self.algorithm.requirements.keep, epoch=epoch, scorer=scorer)
                per_reward = None
            self.algorithm.on_rollout(self.policy)
            t1 = time.perf_counter()
            if per_reward is None:
                per_reward, total = scorer.result()
            if self.t.store_rollouts:
                save_rows(self.out / "rollouts", epoch, local.start, roll.prompts, roll.keys, roll.group_ids,
                          roll.trajectory, roll.media, per_reward, self.t.store_media)
        except Exception as exc:  # agreed on below, so every process stops, not only this one
            error = exc
        finally:
            scorer.close()
        t_scored = time.perf_counter()
        self._agree(error)
        self._stop_if_asked()  # before the update: the weights are still those of the last logged epoch
        assert roll is not None and roll.media is not None and per_reward is not None and total is not None
        # decoded samples leave the device once scored: the sample grid keeps its few rows on the CPU
        t = self.t
        grid = None
        if self.main and t.sample_every and (epoch % t.sample_every == 0 or epoch == t.epochs):
            first = [i for i in range(self.n_local) if i % t.group_size == 0][:16]
            grid = (roll.media[first].cpu(), [f"{prompts[i].text} | {float(total[i]):.3f}" for i in first])
        roll.media = None
        gathered = {k: self.accelerator.gather(v.to(self.device)).cpu() for k, v in per_reward.items()}
        weights = {DATASET_LABEL: 1.0} if DATASET_LABEL in gathered else self.rewards.weights
        adv_all, reward_all = compute_advantages(gathered, weights, group_ids, std=self.t.adv_std,
                                                 clip=self.t.adv_clip, combine=self.t.reward_combine)
        advantages = adv_all[local.start:local.stop].to(self.device)
        rewards = reward_all[local.start:local.stop].to(self.device)

        stats = self.update(epoch, roll, advantages, local, rewards)
        period = self.cfg.eval.kl_period()
        if period and epoch % period == 0:
            stats["kl/reference"] = self.estimate_kl(epoch, roll, local)
        t2 = time.perf_counter()

        row: dict[str, Any] = {"epoch": epoch, "reward/mean": float(reward_all.mean()),
                               "reward/std": float(reward_all.std(unbiased=False))}
        for name, vals in gathered.items():
            row[f"reward/{name}/mean"] = float(vals.mean())
        row.update(stats)
        row["time/rollout_s"], row["time/train_s"] = t1 - t0, t2 - t1
        row["time/score_wait_s"] = t_scored - t1  # scoring left after the last rollout chunk (overlap hides the rest)
        if grid is not None:
            save_grid(*grid, self.out / "samples" / f"train-{epoch:06d}.png")
        if self.eval_prompts and t.eval_every and (epoch % t.eval_every == 0 or epoch == t.epochs):
            row.update(self.evaluate(epoch))
        row["time/epoch_s"] = time.perf_counter() - t0
        return row

    def replayed(self, epoch: int, local: range, scorer: ChunkScorer) -> tuple[Rollouts, dict[str, torch.Tensor],
                                                                            torch.Tensor]:
        """This process's rows of the stored epoch (`data.replay`), with the stored scores when the run's rewards
        are the stored ones, else scored now from the stored samples."""
        need = self.algorithm.requirements
        rows = load_rows(self.replay, epoch, local, self.device)
        traj = rows.trajectory
        if need.keep == "steps" and (traj.latents is None or traj.log_probs is None):
            raise FlowFactoryError(f"data.replay: {self.replay} stored final latents only, but optimizer "
                                   f"{self.cfg.optimizer.name!r} needs every step's latents and log-probs; store "
                                   f"them with an algorithm that keeps steps (grpo), or replay with nft/awm")
        if need.stochastic and not bool(traj.stochastic.any()):
            raise FlowFactoryError(f"data.replay: the stored rollouts of {self.replay} are deterministic (ODE), "
                                   f"but optimizer {self.cfg.optimizer.name!r} needs stochastic steps with log-probs")
        roll = Rollouts(prompts=rows.prompts, keys=rows.keys, group_ids=rows.group_ids, trajectory=traj,
                        cond=self.encode(rows.prompts), media=rows.media)
        if not self.cfg.data.replay_rescore and set(self.rewards.names) <= set(rows.rewards):
            per_reward = {n: rows.rewards[n] for n in self.rewards.names}
            return roll, per_reward, sum(self.rewards.weights[n] * per_reward[n] for n in per_reward)
        if rows.media is None:
            raise FlowFactoryError(f"data.replay: {self.replay} stored no samples (train.store_media: none), so "
                                   f"rewards {', '.join(self.rewards.names)} cannot score them; replay with the "
                                   f"stored rewards ({', '.join(rows.rewards)})")
        scorer.prompts, scorer.group_ids = rows.prompts, rows.group_ids
        scorer.add(rows.media)
        per_reward, total = scorer.result()
        return roll, per_reward, total

    def from_dataset(self, prompts: list[Prompt], keys: list[tuple[int, ...]], group_ids: list[int],
                     ) -> tuple[Rollouts, dict[str, torch.Tensor], torch.Tensor]:
        """This process's rows from the records' target images (a dataset algorithm: SFT, offline DPO). Row j of a
        group takes target `targets[j % len(targets)]`, encoded by `policy.encode_image` (cached per image file:
        a target is encoded once per run) as the trajectory's final latents; its label is 1 for targets[0] and 0
        for the others, logged as the reward `dataset`."""
        need, t = self.algorithm.requirements, self.t
        names = need.targets
        encode = getattr(self.policy, "encode_image", None)
        if not callable(encode):
            raise FlowFactoryError(f"{self.source}: optimizer {self.cfg.optimizer.name!r} learns from target images, "
                                   f"but policy {self.cfg.policy.name!r} has no encode_image (images to latents); "
                                   f"use a policy that has one")
        which = [names[(j % t.group_size) % len(names)] for j in range(len(prompts))]
        latents = []
        for p, name in zip(prompts, which, strict=True):
            key = (name, str(p.targets[name]), file_digest(p.targets[name]))
            if key not in self.target_latents:
                with torch.no_grad():
                    self.target_latents[key] = encode([p.load_target(name)])[0]
                while len(self.target_latents) > CACHE_ROWS:
                    self.target_latents.pop(next(iter(self.target_latents)))
            latents.append(self.target_latents[key])
        final = torch.stack(latents).to(self.device)
        steps = self.sampler.steps
        trajectory = Trajectory(sigmas=self.policy.sigmas(steps).to(self.device),
                                stochastic=torch.zeros(steps, dtype=torch.bool, device=self.device), final=final)
        with torch.no_grad(), self.accelerator.autocast():
            media = torch.cat([self.policy.decode(final[lo:lo + t.rollout_batch_size]).float()
                               for lo in range(0, len(final), t.rollout_batch_size)])
        labels = torch.tensor([1.0 if name == names[0] else 0.0 for name in which], dtype=torch.float32)
        roll = Rollouts(prompts=prompts, keys=keys, group_ids=group_ids, trajectory=trajectory,
                        cond=self.encode(prompts), media=media)
        return roll, {DATASET_LABEL: labels}, labels

    def epoch_prompts(self, epoch: int) -> tuple[list[Prompt], range, torch.Tensor]:
        """P distinct prompts drawn from (seed, epoch), K rollouts each; this process takes a contiguous slice.
        Returns its prompts, its global sample indices and every sample's group id."""
        t = self.t
        rng = np.random.default_rng([self.cfg.seed, epoch, 1])
        chosen = rng.choice(len(self.train_prompts), size=t.prompts_per_epoch,
                            replace=t.prompts_per_epoch > len(self.train_prompts))
        group_ids = torch.arange(t.prompts_per_epoch).repeat_interleave(t.group_size)
        local = range(self.rank * self.n_local, (self.rank + 1) * self.n_local)
        return [self.train_prompts[chosen[int(group_ids[i])]] for i in local], local, group_ids

    def rollout(self, prompts: list[Prompt], keys: list[tuple[int, ...]], group_ids: list[int], *,
                deterministic: bool, keep: str, epoch: int, scorer: ChunkScorer | None = None) -> Rollouts:
        """One sample per prompt under no grad, in chunks of `rollout_batch_size`, decoded; each decoded chunk
        goes to `scorer` at once, and a scoring call that already failed ends the rollout early."""
        t, acc = self.t, self.accelerator
        cond = self.encode(prompts)
        trajs, decoded = [], []
        for lo in range(0, len(prompts), t.rollout_batch_size):
            sl = slice(lo, lo + t.rollout_batch_size)
            gens = generators(self.cfg.seed, keys[sl])
            with torch.no_grad(), acc.autocast():
                traj = self.sampler.rollout(self.policy, select_rows(cond, sl), self.policy.noise(gens), gens,
                                            keep=keep, deterministic=deterministic, epoch=epoch)
                decoded.append(self.policy.decode(traj.final).float())
            trajs.append(traj)
            if scorer is not None:
                scorer.add(decoded[-1])
                if scorer.failed():
                    scorer.result()  # raises that call's error
        return Rollouts(prompts=prompts, keys=keys, group_ids=group_ids, trajectory=cat_trajectories(trajs),
                        cond=cond, media=torch.cat(decoded))

    def scorer(self, prompts: list[Prompt], group_ids: list[int]) -> ChunkScorer:
        """Scores this process's samples as the rollout decodes them, in chunks of whole groups (the rollout batch
        rounded up to a multiple of the group size), overlapped with sampling unless `train.overlap_rewards` is
        off; the chunks, hence the scores, are the same either way. Checked before any update."""
        t = self.t
        chunk = math.ceil(t.rollout_batch_size / t.group_size) * t.group_size
        return ChunkScorer(self.rewards, prompts, group_ids, chunk, overlap=t.overlap_rewards)

    def update(self, epoch: int, roll: Rollouts, advantages: torch.Tensor, local: range,
               rewards: torch.Tensor | None = None) -> dict[str, float]:
        """Inner epochs x optimizer steps x micro-batches x the algorithm's units. The gradient of a step is the
        mean over every (sample, unit) of the global step, whatever the process count or micro-batch size."""
        t = self.t
        self.policy.module.train()
        stats = _Stats()
        grad_norms: list[float] = []
        per_step = self.n_local // t.steps_per_epoch
        skipped = 0
        for inner in range(t.inner_epochs):
            for step, batches in enumerate(self.micro_batches(epoch, inner, roll, advantages, local, rewards)):
                self._nonfinite_loss = False
                for m, batch in enumerate(batches):
                    units = self.algorithm.units(batch)
                    for u, unit in enumerate(units):
                        last = m == len(batches) - 1 and u == len(units) - 1
                        self._loss_step(batch, unit, per_step * len(units), last, stats)
                where = (f"epoch {epoch}, optimizer step {step + 1} of {t.steps_per_epoch}"
                         + (f" of inner epoch {inner + 1}" if t.inner_epochs > 1 else ""))
                norm = self._optimizer_step(where)
                if norm is None:
                    skipped += 1
                else:
                    grad_norms.append(norm)
        self.algorithm.on_epoch_end(self.policy)
        out = stats.reduce(self.accelerator)
        if grad_norms:
            out["grad_norm"] = float(np.mean(grad_norms))
        if t.nonfinite == "skip":
            out["train/skipped_steps"] = float(skipped)
        return out

    def micro_batches(self, epoch: int, inner: int, roll: Rollouts, advantages: torch.Tensor, local: range,
                      rewards: torch.Tensor | None = None) -> list[list[TrainBatch]]:
        """For each optimizer step of this inner epoch, its micro-batches. The units are rows, or whole groups for
        an algorithm that needs them (`Requirements.whole_groups`; each group kept together and in order).

        One step: the units shuffled by (seed, epoch, inner, rank), then split into micro-batches. S > 1 steps:
        which step a unit trains in does not depend on the process count, so N processes make the same updates as
        one. The global units are cut into consecutive tiles of S, and a permutation drawn from (seed, epoch,
        inner, tile) sends each unit of a tile to a different step; each process holds whole tiles (its units
        split evenly into the steps, checked at `ff validate`), so every step takes one unit of every tile. Within
        a step, this process's units come in its shuffled order."""
        t, S = self.t, self.t.steps_per_epoch
        per_step = self.n_local // S
        size = t.group_size if self.algorithm.requirements.whole_groups else 1  # local rows start on a group boundary
        n_units, first = self.n_local // size, local.start // size
        rng = np.random.default_rng([self.cfg.seed, epoch, 2, inner, self.rank])
        units = rng.permutation(n_units)
        if S > 1:
            step_of = np.concatenate([np.random.default_rng([self.cfg.seed, epoch, 2, inner, S, tile]).permutation(S)
                                      for tile in range(first // S, (first + n_units) // S)])
            units = np.concatenate([units[step_of[units] == s] for s in range(S)])
        order = torch.from_numpy((units[:, None] * size + np.arange(size)).reshape(-1))
        group_ids = torch.tensor(roll.group_ids, dtype=torch.long)
        steps = []
        for step in range(t.steps_per_epoch):
            idx = order[step * per_step:(step + 1) * per_step]
            steps.append([TrainBatch(trajectory=roll.trajectory.select(mb), cond=select_rows(roll.cond, mb),
                                     advantages=advantages[mb], fresh=inner == 0 and step == 0,
                                     sample_keys=tuple((epoch, inner, local.start + int(i)) for i in mb),
                                     group_ids=group_ids[mb],
                                     rewards=None if rewards is None else rewards[mb.to(rewards.device)],
                                     prompts=[roll.prompts[int(i)] for i in mb])
                          for mb in idx.split(t.micro_batch_size)])
        return steps

    def _loss_step(self, batch: TrainBatch, unit: Any, scale: int, last: bool, stats: _Stats) -> None:
        """One forward/backward. The loss is this process's sum over (sample, unit) / (rows per step x units);
        DDP and FSDP average over processes, so the gradient is the global mean. Gradients are reduced across
        processes only on the step's last backward. A non-finite loss is still backpropagated (every process must
        join the reduction); the step is then refused by `_optimizer_step`."""
        acc = self.accelerator
        with parallel.sync_context(self.policy.module, self.fsdp, acc, last):
            with acc.autocast():
                res = self.algorithm.loss(self.policy, self.sampler, batch, unit)
            acc.backward(res.loss.float().sum() / scale)
        if not bool(torch.isfinite(res.loss.detach()).all()):
            self._nonfinite_loss = True
        stats.add(res)

    def _optimizer_step(self, where: str) -> float | None:
        """Clip, step, zero the gradients, then the algorithm's and the EMA's per-step updates; returns the
        gradient norm. The norm is global (reduced over processes and shards), so every process sees the same
        one: a non-finite gradient is never applied, and with `train.nonfinite: skip` the step is skipped
        (None), else the run stops with the weights as they were before the step."""
        t = self.t
        params = self.policy.trainable_parameters()
        norm = parallel.clip_grad_norm(params, t.max_grad_norm if t.max_grad_norm is not None else math.inf,
                                       self.fsdp, self.accelerator)
        if not math.isfinite(norm):
            what = self._nonfinite_report(norm)
            self.optimizer.zero_grad(set_to_none=True)
            message = (f"non-finite {what} in {where}, optimizer `{self.cfg.optimizer.name}`; the step was not "
                       f"applied, so the weights are those before it")
            if t.nonfinite == "skip":
                if self.main:
                    print(f"flowfactory: {message} (train.nonfinite: skip)", file=sys.stderr)
                return None
            raise NonFiniteError(f"{message}. Lower train.lr, keep train.max_grad_norm set, check the reward "
                                 f"scale, or set train.nonfinite: skip to skip such steps; then --resume")
        self.consistent = False  # from the first applied step until the epoch's row is logged
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.on_step(self.policy)
        if self.ema is not None:
            self.ema.update(named_trainable(self.policy))
        return norm

    def _nonfinite_report(self, norm: float) -> str:
        """What went non-finite: this process's loss, or the first parameter whose gradient is (norm: {norm})."""
        if self._nonfinite_loss:
            return f"loss (gradient norm {norm})"
        for name, p in named_trainable(self.policy).items():
            g = p.grad
            if g is not None:
                local = g.to_local() if hasattr(g, "to_local") else g
                if not bool(torch.isfinite(local).all()):
                    return f"gradient (norm {norm}; first at parameter {name})"
        return f"gradient (norm {norm}; the non-finite values are on another process)"

    def evaluate(self, epoch: int) -> dict[str, float]:
        """ODE rollouts on held-out prompts (one each, fixed noise), split over processes. With FSDP every
        process rolls out the same number of samples (padding repeats its last prompt): forwards are collective."""
        prompts_all, world, rank = self.eval_prompts, self.world, self.rank
        mine = list(range(rank, len(prompts_all), world))
        per = math.ceil(len(prompts_all) / world)
        n_real = len(mine)
        if self.fsdp:
            mine += [mine[-1] if mine else 0] * (per - len(mine))
        scores = torch.full((per, len(self.eval_rewards) + 1), float("nan"), device=self.device)
        error: BaseException | None = None
        roll = media = None
        try:
            if mine:
                prompts = [prompts_all[i] for i in mine]
                swap = self.ema.swapped(named_trainable(self.policy)) if self.ema is not None else nullcontext()
                with swap:
                    roll = self.rollout(prompts, [(EVAL_KEY, i) for i in mine], [], deterministic=True,
                                        keep="final", epoch=epoch)
                # each eval prompt is sampled once: its own group (a groupwise reward sees groups of one)
                per_reward, total = self.eval_rewards.score(Samples.of(prompts[:n_real], group_ids=mine[:n_real],
                                                                  **_media(roll.media[:n_real])))
                scores[:n_real] = torch.stack([total, *per_reward.values()], 1).to(scores)
                media = roll.media[:n_real].cpu() if self.main else None
                roll = None
        except Exception as exc:
            error = exc
        self._agree(error)
        allscores = self.accelerator.gather(scores)
        allscores = allscores[~allscores[:, 0].isnan()].cpu()
        if media is not None:
            save_grid(media, [prompts_all[i].text for i in mine[:n_real]], self.out / "samples" / f"eval-{epoch:06d}.png")
        row = {"eval/reward/mean": float(allscores[:, 0].mean())}
        for j, name in enumerate(self.eval_rewards.names, 1):
            row[f"eval/reward/{name}/mean"] = float(allscores[:, j].mean())
        return row

    def estimate_kl(self, epoch: int, roll: Rollouts, local: range) -> float:
        """`kl/reference`: the KL between the policy's and the reference's stochastic steps, summed over the
        schedule, averaged over this epoch's samples (at most `micro_batch_size` per process) and processes.

        Each sample's final latent x_0 is noised to every schedule sigma (x_i = (1 - s_i) x_0 + s_i eps, eps drawn
        from the sample's key), and step i's Gaussians N(mu, std^2) under both models give
        KL_i = mean over latent dims of (mu_policy - mu_reference)^2 / (2 std_i^2), the convention of grpo's KL
        term. The steps are the sampler's own when it is stochastic, else Flow-GRPO's SDE at noise level 0.7."""
        from flowfactory.samplers import FlowSDEOptions
        from flowfactory.samplers.flow import FlowSDESampler, SDESampler
        from flowfactory.seeding import randn_per_sample

        sampler = self.sampler
        if not isinstance(sampler, SDESampler):  # a stochastic sampler of our own SDE family steps as it samples
            sampler = FlowSDESampler(FlowSDEOptions(steps=getattr(self.sampler, "steps", 10), noise_level=0.7))
        n = min(self.t.micro_batch_size, self.n_local)
        x0 = roll.trajectory.final[:n].float()
        cond = select_rows(roll.cond, slice(0, n))
        keys = [(epoch, 3, local.start + i) for i in range(n)]
        sigmas = self.policy.sigmas(sampler.steps).to(torch.float32).cpu()
        total = torch.zeros(n, device=x0.device)
        self.policy.module.eval()
        with torch.no_grad(), self.accelerator.autocast():
            for i in range(len(sigmas) - 1):
                if float(sigmas[i + 1]) <= 0.0:
                    continue  # the step to sigma 0 has no noise
                eps = randn_per_sample(tuple(x0.shape[1:]), generators(self.cfg.seed, [(*k, i) for k in keys]),
                                       device=x0.device)
                s = float(sigmas[i])
                x = ((1 - s) * x0 + s * eps).to(roll.trajectory.final.dtype)
                mine = sampler.step_distribution(self.policy, x, sigmas, i, cond, stochastic=True)
                with self.policy.reference():
                    ref = sampler.step_distribution(self.policy, x, sigmas, i, cond, stochastic=True)
                dims = tuple(range(1, mine.mean.ndim))
                total += ((mine.mean.float() - ref.mean.float()) ** 2).mean(dim=dims) / (2 * mine.std.float() ** 2)
        parallel.reshard(raw_module(self.policy.module))
        return float(self.accelerator.gather(total.mean().reshape(1)).mean())

    def save_best(self, epoch: int, row: dict[str, Any]) -> None:
        """best/: the weights as evaluated at `epoch` (the EMA's when it is on), in the format of final/, written
        into a temporary folder and renamed when complete; best/best.json names the epoch and the metric."""
        swap = self.ema.swapped(named_trainable(self.policy)) if self.ema is not None else nullcontext()
        metric = self.cfg.eval.best
        with swap:
            self._write_model(self.out / "best", {"epoch": epoch, "metric": metric, "value": row[metric],
                                                   "ema": self.ema is not None})

    def save_checkpoint(self, epoch: int) -> None:
        """Every process writes its part of the named state (`flowfactory.train.checkpoint`); weights that are
        not all finite are never written."""
        parallel.reshard(raw_module(self.policy.module))
        bad = [n for n, p in named_trainable(self.policy).items()
               if not bool(torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all())]
        self._agree(NonFiniteError(f"refusing to checkpoint epoch {epoch}: parameter {bad[0]} holds non-finite "
                                   f"values; the last checkpoint stays the newest") if bad else None)
        ckpt.save(self.out / "checkpoints", epoch, self._training_state(),
                  {"name": self.cfg.name, "processes": self.world, "strategy": self.t.parallel.strategy},
                  self.t.keep_checkpoints)
        self.last_saved = epoch

    def _agree(self, error: BaseException | None) -> None:
        """Every process learns, through one collective, whether any process failed; each then raises the
        first failure (its own, or the failing process's message), so none is left waiting in a collective."""
        if self.world == 1:
            self.stop_agreed = self.stop_signal
            if error is not None:
                raise error
            return
        size = 2048
        text = b"" if error is None else _describe(error).encode("utf-8", "replace")[: size - 3]
        buf = torch.zeros(size, dtype=torch.uint8)
        buf[0] = 0 if error is None else (2 if isinstance(error, RewardError) else 1)
        buf[1] = {None: 0, "SIGINT": 1}.get(self.stop_signal, 2)  # a stop asked of this process
        buf[2:2 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else buf[2:2]
        everyone = self.accelerator.gather(buf.to(self.device)).cpu().view(self.world, size)
        # what every process decides from: the flags as gathered. A signal landing on this process after its
        # buffer was built is in no one's view yet (its own neither): it is carried to the next agreement
        asked = everyone[:, 1]
        if bool((asked != 0).any()):
            self.stop_agreed = "SIGINT" if int(asked.max()) == 1 else "SIGTERM"
            self.stop_signal = self.stop_signal or self.stop_agreed
        if error is not None:
            raise error
        failed = [r for r in range(self.world) if everyone[r, 0] != 0]
        if failed:
            r = failed[0]
            raw = bytes(everyone[r, 2:].tolist()).rstrip(b"\0").decode("utf-8", "replace")
            cls = RewardError if int(everyone[r, 0]) == 2 else FlowFactoryError
            raise cls(f"{raw} (on process {r} of {self.world}; this process stopped with it)")

    # =============================================================================================== finish
    def finish(self) -> RunSummary:
        """final/ (and final/ema) from the gathered weights, written by the main process into a temporary folder
        and renamed when complete, so a crash leaves no partial final/ (`--resume` then writes it); then the
        summary."""
        final = self.out / "final"
        self._write_model(final)
        rows = _read_rows(self.out / "metrics.jsonl")
        metric = "reward/mean"
        if self.algorithm.requirements.source == "dataset":  # the train reward is the dataset's label: eval shows
            metric = "eval/reward/mean"                    # what was learnt
        reward_first, reward_last, window = reward_windows([r[metric] for r in rows if metric in r])
        samples = self.out / "samples"
        return RunSummary(output_dir=str(self.out), epochs=self.last_logged, reward_first=reward_first,
                          reward_last=reward_last, final_dir=str(final), metrics_path=str(self.out / "metrics.jsonl"),
                          samples_dir=str(samples) if samples.is_dir() else None,
                          wall_seconds=time.perf_counter() - self.t_start,
                          resumed_from=self.start_epoch if self.resume_from is not None else None, window=window,
                          metric=metric,
                          best={**self.tracker.state(), "dir": str(self.out / "best")}
                          if (self.out / "best").is_dir() and self.tracker.best is not None else None)

    def _write_model(self, target: Path, info: dict[str, Any] | None = None) -> None:
        """The policy's gathered weights (and the EMA's under target/ema, for final/), written by the main process
        into a temporary folder renamed to `target` when complete, so a crash never leaves a partial folder."""
        acc = self.accelerator
        acc.wait_for_everyone()
        tmp = self.out / f".tmp-{target.name}"
        if self.main and tmp.exists():
            shutil.rmtree(tmp)
        modules = [raw_module(self.policy.module)]
        with parallel.full_weights(modules, self.main):
            if self.main:
                self.policy.save(str(tmp))
        if self.ema is not None and info is None:
            with self.ema.swapped(named_trainable(self.policy)), parallel.full_weights(modules, self.main):
                if self.main:
                    self.policy.save(str(tmp / "ema"))
        if self.main:
            if info is not None:
                (tmp / f"{target.name}.json").write_text(json.dumps(info, indent=2) + "\n")
            _retarget_notes(tmp, target)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        acc.wait_for_everyone()


class _Stats:
    """Loss and metrics of an epoch's update: means over micro-batches and processes, maxima for max-metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.maxes: dict[str, float] = {}

    def add(self, res: Any) -> None:
        for k, v in {"loss": float(res.loss.detach().float().mean()),
                     **{k: float(v) for k, v in res.metrics.items()}}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        for k, v in res.max_metrics.items():
            self.maxes[k] = max(self.maxes.get(k, -math.inf), float(v))

    def reduce(self, accelerator: Any) -> dict[str, float]:
        out = {}
        keys = sorted(self.sums)
        if keys:
            means = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64,
                                 device=accelerator.device)
            means = accelerator.reduce(means, reduction="mean")
            out.update({k: float(v) for k, v in zip(keys, means.tolist())})
        mkeys = sorted(self.maxes)
        if mkeys:
            mx = torch.tensor([self.maxes[k] for k in mkeys], dtype=torch.float64, device=accelerator.device)
            mx = accelerator.gather(mx[None]).amax(0)
            out.update({k: float(v) for k, v in zip(mkeys, mx.tolist())})
        return out


def cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]

    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals)

    return Trajectory(sigmas=first.sigmas, stochastic=first.stochastic, final=cat("final"),
                      latents=cat("latents"), log_probs=cat("log_probs"))


def _retarget_notes(tmp: Path, final: Path) -> None:
    """Loading notes a policy wrote into `tmp` (README, JSON) name the folder they will be renamed to."""
    for f in tmp.rglob("*"):
        if f.is_file() and f.suffix in (".md", ".json") and f.stat().st_size < 2**20:
            text = f.read_text(encoding="utf-8", errors="surrogateescape")
            if str(tmp) in text:
                f.write_text(text.replace(str(tmp), str(final)), encoding="utf-8", errors="surrogateescape")


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, FlowFactoryError) else f"{type(error).__name__}: {error}"


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _media(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"videos": images} if images.ndim == 5 else {"images": images}


def _config_dump(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(cfg.model_dump_json())


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ (train.epochs may grow on resume; the guard and W&B logging may be changed)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}.{k}" if prefix else k
        if key in ("train.epochs", "output_dir") or key.startswith(("eval.guard", "train.wandb")):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, key)
        elif a != b:
            out.append(key)
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
