"""Online Diffusion-DPO for flow matching.

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization", eq. 14;
reference SalesforceAIResearch/DiffusionDPO `train.py`) trains on preference pairs (x_w preferred to x_l) against
a frozen reference model. Here the pairs come online, from each group of the epoch's rollouts (rollouts of one
prompt), ranked by their combined reward, and the noise-prediction errors become flow-matching velocity errors.
For a pair, at a noise level t with one eps shared by both rollouts:

    x_t^i = (1 - t) x0^i + t eps,                 i in {w, l}
    e^i   = mean over latent dims of (v_theta(x_t^i, t) - (eps - x0^i))^2       e_ref^i: the same with v_ref
    L     = -log sigmoid(-beta / 2 * ((e^w - e_ref^w) - (e^l - e_ref^l)))

Each of the K units draws its own (t, eps) per pair, from a generator seeded by the run seed and both rows' keys,
so a pair trains on the same draws whatever its micro-batch or process. A row's loss is the mean of its group's
pair losses (0 in a group without a pair), so the loop's mean over rows is the mean over groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flowfactory.algorithms import stratified_times
from flowfactory.errors import FlowFactoryError
from flowfactory.seeding import randn_per_sample, sample_seed
from flowfactory.types import LossOutput, OptimizerHooks, Policy, Requirements, Sampler, TrainBatch, select_rows

_STREAM = 0x44504F  # "DPO": keeps this optimizer's seeds apart from the loop's and other algorithms'


@dataclass
class DPOUnit:
    """One work unit: the k-th noise level of every pair of a micro-batch.

    pairs: (winner row, loser row) per pair; times: [P] float32; noise_seeds: the seed of each pair's eps."""

    index: int
    pairs: tuple[tuple[int, int], ...]
    times: torch.Tensor
    noise_seeds: tuple[int, ...]


def form_pairs(batch: TrainBatch, mode: str, min_gap: float) -> list[tuple[int, int]]:
    """(winner, loser) rows within each group of the batch, by the rows' combined rewards."""
    if batch.group_ids is None or batch.rewards is None:
        raise FlowFactoryError("optimizer `dpo` needs batches that carry group_ids and rewards (the training loop "
                               "gives them)")
    rewards = batch.rewards.detach().double().cpu().tolist()
    pairs: list[tuple[int, int]] = []
    for rows in batch.groups():
        if mode == "best-worst":
            best = max(rows, key=lambda i: rewards[i])  # the first of equal maxima, in the group's row order
            worst = min(rows, key=lambda i: rewards[i])
            if rewards[best] - rewards[worst] > min_gap:
                pairs.append((best, worst))
        else:
            for a, i in enumerate(rows):
                for j in rows[a + 1:]:
                    if rewards[i] - rewards[j] > min_gap:
                        pairs.append((i, j))
                    elif rewards[j] - rewards[i] > min_gap:
                        pairs.append((j, i))
    return pairs


def dpo_pair_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log sigmoid(inside) [P], inside [P]), inside = -beta / 2 ((e_w - e_w_ref) - (e_l - e_l_ref))."""
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(inside), inside


class DPO(OptimizerHooks):
    """The `dpo` policy optimizer (see the module docstring for the objective). Any sampler serves: DPO trains on
    the final samples of deterministic rollouts, so the inherited `setup` has nothing to refuse."""

    def __init__(self, options: Any, seed: int = 0):
        self.options = options
        self.seed = int(seed)
        offline = getattr(options, "source", "rollouts") == "dataset"  # chosen/rejected images of the prompt records
        self.requirements = Requirements(keep="final", stochastic=False, reference=True, whole_groups=True,
                                         source="dataset" if offline else "rollouts",
                                         targets=("chosen", "rejected") if offline else ())

    def units(self, batch: TrainBatch) -> list[DPOUnit]:
        """The batch's pairs, and for each of the K units every pair's time and noise seed, from its rows' keys."""
        o = self.options
        pairs = tuple(form_pairs(batch, o.pairs, o.min_gap))
        keys = batch.row_keys()
        pair_keys = [(self.seed, _STREAM, *keys[w], *keys[lo]) for w, lo in pairs]
        times = [stratified_times(o.num_times, torch.Generator().manual_seed(sample_seed(*key, 0)), o.time_min,
                            o.time_max, o.time_shift) for key in pair_keys]
        return [DPOUnit(index=k, pairs=pairs,
                        times=torch.stack([t[k] for t in times]) if times else torch.zeros(0),
                        noise_seeds=tuple(sample_seed(*key, k + 1) for key in pair_keys))
                for k in range(o.num_times)]

    def loss(self, policy: Policy, sampler: Sampler, batch: TrainBatch, unit: DPOUnit) -> LossOutput:
        x0 = batch.trajectory.final
        n = len(x0)
        dims = tuple(range(1, x0.ndim))
        if not unit.pairs:
            # no pair in this micro-batch: one policy and one reference forward all the same (every process must run
            # the same forwards under FSDP, and DDP needs every parameter in the graph), times 0
            x = x0[:1]
            t = torch.full((1,), 0.5, device=x0.device)
            cond = select_rows(batch.cond, [0])
            with policy.reference():
                policy.velocity(x, t, cond)
            v = policy.velocity(x, t, cond)
            zero = torch.zeros((), dtype=torch.float64, device=x0.device)
            metrics = {k: zero for k in ("dpo/loss", "dpo/implicit_acc", "dpo/margin", "dpo/model_mse",
                                         "dpo/ref_mse", "dpo/pairs", "dpo/t")}
            return LossOutput(loss=(v.float().sum() * 0).expand(n), metrics=metrics)
        o = self.options
        w_rows = [w for w, _ in unit.pairs]
        l_rows = [lo for _, lo in unit.pairs]
        rows = w_rows + l_rows
        p = len(unit.pairs)
        eps = randn_per_sample(tuple(x0.shape[1:]), [torch.Generator().manual_seed(s) for s in unit.noise_seeds],
                               device=x0.device, dtype=x0.dtype)
        eps = torch.cat([eps, eps])  # one eps shared by the winner and the loser of a pair
        t = torch.cat([unit.times, unit.times]).to(x0.device)
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_rows = x0[rows]
        x_t = (1 - tb) * x_rows + tb * eps
        target = eps.double() - x_rows.double()
        cond = select_rows(batch.cond, rows)
        with policy.reference():
            v_ref = policy.velocity(x_t, t, cond)
        v = policy.velocity(x_t, t, cond)
        err = ((v.double() - target) ** 2).mean(dim=dims)
        ref = ((v_ref.detach().double() - target) ** 2).mean(dim=dims)
        pair_loss, inside = dpo_pair_loss(err[:p], err[p:], ref[:p], ref[p:], o.beta)
        # each row carries the mean pair loss of its group, so the loop's mean over rows is the mean over groups
        groups = batch.group_ids.tolist()
        per_group: dict[int, int] = {}
        for w in w_rows:
            per_group[groups[w]] = per_group.get(groups[w], 0) + 1
        share = torch.zeros(n, p, dtype=torch.float64, device=x0.device)
        for j, w in enumerate(w_rows):
            g = groups[w]
            for i in range(n):
                if groups[i] == g:
                    share[i, j] = 1.0 / per_group[g]
        loss = share @ pair_loss
        metrics: dict[str, Any] = {
            "dpo/loss": pair_loss.detach().mean(),
            "dpo/implicit_acc": (inside.detach() > 0).double().mean(),
            "dpo/margin": inside.detach().mean(),
            "dpo/model_mse": err.detach().mean(),
            "dpo/ref_mse": ref.mean(),
            "dpo/pairs": torch.tensor(float(p)),
            "dpo/t": unit.times.float().mean(),
        }
        return LossOutput(loss=loss.float(), metrics=metrics)
