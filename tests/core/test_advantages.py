"""Advantages against a numpy computation written here: group mean, population std (group or global),
clipping, and the two ways of combining several rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowfactory.train.advantages import EPS, compute_advantages, group_normalize


def np_group_normalize(r: np.ndarray, ids: np.ndarray, std: str, eps: float = EPS) -> np.ndarray:
    """(r - group mean) / (scale + eps), scale = population std of the group, of everything, or 1 (no eps)."""
    out = np.empty_like(r, dtype=np.float64)
    for g in np.unique(ids):
        sel = ids == g
        centred = r[sel] - r[sel].mean()
        if std == "group":
            out[sel] = centred / (r[sel].std(ddof=0) + eps)
        elif std == "global":
            out[sel] = centred / (r.std(ddof=0) + eps)
        else:
            out[sel] = centred
    return out


def rewards_and_ids(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """12 rollouts of 3 prompts with interleaved, non-contiguous group ids and groups of unequal size."""
    rng = np.random.default_rng(seed)
    ids = np.array([7, 3, 7, 11, 3, 7, 11, 3, 7, 3, 11, 7])
    r = rng.normal(size=ids.size) * np.where(ids == 3, 10.0, 1.0)  # one group on a much larger scale
    return r, ids


def test_group_normalize_by_hand() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_normalize(r, ids, "group")
    s0, s1 = np.sqrt(2 / 3), np.sqrt(200.0)  # population stds of [1, 2, 3] and [10, 10, 40]
    expected = [-1 / (s0 + EPS), 0.0, 1 / (s0 + EPS), -10 / (s1 + EPS), -10 / (s1 + EPS), 20 / (s1 + EPS)]
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_group_normalize_matches_numpy_with_interleaved_ids(std: str) -> None:
    r, ids = rewards_and_ids()
    adv = group_normalize(torch.tensor(r, dtype=torch.float32), torch.tensor(ids), std)
    np.testing.assert_allclose(adv.numpy(), np_group_normalize(r.astype(np.float32).astype(np.float64), ids, std),
                               rtol=1e-5, atol=1e-6)
    for g in np.unique(ids):  # every group is centred
        assert abs(float(adv[torch.tensor(ids == g)].sum())) < 1e-4


def test_group_std_equalises_group_scales_and_global_std_keeps_them() -> None:
    r, ids = rewards_and_ids(1)
    big = torch.tensor(ids == 3)
    group = group_normalize(torch.tensor(r), torch.tensor(ids), "group")
    glob = group_normalize(torch.tensor(r), torch.tensor(ids), "global")
    for g in np.unique(ids):  # each group's spread becomes 1 (up to eps)
        sel = torch.tensor(ids == g)
        s = r[ids == g].std(ddof=0)
        assert float(group[sel].std(correction=0)) == pytest.approx(s / (s + EPS), rel=1e-5)
    assert float(glob[big].std(correction=0)) > 5 * float(glob[~big].std(correction=0))


def test_group_order_does_not_matter() -> None:
    r, ids = rewards_and_ids(2)
    perm = np.random.default_rng(0).permutation(ids.size)
    for std in ("group", "global", "none"):
        a = group_normalize(torch.tensor(r), torch.tensor(ids), std)
        b = group_normalize(torch.tensor(r[perm]), torch.tensor(ids[perm]), std)
        torch.testing.assert_close(b, a[perm])


def test_equal_rewards_give_zero_not_nan() -> None:
    adv = group_normalize(torch.tensor([0.5, 0.5, 0.5, 1.0]), torch.tensor([0, 0, 0, 1]), "group")
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_compute_advantages_sum_normalises_the_weighted_sum() -> None:
    r, ids = rewards_and_ids(3)
    r2 = np.random.default_rng(9).uniform(size=r.size) * 100
    rewards = {"a": torch.tensor(r, dtype=torch.float32), "b": torch.tensor(r2, dtype=torch.float32)}
    adv, total = compute_advantages(rewards, {"a": 2.0, "b": 0.5}, torch.tensor(ids), std="group", clip=None)
    expected_total = 2.0 * r.astype(np.float32) + 0.5 * r2.astype(np.float32)
    np.testing.assert_allclose(total.numpy(), expected_total, rtol=1e-6)
    np.testing.assert_allclose(adv.numpy(), np_group_normalize(expected_total, ids, "group"), rtol=1e-5, atol=1e-6)
    assert adv.dtype == torch.float32 and total.dtype == torch.float32


def test_compute_advantages_group_normalize_weights_each_normalised_reward() -> None:
    r, ids = rewards_and_ids(4)
    r2 = np.random.default_rng(5).uniform(size=r.size) * 1000  # a reward on a much larger scale
    rewards = {"a": torch.tensor(r, dtype=torch.float32), "b": torch.tensor(r2, dtype=torch.float32)}
    weights = {"a": 0.7, "b": 0.3}
    adv, total = compute_advantages(rewards, weights, torch.tensor(ids), std="group", clip=None,
                                    combine="group-normalize")
    a32, b32 = r.astype(np.float32).astype(np.float64), r2.astype(np.float32).astype(np.float64)
    expected = 0.7 * np_group_normalize(a32, ids, "group") + 0.3 * np_group_normalize(b32, ids, "group")
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total.numpy(), 0.7 * a32 + 0.3 * b32, rtol=1e-6)
    # With a plain sum the large-scale reward drowns the other; normalising first keeps both in play.
    summed, _ = compute_advantages(rewards, weights, torch.tensor(ids), std="group", clip=None)
    corr_sum = np.corrcoef(summed.numpy(), np_group_normalize(a32, ids, "group"))[0, 1]
    corr_norm = np.corrcoef(adv.numpy(), np_group_normalize(a32, ids, "group"))[0, 1]
    assert corr_norm > corr_sum + 0.2


def test_compute_advantages_gdpo_normalises_the_weighted_sum_over_the_batch() -> None:
    """GDPO (arXiv 2601.05242): per-reward group normalisation, weighted sum, then batch normalisation."""
    r, ids = rewards_and_ids(4)
    r2 = np.random.default_rng(6).uniform(size=r.size) * 50
    rewards = {"a": torch.tensor(r, dtype=torch.float32), "b": torch.tensor(r2, dtype=torch.float32)}
    adv, _ = compute_advantages(rewards, {"a": 1.0, "b": 2.0}, torch.tensor(ids), clip=None, combine="gdpo")
    a32, b32 = r.astype(np.float32).astype(np.float64), r2.astype(np.float32).astype(np.float64)
    summed = np_group_normalize(a32, ids, "group") + 2.0 * np_group_normalize(b32, ids, "group")
    expected = (summed - summed.mean()) / (summed.std() + 1e-4)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std(unbiased=False)) - 1.0) < 1e-3
    # the range does not grow with the number of rewards, unlike group-normalize's sum
    many = {f"r{k}": torch.tensor(np.random.default_rng(k).uniform(size=r.size), dtype=torch.float32)
            for k in range(6)}
    weights = dict.fromkeys(many, 1.0)
    gn, _ = compute_advantages(many, weights, torch.tensor(ids), clip=None, combine="group-normalize")
    gd, _ = compute_advantages(many, weights, torch.tensor(ids), clip=None, combine="gdpo")
    assert float(gn.std()) > 1.5 and abs(float(gd.std(unbiased=False)) - 1.0) < 1e-3


@pytest.mark.parametrize("std", ["global", "none"])
def test_compute_advantages_std_modes(std: str) -> None:
    r, ids = rewards_and_ids(6)
    adv, _ = compute_advantages({"a": torch.tensor(r, dtype=torch.float32)}, {"a": 1.5}, torch.tensor(ids),
                                std=std, clip=None)
    expected = np_group_normalize(1.5 * r.astype(np.float32).astype(np.float64), ids, std)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_clipping() -> None:
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0])  # one outlier: advantage sqrt(7) ~ 2.65
    ids = torch.zeros(8, dtype=torch.long)
    unclipped, _ = compute_advantages({"a": r}, {"a": 1.0}, ids, clip=None)
    assert float(unclipped[-1]) == pytest.approx(np.sqrt(7.0), rel=1e-3)
    clipped, _ = compute_advantages({"a": r}, {"a": 1.0}, ids, clip=1.0)
    assert float(clipped[-1]) == 1.0
    torch.testing.assert_close(clipped[:-1], unclipped[:-1])  # inside [-1, 1]: unchanged
    wide, _ = compute_advantages({"a": r}, {"a": 1.0}, ids, clip=5.0)
    torch.testing.assert_close(wide, unclipped)
    none_std, _ = compute_advantages({"a": r}, {"a": 1.0}, ids, std="none", clip=3.0)
    assert float(none_std[-1]) == 3.0 and none_std[:-1].tolist() == pytest.approx([-3.0] * 7)


def test_single_rollout_groups_get_zero_advantage() -> None:
    adv, _ = compute_advantages({"a": torch.tensor([3.0, 1.0, 2.0])}, {"a": 1.0}, torch.tensor([0, 1, 2]))
    assert adv.tolist() == [0.0, 0.0, 0.0]
