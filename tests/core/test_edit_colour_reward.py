"""The edit-colour reward against a computation written here pixel by pixel, its target and region forms, its
errors (no input image, no records, bad metadata), and the reward contract on records with sources."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from flowfactory.errors import RewardError
from flowfactory.prompts import Prompt
from flowfactory.registry import BuildContext, Registry
from flowfactory.testing import RewardContract, load_registry
from flowfactory.types import Samples

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(entry_points=False)


def reward(registry: Registry, **options: Any) -> Any:
    return registry.get("reward", "edit-colour").create(options, BuildContext())


def png(path: Path, pixels: np.ndarray) -> Path:
    """Save uint8 [H, W, 3] pixels as a PNG; returns the path."""
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def score(r: Any, images: torch.Tensor, records: list[Prompt]) -> torch.Tensor:
    out = r.score(Samples.of(records, group_ids=list(range(len(records))), images=images))
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(records),)
    return out


def by_hand(sample: np.ndarray, source: np.ndarray, target: tuple[float, float, float],
            box: tuple[float, float, float, float] | None, tolerance: float, keep_weight: float) -> float:
    """The reward's definition, one pixel at a time: sample [3, H, W] and source [3, H, W] floats."""
    _, h, w = sample.shape
    inside, outside = [], []
    for i in range(h):
        for j in range(w):
            cx, cy = (j + 0.5) / w, (i + 0.5) / h
            hit = box is None or (box[0] <= cx < box[2] and box[1] <= cy < box[3])
            (inside if hit else outside).append((i, j))
    mean = [sum(float(sample[c, i, j]) for i, j in inside) / len(inside) for c in range(3)]
    d2 = sum((mean[c] - target[c]) ** 2 for c in range(3))
    closeness = math.exp(-LN2 * d2 / tolerance**2)
    if not outside:
        return closeness
    change = sum(abs(float(sample[c, i, j]) - float(source[c, i, j])) for i, j in outside for c in range(3))
    return closeness - keep_weight * change / (3 * len(outside))


def test_a_perfect_edit_scores_one(registry: Registry, tmp_path: Path) -> None:
    """A blue source whose centre square turned exactly red, the rest untouched: 1; the source itself scores the
    colour term of blue alone."""
    src = np.zeros((8, 8, 3), dtype=np.uint8)
    src[..., 2] = 255
    record = Prompt("make the square red", images=[png(tmp_path / "blue.png", src)],
                    metadata={"region": [0.25, 0.25, 0.75, 0.75]})
    edited = torch.zeros(1, 3, 8, 8)
    edited[:, 2] = 1.0
    edited[:, :, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    untouched = torch.zeros(1, 3, 8, 8)
    untouched[:, 2] = 1.0
    got = score(reward(registry), torch.cat([edited, untouched]), [record, record])
    assert float(got[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(got[1]) == pytest.approx(math.exp(-LN2 * 2.0 / 0.35**2), rel=1e-5)  # blue vs red: d^2 = 2


@pytest.mark.parametrize("box", [None, (0.1, 0.0, 0.6, 0.45), (0.0, 0.5, 1.0, 1.0)])
@pytest.mark.parametrize("tolerance,keep_weight", [(0.35, 1.0), (0.8, 2.5)])
def test_equals_the_definition_on_random_images(registry: Registry, tmp_path: Path, box: Any, tolerance: float,
                                                 keep_weight: float) -> None:
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    metadata = {"colour": [0.2, 0.7, 0.4]} | ({} if box is None else {"region": list(box)})
    record = Prompt("recolour part of it", images=[png(tmp_path / "src.png", source)], metadata=metadata)
    samples = torch.from_numpy(rng.random((2, 3, 10, 12), dtype=np.float32))
    got = score(reward(registry, tolerance=tolerance, keep_weight=keep_weight), samples, [record, record])
    src = source.transpose(2, 0, 1).astype(np.float64) / 255.0
    for k in range(2):
        expected = by_hand(samples[k].double().numpy(), src, (0.2, 0.7, 0.4), box, tolerance, keep_weight)
        assert float(got[k]) == pytest.approx(expected, abs=2e-6)


def test_a_larger_source_is_averaged_down_to_the_sample(registry: Registry, tmp_path: Path) -> None:
    """A 16x16 source of 2x2 blocks, 8x8 samples: the source seen by the reward is the block means."""
    rng = np.random.default_rng(5)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    record = Prompt("make the left half green", images=[png(tmp_path / "big.png", source)],
                    metadata={"region": [0.0, 0.0, 0.5, 1.0]})
    sample = torch.from_numpy(rng.random((1, 3, 8, 8), dtype=np.float32))
    got = score(reward(registry), sample, [record])
    src = source.astype(np.float64).reshape(8, 2, 8, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1) / 255.0
    expected = by_hand(sample[0].double().numpy(), src, (0.0, 0.8, 0.0), (0.0, 0.0, 0.5, 1.0), 0.35, 1.0)
    assert float(got[0]) == pytest.approx(expected, abs=2e-6)


def test_target_forms(tmp_path: Path) -> None:
    from flowfactory.rewards.builtin import EditColour

    src = png(tmp_path / "s.png", np.zeros((4, 4, 3)))

    def target(text: str, **metadata: Any) -> tuple[float, float, float]:
        return EditColour.target(Prompt(text, images=[src], metadata=metadata))

    assert target("make it pop", colour="Magenta") == (1.0, 0.0, 1.0)
    assert target("make it pop", color="#ff8000") == pytest.approx((1.0, 128 / 255, 0.0))
    assert target("make it pop", colour=[0, 0.5, 1]) == (0.0, 0.5, 1.0)
    assert target("turn the square yellow") == (1.0, 1.0, 0.0)  # from the instruction
    assert target("turn the square yellow", colour="blue") == (0.0, 0.0, 1.0)  # metadata wins
    for bad in ("mauve", "#12345", [1, 2, 3], [0.5, 0.5], True):
        with pytest.raises(RewardError, match=r"edit-colour: the prompt 'make it pop' has colour"):
            target("make it pop", colour=bad)
    with pytest.raises(RewardError, match=r"'make it pop' names no target colour.*`colour` in its metadata"):
        target("make it pop")


def test_region_errors_name_the_prompt(registry: Registry, tmp_path: Path) -> None:
    src = png(tmp_path / "s.png", np.zeros((8, 8, 3)))
    for box in ([0.5, 0.2, 0.4, 0.9], [0, 0, 1], [0, 0, 1.5, 1], "top"):
        record = Prompt("make it red", images=[src], metadata={"region": box})
        with pytest.raises(RewardError, match=r"'make it red' has region .*\[x0, y0, x1, y1\]"):
            score(reward(registry), torch.zeros(1, 3, 8, 8), [record])
    tiny = Prompt("make it red", images=[src], metadata={"region": [0.0, 0.0, 0.05, 0.05]})
    with pytest.raises(RewardError, match="holds no pixel centre of a 8x8 sample"):
        score(reward(registry), torch.zeros(1, 3, 8, 8), [tiny])


def test_a_sample_without_an_input_image_is_an_error(registry: Registry, tmp_path: Path) -> None:
    ok = Prompt("make it red", images=[png(tmp_path / "s.png", np.zeros((8, 8, 3)))])
    with pytest.raises(RewardError, match=r"edit-colour: the prompt 'a red square' has no input image"):
        score(reward(registry), torch.zeros(2, 3, 8, 8), [ok, Prompt("a red square")])
    bare = Samples(prompts=["make it red"], images=torch.zeros(1, 3, 8, 8), group_ids=[0])  # no records
    with pytest.raises(RewardError, match=r"carry no prompt records \(Samples.inputs\)"):
        reward(registry).score(bare)


def test_gradient_equals_finite_differences(registry: Registry, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    record = Prompt("make it cyan", images=[png(tmp_path / "s.png", rng.integers(0, 256, (6, 6, 3)))],
                    metadata={"region": [0.0, 0.0, 0.5, 0.5]})
    r = reward(registry, tolerance=0.6)
    x = torch.from_numpy(rng.uniform(0.1, 0.9, (1, 3, 6, 6)).astype(np.float32)).requires_grad_(True)
    (grad,) = torch.autograd.grad(score(r, x, [record]).sum(), x)
    eps = 1e-3
    for c, i, j in [(0, 0, 0), (1, 2, 1), (2, 4, 4), (0, 5, 2)]:  # two inside the region, two outside
        up, down = x.detach().clone(), x.detach().clone()
        up[0, c, i, j] += eps
        down[0, c, i, j] -= eps
        numeric = (float(score(r, up, [record])[0]) - float(score(r, down, [record])[0])) / (2 * eps)
        assert float(grad[0, c, i, j]) == pytest.approx(numeric, abs=2e-3)


class TestEditColourContract(RewardContract):
    """The reward contract on samples whose records carry sources and name a colour and region."""

    component = "edit-colour"

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _records(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        folder = tmp_path_factory.mktemp("edit-sources")
        rng = np.random.default_rng(0)
        cls.records = [Prompt(text, images=[png(folder / f"{k}.png", rng.integers(0, 256, (20, 20, 3)))],
                              metadata={"region": [0.2, 0.2, 0.8, 0.8]})
                       for k, text in enumerate(cls.prompts)]

    @classmethod
    def samples(cls, images: torch.Tensor | None = None, videos: torch.Tensor | None = None,
                rows: Any = None) -> Samples:
        n = len(cls.prompts) * cls.group_size
        rows = list(range(n)) if rows is None else list(rows)
        groups = [r // cls.group_size for r in rows]
        return Samples.of([cls.records[g] for g in groups], group_ids=groups,
                          images=None if images is None else images[rows])
