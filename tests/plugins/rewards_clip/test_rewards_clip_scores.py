"""Each CLIP reward's score against an independent computation: stock CLIPProcessor (PIL) preprocessing and
CLIPModel.get_image_features / get_text_features, the formulas written out here."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from flowfactory.types import Samples

PROMPTS = ["a red square", "a blue circle on a white field", "a red square"]  # one repeats


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is it (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def grid_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random images already on the 8-bit grid (k / 255), so PIL's uint8 conversion loses nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arr = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def stock_embeddings(folder: Any, images: torch.Tensor, prompts: list[str]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model at `folder`, and normalised image and text embeddings through CLIPProcessor on PIL images."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=pil(images), return_tensors="pt", padding=True, truncation=True,
                       max_length=model.config.text_config.max_position_embeddings)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"]))
    return model, img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def images(tiny: Any) -> torch.Tensor:
    return grid_images(len(PROMPTS), tiny.image)  # at the processor's size: resize and crop are the identity


def test_pickscore_is_logit_scale_times_cosine(make_reward: Any, tiny: Any, images: torch.Tensor) -> None:
    model, img, txt = stock_embeddings(tiny.clip, images, PROMPTS)
    expected = model.logit_scale.exp() * (img * txt).sum(-1)
    got = make_reward("pickscore").score(Samples(prompts=PROMPTS, images=images, group_ids=[0, 1, 2]))
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.1  # a real score, not a degenerate zero


def test_clip_score_is_scaled_cosine(make_reward: Any, tiny: Any, images: torch.Tensor) -> None:
    _, img, txt = stock_embeddings(tiny.clip, images, PROMPTS)
    samples = Samples(prompts=PROMPTS, images=images, group_ids=[0, 1, 2])
    torch.testing.assert_close(make_reward("clip-score").score(samples), (img * txt).sum(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(make_reward("clip-score", scale=100.0).score(samples), 100 * (img * txt).sum(-1),
                               atol=1e-4, rtol=1e-5)


def test_aesthetic_is_the_mlp_over_normalised_image_embeddings(make_reward: Any, tiny: Any,
                                                               images: torch.Tensor) -> None:
    _, img, _ = stock_embeddings(tiny.clip, images, PROMPTS)
    sd = tiny.aesthetic_sd
    x = img.double()
    for i in (0, 2, 4, 6, 7):  # Linear layers only: dropout is the identity at inference, no activations
        x = x @ sd[f"layers.{i}.weight"].double().T + sd[f"layers.{i}.bias"].double()
    expected = x.squeeze(-1).float()
    samples = Samples(prompts=PROMPTS, images=images, group_ids=[0, 1, 2])
    from_st = make_reward("aesthetic").score(samples)
    from_pth = make_reward("aesthetic", weights=str(tiny.aesthetic_pth)).score(samples)
    torch.testing.assert_close(from_st, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(from_st, from_pth)


def test_hpsv2_scores_with_the_checkpoint_weights(make_reward: Any, tiny: Any, images: torch.Tensor) -> None:
    """The open_clip-layout checkpoint's model (seed 2), not the architecture folder's own weights (seed 1)."""
    reward = make_reward("hpsv2")
    ours = reward.embedder.model.state_dict()
    for key, value in tiny.hps_model.state_dict().items():
        assert torch.equal(ours[key], value), key  # conversion round trip: every tensor back exactly
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny.hps_model.save_pretrained(d)
        from transformers import CLIPProcessor

        CLIPProcessor.from_pretrained(tiny.arch).save_pretrained(d)
        _, img, txt = stock_embeddings(d, images, PROMPTS)
    got = reward.score(Samples(prompts=PROMPTS, images=images, group_ids=[0, 1, 2]))
    torch.testing.assert_close(got, (img * txt).sum(-1), atol=1e-6, rtol=1e-5)


def hand_rank(values: list[float]) -> list[float]:
    """(average rank - 1) / (n - 1), ranks counted one by one."""
    n = len(values)
    if n == 1:
        return [0.5]
    out = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        out.append((below + (equal + 1) / 2 - 1) / (n - 1))
    return out


def test_pickscore_rank_against_a_hand_computation(make_reward: Any, tiny: Any) -> None:
    base = grid_images(5, tiny.image, seed=3)
    # group 7: four rows with a tie (rows 1 and 3 are the same image); group 2 interleaved; group 9 alone
    images = torch.stack([base[0], base[1], base[2], base[1], base[3], base[4], base[2]])
    groups = [7, 7, 2, 7, 7, 2, 9]
    prompts = ["a red square" if g == 7 else "a blue circle" for g in groups]
    samples = Samples(prompts=prompts, images=images, group_ids=groups)
    raw = make_reward("pickscore").score(samples).tolist()
    assert raw[1] == raw[3] and len(set(raw[i] for i in (0, 1, 3, 4))) == 3
    expected = [0.0] * len(groups)
    for g in set(groups):
        rows = [i for i, h in enumerate(groups) if h == g]
        for i, r in zip(rows, hand_rank([raw[i] for i in rows])):
            expected[i] = r
    got = make_reward("pickscore-rank").score(samples)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-7)
    assert got[[1, 3]].tolist() == [got[1].item()] * 2 and got[6].item() == 0.5


def test_pickscore_rank_ranks_a_video_by_its_mean_frame_score(make_reward: Any) -> None:
    videos = torch.rand(3, 2, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    samples = Samples(prompts=["a cat"] * 3, videos=videos, group_ids=[0, 0, 0])
    frames = Samples(prompts=["a cat"] * 6, images=videos.flatten(0, 1), group_ids=[0] * 6)
    means = make_reward("pickscore").score(frames).view(3, 2).mean(1).tolist()
    got = make_reward("pickscore-rank").score(samples)
    assert got.tolist() == pytest.approx(hand_rank(means))


def test_batching_dtype_and_text_cache(make_reward: Any, tiny: Any) -> None:
    """batch_size 1 equals one batch; each distinct prompt is tokenized once per call; bfloat16 is close to
    float32 and still returns float32; 1-channel images score as their grey RGB; long prompts are truncated."""
    images = torch.rand(4, 3, 30, 20, generator=torch.Generator().manual_seed(5))
    prompts = ["a red square", "a red square", "a cat " * 40, "a red square"]
    samples = Samples(prompts=prompts, images=images, group_ids=[0, 0, 1, 0])
    one = make_reward("pickscore", batch_size=1)
    full = make_reward("pickscore")
    torch.testing.assert_close(one.score(samples), full.score(samples), atol=1e-5, rtol=1e-5)
    seen: list[list[str]] = []
    tokenizer = full.embedder.tokenizer
    full.embedder.tokenizer = lambda texts, **kw: seen.append(list(texts)) or tokenizer(texts, **kw)
    full.score(samples)
    full.embedder.tokenizer = tokenizer
    assert sorted(t for call in seen for t in call) == sorted({"a red square", "a cat " * 40})
    half = make_reward("pickscore", dtype="bfloat16")
    assert half.embedder.model.text_projection.weight.dtype == torch.bfloat16
    bf16 = half.score(samples)
    assert bf16.dtype == torch.float32
    assert (bf16 - full.score(samples)).abs().max() < 0.05 * full.score(samples).abs().max()
    grey = images[:, :1]
    torch.testing.assert_close(full.score(Samples(prompts=prompts, images=grey)),
                               full.score(Samples(prompts=prompts, images=grey.expand(-1, 3, -1, -1))))


def test_device_preprocessing_matches_clip_processor(tiny: Any) -> None:
    """The device transform against CLIPProcessor's PIL path on 8-bit images of several shapes (down- and
    upsampling, portrait and landscape, smooth content and pixel noise). PIL rounds each of its two resize passes
    to 1/255 and the device path does not: 0.5/255 from the final rounding plus 0.5/255 from the intermediate
    one, spread by the bicubic filter (sum of |weights| about 1.1); with margin for PIL's fixed-point filter
    weights the bound is 1.25/255 per pixel, / min(std) = 0.0245 in normalised units. Measured: 0.0190."""
    from transformers import CLIPProcessor

    from flowfactory_rewards_clip.preprocess import ImageTransform

    processor = CLIPProcessor.from_pretrained(tiny.clip)
    transform = ImageTransform.from_processor(processor.image_processor, "test")
    worst = 0.0
    for seed, (h, w) in enumerate([(24, 24), (64, 48), (31, 77), (17, 13), (100, 100)]):
        g = torch.Generator().manual_seed(seed)
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, max(h // 4, 2), max(w // 4, 2), generator=g),
                                                 size=(h, w), mode="bilinear", align_corners=False)
        x = torch.cat([smooth, torch.rand(1, 3, h, w, generator=g)])  # a blurred field; pixel noise
        x = (x * 255).round() / 255
        ours = transform(x)
        theirs = torch.as_tensor(np.asarray(processor.image_processor(pil(x), return_tensors="np")["pixel_values"]))
        assert ours.shape == theirs.shape == (2, 3, 24, 24)
        worst = max(worst, (ours - theirs.float()).abs().max().item())
    print(f"max |device - CLIPProcessor| = {worst:.4f} (normalised units)")
    assert worst < 1.25 / 255 / min(tiny.std)
