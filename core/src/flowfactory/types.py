"""The four roles as protocols, and the data that flows between them.

Tensors are batch-first. Conditioning is a dict of batch-first tensors made by `Policy.encode`; the core
selects rows of it for micro-batches and never looks inside.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from flowfactory.prompts import Prompt

Conditioning = dict  # dict[str, torch.Tensor], every value batch-first


def select_rows(cond: Conditioning, idx: Any) -> Conditioning:
    """Rows `idx` (a slice, index tensor or list) of every tensor of a conditioning dict."""
    return {k: v[idx] for k, v in cond.items()}


@dataclass
class Trajectory:
    """One batch of rollouts from noise (sigma=1) to data (sigma=0).

    sigmas: [S+1] descending, sigmas[0] = 1 (or the policy's first), sigmas[S] = 0.
    stochastic: [S] bool, which steps were sampled with noise (an SDE step with a log-prob).
    latents: [B, S+1, *latent] every state x_0 (noise) .. x_S (data), or None when not kept.
    log_probs: [B, S] float32 Gaussian log-probability of x_{i+1} given x_i at stochastic steps (0
        elsewhere), or None when not kept.
    final: [B, *latent] the last state.
    """

    sigmas: torch.Tensor
    stochastic: torch.Tensor
    final: torch.Tensor
    latents: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.final.shape[0])

    def select(self, idx: Any) -> Trajectory:
        """The rollouts at batch rows `idx`."""
        return replace(
            self,
            final=self.final[idx],
            latents=None if self.latents is None else self.latents[idx],
            log_probs=None if self.log_probs is None else self.log_probs[idx],
        )

    def stochastic_steps(self) -> list[int]:
        return [int(i) for i in self.stochastic.nonzero().flatten().tolist()]

    def to(self, device: Any) -> Trajectory:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Trajectory(**{k: (v.to(device) if v is not None else None) for k, v in kw.items()})


@dataclass
class StepDistribution:
    """The Gaussian of one sampler step: x_next ~ N(mean, std^2) elementwise.

    std is 0 for a deterministic step. log_prob: [B] float32, the Gaussian log density of the next state
    averaged (not summed) over latent dims, as Flow-GRPO does (`flowfactory.samplers.gaussian_log_prob`)."""

    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None = None


@dataclass
class Samples:
    """What a reward sees.

    images: [B, C, H, W] float in [0, 1] for image models; videos: [B, T, C, H, W] in [0, 1] for video
    models (exactly one of the two is set). group_ids: [B] ints, rows with equal ids share a prompt.
    prompts: each row's prompt text. inputs: each row's prompt record (`flowfactory.prompts.Prompt`: input images
    via `inputs[i].load_images()`, `targets`, `metadata`) when the samples come from the loop; metadata: each
    row's record metadata (the extra fields of its .jsonl line). Build from records with `Samples.of`.
    """

    prompts: list[str]
    images: torch.Tensor | None = None
    videos: torch.Tensor | None = None
    group_ids: list[int] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[Prompt] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def of(cls, prompts: Sequence[str | Prompt], *, group_ids: Sequence[int] = (), images: torch.Tensor | None = None,
           videos: torch.Tensor | None = None) -> Samples:
        """Samples of prompt records (or plain strings): texts, records and their metadata filled in."""
        from flowfactory.prompts import as_prompts

        records = as_prompts(prompts)
        return cls(prompts=[r.text for r in records], images=images, videos=videos, group_ids=list(group_ids),
                   metadata=[dict(r.metadata) for r in records], inputs=records)


@runtime_checkable
class Policy(Protocol):
    """A trainable flow-matching model with its frozen encoders and decoder.

    Convention: x_sigma = (1 - sigma) * x_data + sigma * noise and the velocity is d x / d sigma's
    negative direction used by FlowMatchEuler: x_{next} = x + (sigma_next - sigma) * v, v ~ noise - data.

    Optional: `encode_image(images: list[torch.Tensor]) -> torch.Tensor`, the inverse of `decode` for dataset
    algorithms (SFT, offline DPO): images (each float32 [3, h, w] in [0, 1], any size) resized to the policy's
    resolution (shorter side scaled, centre crop) and encoded to clean latents [B, *latent_shape] (sigma 0), the
    encoder's deterministic mean, normalised and packed as the policy's own latents. No grad.
    """

    module: Any  # the trainable torch.nn.Module; the loop may replace it with its Accelerate-wrapped self
    fsdp_block_classes: tuple[type, ...]  # the transformer block classes FSDP wraps
    latent_shape: tuple[int, ...]  # per-sample shape of x as the sampler sees it (packed for FLUX)

    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """Frozen conditioning for prompt records (no grad), batch-first tensors, each row depending only on its
        own record: the text, and the input images of an image-conditioned model (`Prompt.load_images()`).
        Callers may pass plain strings; `flowfactory.prompts.texts(prompts)` gives the texts of either."""

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        """Initial noise [len(generators), *latent_shape], one generator per sample."""

    def sigmas(self, steps: int) -> torch.Tensor:
        """[steps + 1] descending sigmas ending at 0, with the model's own shift."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity for x at noise level sigma ([B] or scalar), CFG/guidance inside."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents to images [B, C, H, W] (or videos [B, T, C, H, W]) in [0, 1], float32. Differentiable: when x
        requires grad (and grad mode is on) the images keep the graph to it (reward back-propagation, `draft`);
        the decoder's own weights stay frozen."""

    def trainable_parameters(self) -> list[Any]:
        """The parameters the RL optimizer updates (LoRA weights, or the whole transformer)."""

    def reference(self) -> AbstractContextManager[None]:
        """Inside this context `velocity` is the reference (pre-training) policy, under no grad."""

    def save(self, directory: str) -> None:
        """Write the trained weights in diffusers / peft format."""


@runtime_checkable
class Sampler(Protocol):
    """Integrates from noise to data with a policy's velocity.

    Optional: `sde_type: ClassVar[str | None]` (None when absent), the SDE its stochastic steps follow (the built-in
    `flow-sde`, `dance-sde`, `cps`), for an algorithm whose derivation holds for one SDE only (GRPO-Guard)."""

    steps: int

    def rollout(
        self,
        policy: Policy,
        cond: Conditioning,
        noise: torch.Tensor,
        generators: list[torch.Generator],
        *,
        keep: Literal["steps", "final"] = "steps",
        deterministic: bool = False,
        epoch: int = 0,
    ) -> Trajectory:
        """Sample under no grad. deterministic=True integrates the ODE (eval)."""

    stochastic: bool  # capability: False for a purely deterministic (ODE) sampler without log-probs

    def step_distribution(
        self, policy: Policy, x: torch.Tensor, sigmas: torch.Tensor, i: int, cond: Conditioning,
        stochastic: bool = True,
    ) -> StepDistribution:
        """The distribution of x_{i+1} given x = x_i on the schedule `sigmas`, from the policy's velocity
        (with grad). stochastic=False gives the deterministic (ODE) step with std 0."""

    def log_prob(
        self, policy: Policy, trajectory: Trajectory, step: int, cond: Conditioning
    ) -> StepDistribution:
        """Recompute step `step`'s distribution and log-prob of the stored next state, with grad."""


@runtime_checkable
class Reward(Protocol):
    """Scores decoded samples; higher is better. Returns float32 [B] on CPU or the samples' device.

    Optional: `differentiable: ClassVar[bool]` (default False when absent). True promises that when the images
    (or videos) require grad and grad mode is on, `score` keeps the autograd graph from them to the scores, so
    an algorithm may back-propagate the reward into the policy (`draft`). Under `torch.no_grad` (how the loop
    scores rollouts) it must return the same numbers.
    """

    groupwise: ClassVar[bool]  # True: score() receives whole groups and may compare within them
    handles_video: ClassVar[bool]  # False: core scores videos as the mean over frames

    def score(self, samples: Samples) -> torch.Tensor: ...


@dataclass
class Requirements:
    """What the loop must keep from each rollout for an algorithm."""

    keep: Literal["steps", "final"] = "steps"  # per-step latents and log-probs, or final latents only
    stochastic: bool = True  # SDE rollout (True) or deterministic ODE rollout (False)
    reference: bool = True  # calls policy.reference() (a KL term); False spares a full finetune its frozen copy
    whole_groups: bool = False  # every micro-batch holds whole groups (pair losses): the loop shuffles groups
    # "rollouts": learn from the epoch's samples; "dataset": from the prompt records' target images (SFT, offline
    # DPO), nothing sampled: row j of a group takes target `targets[j % len(targets)]` of its record, VAE-encoded
    # by `policy.encode_image` as the trajectory's final latents, with reward 1 for targets[0] and 0 for the others
    source: Literal["rollouts", "dataset"] = "rollouts"
    targets: tuple[str, ...] = ()  # the record fields a dataset algorithm reads, e.g. ("target",), ("chosen", "rejected")


@dataclass
class LossOutput:
    """Per-sample loss [B] (the loop averages over the whole optimizer step), and metrics.

    metrics: name -> scalar tensor, averaged over micro-batches. max_metrics: name -> scalar tensor,
    reduced by max (e.g. `logprob/agreement`)."""

    loss: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    max_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainBatch:
    """A micro-batch handed to a policy optimizer.

    `sample_keys` name each row for randomness; the loop gives (epoch, inner epoch, global sample index). An
    algorithm that draws per-sample randomness (training times, forward-process noise) seeds each row from its
    key (`row_keys`), so the draws depend neither on how rows fall into micro-batches nor on the process count;
    a draw shared by many rows comes from `pass_key()`, common to the whole pass over the epoch's samples.
    `group_ids` ([B] int64, the epoch's global group of each row: rows of one prompt share it) and `rewards`
    ([B] float32, the combined reward) let an algorithm compare rows within a group; with
    `Requirements.whole_groups` every group in a micro-batch is complete. `prompts` are the rows' prompts (an
    algorithm that scores its own decodes, like `draft`, builds `Samples` from them).
    """

    trajectory: Trajectory
    cond: Conditioning
    advantages: torch.Tensor  # [B] float32
    fresh: bool  # True while the policy still equals the one that sampled (first update of the epoch)
    sample_keys: tuple[tuple[int, ...], ...] | None = None
    group_ids: torch.Tensor | None = None  # [B] int64
    rewards: torch.Tensor | None = None  # [B] float32
    prompts: list[Prompt] | None = None  # [B], each row's prompt record

    def pass_key(self) -> tuple[int, ...]:
        """A key every row of this pass shares: the rows' keys without their last (per-sample) part, i.e.
        (epoch, inner epoch) from the loop; () for a batch built without keys."""
        if self.sample_keys is None:
            return ()
        prefixes = {tuple(int(v) for v in key[:-1]) for key in self.sample_keys}
        if len(prefixes) != 1:
            raise ValueError(f"TrainBatch: rows from different passes {sorted(prefixes)} share a micro-batch")
        return prefixes.pop()

    def groups(self) -> list[list[int]]:
        """Row indexes of each group, in order of first appearance (requires `group_ids`)."""
        if self.group_ids is None:
            raise ValueError("TrainBatch: this batch carries no group_ids")
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids.tolist()):
            out.setdefault(int(g), []).append(i)
        return list(out.values())

    def row_keys(self) -> list[tuple[int, ...]]:
        """One integer key per row: `sample_keys`, or (row index,) for a batch built without them."""
        n = len(self.advantages)
        if self.sample_keys is None:
            return [(i,) for i in range(n)]
        if len(self.sample_keys) != n:
            raise ValueError(f"TrainBatch: {len(self.sample_keys)} sample_keys for {n} rows")
        return [tuple(int(v) for v in key) for key in self.sample_keys]

    def select(self, rows: slice | torch.Tensor | list[int], fresh: bool | None = None) -> TrainBatch:
        """The batch restricted to `rows` (trajectory, conditioning, advantages and keys alike)."""
        index = range(len(self.advantages))[rows] if isinstance(rows, slice) else [int(i) for i in rows]
        keys = self.row_keys()
        return TrainBatch(trajectory=self.trajectory.select(rows), cond=select_rows(self.cond, rows),
                          advantages=self.advantages[rows], fresh=self.fresh if fresh is None else fresh,
                          sample_keys=None if self.sample_keys is None else tuple(keys[i] for i in index),
                          group_ids=None if self.group_ids is None else self.group_ids[rows],
                          rewards=None if self.rewards is None else self.rewards[rows],
                          prompts=None if self.prompts is None else [self.prompts[i] for i in index])


@runtime_checkable
class PolicyOptimizer(Protocol):
    """An RL algorithm: declares what rollouts keep, and computes a micro-batch loss.

    Every algorithm subclasses `OptimizerHooks`, which gives the loop's other calls their defaults:
    `check_sampler(sampler) -> str | None`, `sampling(policy)` (context the epoch's rollouts run in),
    `on_rollout(policy)`, `on_step(policy)`, `on_epoch_end(policy)`, `state_dict()` / `load_state_dict(state)`
    (checkpointed), `bind_rewards(rewards)` (the run's `RewardSet`, once after it is built), and a `setup` that
    refuses an incompatible sampler.
    """

    requirements: Requirements

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        """Check compatibility with the sampler and policy; raise FlowFactoryError if not."""

    def units(self, batch: TrainBatch) -> list[Any]:
        """Work units of one micro-batch, each its own forward/backward (e.g. GRPO's trained steps)."""

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: Any) -> LossOutput: ...


class OptimizerHooks:
    """The base class of every policy optimizer (RL algorithm): defaults for the loop's calls besides `units` and
    `loss`; subclass it and override what you need. The run refuses an algorithm that does not subclass it.

    The loop calls them in this order each epoch: `sampling(policy)` wraps the rollout (e.g. DiffusionNFT
    samples with an EMA "old" policy swapped in), `on_rollout(policy)` runs once the rollouts exist and
    before any update, `on_step(policy)` after every optimizer step (e.g. to update an EMA), and
    `on_epoch_end(policy)` after the epoch's last step, before its checkpoint (e.g. a per-epoch EMA update).
    Whatever `state_dict()` returns is saved in checkpoints and given back to `load_state_dict` on `--resume`,
    so a resumed run equals an uninterrupted one. `setup` comes before `load_state_dict` and after the policy is
    sharded.
    """

    requirements: Requirements  # set by the subclass, as a class attribute or in __init__

    def check_sampler(self, sampler: Sampler) -> str | None:
        """A problem message if this algorithm cannot use `sampler` beyond what `requirements` say (e.g. a needed
        `sde_type`), else None. Read sampler capabilities (attributes), not sampler classes."""
        return None

    def sampler_problem(self, sampler: Sampler, name: str) -> str | None:
        """Why this algorithm cannot use `sampler` (called `name` in the message), or None: a stochastic rollout
        (`requirements.stochastic`) needs a sampler whose `stochastic` capability is true, then `check_sampler`
        has its say. The one compatibility check: `ff validate`, the loop and the default `setup` all make it."""
        if self.requirements.stochastic and not sampler.stochastic:
            return f"needs a stochastic sampler with log-probabilities, but {name} is deterministic; use e.g. `flow-sde`"
        problem = self.check_sampler(sampler)
        return None if problem is None else f"cannot use sampler {name}: {problem}"

    def setup(self, policy: Policy, sampler: Sampler) -> None:
        """Refuses an incompatible sampler (FlowFactoryError at `sampler.name`). An override that builds state
        from the policy (a snapshot, an EMA) calls `super().setup(policy, sampler)` first."""
        problem = self.sampler_problem(sampler, type(sampler).__name__)
        if problem:
            from flowfactory.errors import FlowFactoryError

            raise FlowFactoryError(f"sampler.name: {type(self).__name__} {problem}")

    def sampling(self, policy: Policy) -> AbstractContextManager[None]:
        from contextlib import nullcontext

        return nullcontext()

    def on_rollout(self, policy: Policy) -> None:
        return None

    def on_step(self, policy: Policy) -> None:
        return None

    def on_epoch_end(self, policy: Policy) -> None:
        return None

    def bind_rewards(self, rewards: Any) -> None:
        """The run's training rewards (`flowfactory.train.rewards.RewardSet`: `.rewards` is [(name, reward,
        weight)] in config order), handed over once after they are built and before `setup`. An algorithm
        that differentiates the rewards (`draft`) keeps them, and raises FlowFactoryError naming a reward it
        cannot use."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
