"""The qwen-image-edit and qwen-image-edit-plus policies: flowfactory's diffusers suite with prompt records that
carry input images (parity with QwenImageEditPipeline / QwenImageEditPlusPipeline, with and without true CFG;
LoRA and full saves they load), and what is the editing policies' own: the input images' latents against the
pipelines' own preparation, rows independent of each other across input shapes, several input images, the
default image areas, the errors for records without images, the padded row lengths, the fingerprint, the plan."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.plan import dtype_name
from flowfactory.plugins import load
from flowfactory.prompts import Prompt
from flowfactory.registry import BuildContext
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_qwen_image.edit import (
    MAX_ASPECT,
    REAL_CONDITION_AREA,
    REAL_IMAGE_AREA,
    input_size,
    load_processor,
    max_image_tokens,
    pipeline_areas,
)
from flowfactory_qwen_image.tiny import build_tiny_edit_pipeline, build_tiny_edit_plus_pipeline

README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-qwen-image" / "README.md"
SIZE = 32


def write_sources(folder: Path) -> list[Path]:
    """RGB PNGs: a red square on grey and noise (both 32x32), a 40x40 square (the same input shape after the
    pipeline's resize), and a 96x32 strip (a 64x32 input: another shape)."""
    rng = np.random.default_rng(0)
    square = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    square[8:24, 8:24] = (200, 30, 30)
    arrays = {"square": square, "noise": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
              "big": rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
              "strip": rng.integers(0, 256, (32, 96, 3), dtype=np.uint8)}
    paths = []
    for name, arr in arrays.items():
        paths.append(folder / f"{name}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def pil(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=SIZE, width=SIZE, true_cfg_scale=policy.true_cfg_scale,
                negative_prompt=policy.negative_prompt if policy.do_cfg else None)


class _EditSuite(DiffusersPolicyContract):
    transformer_class = QwenImageTransformer2DModel
    call_kwargs = staticmethod(call_kwargs)
    model_options = {"height": SIZE, "max_sequence_length": 128, "true_cfg_scale": 1.0, "image_area": SIZE * SIZE}
    cfg_options = {"true_cfg_scale": 4.0, "negative_prompt": "a green tree"}
    parity_steps = (2, 4)  # one step is not a schedule for Qwen-Image's stretched sigmas
    bad_options = (*COMMON_BAD_OPTIONS,
                   ({"preset": "tiny", "guidance_scale": 4.0}, "guidance_scale"),
                   ({"preset": "tiny", "image_area": 100}, "image_area"),
                   ({"preset": "tiny", "true_cfg_scale": -1.0}, "true_cfg_scale"))
    encode_option_changes = ({"max_sequence_length": 96}, {"dtype": "bfloat16"}, {"image_area": 48 * 48})
    readme = README

    def stock_pipeline(self, folder: Path, policy: Any) -> Any:
        """The stock pipeline from the saved folder, its processor read by `load_processor` (the stock loader
        wants torchvision for a video processor), with the prompt-prefix length the policy counted."""
        pipe = self._attr("pipeline_class").from_pretrained(folder, processor=load_processor(folder / "processor"))
        pipe.set_progress_bar_config(disable=True)
        pipe.prompt_template_encode_start_idx = policy.pipe.prompt_template_encode_start_idx
        return pipe


class TestQwenImageEditDiffusers(_EditSuite):
    component = "qwen-image-edit"
    pipeline_class = QwenImageEditPipeline
    tiny_builder = staticmethod(build_tiny_edit_pipeline)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _records(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        """Two edit records whose input images resize to one shape (the pipeline takes a batch of one shape)."""
        paths = write_sources(tmp_path_factory.mktemp("edit-sources"))
        cls.prompts = (Prompt("make the square blue", images=[paths[0]]), Prompt("make it red", images=[paths[1]]))

    def stock_inputs(self, policy: Any) -> dict[str, Any]:
        return {"image": [pil(p.images[0]) for p in self.prompts]}

    def pipeline_kwargs(self, policy: Any) -> dict[str, Any]:
        """The negative prompt once per record: the pipeline pairs each with the batch's input images."""
        kwargs = super().pipeline_kwargs(policy)
        if kwargs["negative_prompt"] is not None:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(self.prompts)
        return kwargs

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with pipeline_areas(policy.image_area):
            return super().stock_call(pipe, policy, steps, z, **kwargs)


class TestQwenImageEditPlusDiffusers(_EditSuite):
    component = "qwen-image-edit-plus"
    pipeline_class = QwenImageEditPlusPipeline
    tiny_builder = staticmethod(build_tiny_edit_plus_pipeline)
    model_options = {**_EditSuite.model_options, "condition_image_area": SIZE * SIZE}
    bad_options = (*_EditSuite.bad_options, ({"preset": "tiny", "max_images": 0}, "max_images"))

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _records(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        """Two records of two input images each."""
        paths = write_sources(tmp_path_factory.mktemp("edit-plus-sources"))
        cls.prompts = (Prompt("put the square on the noise", images=[paths[0], paths[1]]),
                       Prompt("mix them", images=[paths[1], paths[2]]))

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One pipeline call per record (QwenImageEditPlusPipeline takes one prompt at a time), its images as
        the list `image`."""
        out = []
        call = {**self.pipeline_kwargs(policy), "output_type": "pt", **kwargs}
        with pipeline_areas(policy.image_area, policy.condition_image_area):
            for i, record in enumerate(self.prompts):
                result = pipe(prompt=record.text, image=[pil(p) for p in record.images], num_inference_steps=steps,
                              latents=z[i:i + 1].clone(), **call)
                out.append(getattr(result, self.output))
        return torch.cat(out)


# --- what is the editing policies' own ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def registry() -> Any:
    return load(strict=True).registry


def make(registry: Any, name: str = "qwen-image-edit", seed: int = 0, **options: Any) -> Any:
    if "model" not in options:
        options.setdefault("preset", "tiny")
    return registry.get("policy", name).create(options, BuildContext(seed=seed))


def test_input_latents_are_the_pipelines(registry: Any, sources: list[Path]) -> None:
    """The conditioning's image latents and grids are what the pipeline's own prepare_latents makes of the input
    at the policy's area; padding is zeros; the prompt embeddings are its encode_prompt with the image."""
    policy = make(registry)
    record = Prompt("make it red", images=[sources[3]])  # 96x32: a 64x32 input at the tiny area
    cond = policy.encode([record])
    pipe = policy.pipe
    w, h = input_size(policy.image_area, 96, 32)
    assert (w, h) == (64, 32)
    resized = pipe.image_processor.resize(pil(sources[3]), h, w)
    image = pipe.image_processor.preprocess(resized, h, w).unsqueeze(2)
    _, latents = pipe.prepare_latents(image, 1, 4, SIZE, SIZE, torch.float32, torch.device("cpu"), None)
    tokens = latents.shape[1]
    unit = 2 * policy.vae_scale_factor  # pixels per packed token side: 2 (VAE scale 1, 2x2 packing)
    assert tokens == (h // unit) * (w // unit) and cond["image_shapes"].tolist() == [[[h // unit, w // unit]]]
    torch.testing.assert_close(cond["image_latents"][:, :tokens], latents, atol=0, rtol=0)
    assert cond["image_latents"].shape == (1, policy.image_tokens, 16)
    assert not cond["image_latents"][:, tokens:].any()
    embeds, _ = pipe.encode_prompt(prompt=["make it red"], image=resized)
    n = embeds.shape[1]
    torch.testing.assert_close(cond["prompt_embeds"][:, :n], embeds, atol=0, rtol=0)
    assert cond["prompt_embeds_mask"].tolist() == [[1] * n + [0] * (policy.max_sequence_length - n)]


def test_rows_are_independent_across_input_shapes(registry: Any, sources: list[Path], gens) -> None:
    """A batch mixing input shapes (one transformer call per shape) gives each row what it gets alone, and each
    row's conditioning is the one it gets encoded alone."""
    policy = make(registry, true_cfg_scale=2.0)
    records = [Prompt("make it red", images=[sources[0]]), Prompt("make it blue", images=[sources[3]]),
               Prompt("make it green", images=[sources[2]])]
    cond = policy.encode(records)
    assert cond["image_shapes"][:, 0].tolist() == [[16, 16], [16, 32], [16, 16]]
    alone = [policy.encode([r]) for r in records]
    for k, v in cond.items():
        torch.testing.assert_close(v, torch.cat([a[k] for a in alone]), atol=0, rtol=0)
    x, sigma = policy.noise(gens(3)), torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        together = policy.velocity(x, sigma, cond)
        apart = torch.cat([policy.velocity(x[i:i + 1], sigma[i:i + 1], alone[i]) for i in range(3)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)


def test_input_image_and_instruction_change_the_velocity(registry: Any, sources: list[Path], gens) -> None:
    """Another input image with the same instruction, or another instruction with the same image, gives another
    velocity; both reach it (the image through the VAE latents and the vision tokens)."""
    policy = make(registry)
    records = [Prompt("make it red", images=[sources[0]]), Prompt("make it red", images=[sources[1]]),
               Prompt("make it blue", images=[sources[0]])]
    cond = policy.encode(records)
    assert len({r.key for r in records}) == 3
    x = policy.noise(gens(1)).repeat(3, 1, 1)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor(0.5), cond)
        only_text = dict(cond, image_latents=cond["image_latents"][[0, 0, 0]])  # one image's latents for all
        v_text = policy.velocity(x, torch.tensor(0.5), only_text)
    assert (v[0] - v[1]).abs().max() > 1e-3 and (v[0] - v[2]).abs().max() > 1e-3
    assert (v_text[0] - v_text[1]).abs().max() > 1e-4  # the vision tokens alone still tell the images apart


def test_records_without_the_right_images_are_errors(registry: Any, sources: list[Path]) -> None:
    edit, plus = make(registry), make(registry, "qwen-image-edit-plus", max_images=2)
    with pytest.raises(FlowFactoryError, match=r"prompt 'a cat' has no input image.*\"image\" field"):
        edit.encode(["a cat"])
    with pytest.raises(FlowFactoryError, match=r"prompt 'a cat' has no input image"):
        plus.encode([Prompt("a dog", images=[sources[0]]), Prompt("a cat")])
    with pytest.raises(FlowFactoryError, match=r"prompt 'two' has 2 input images.*qwen-image-edit-plus"):
        edit.encode([Prompt("two", images=sources[:2])])
    with pytest.raises(FlowFactoryError, match=r"prompt 'three' has 3 input images.*max_images=2"):
        plus.encode([Prompt("three", images=sources[:3])])


def test_too_long_a_conditioning_is_an_error_not_a_cut(registry: Any, sources: list[Path]) -> None:
    policy = make(registry, max_sequence_length=40)
    with pytest.raises(FlowFactoryError, match=r"max_sequence_length=40: prompt 'make the square a lot bluer' .* "
                                               r"is \d+ tokens.*at least \d+"):
        policy.encode([Prompt("make the square a lot bluer", images=[sources[0]])])


def test_plus_reads_every_image_of_a_record(registry: Any, sources: list[Path], gens) -> None:
    """Records of one and of two images in one batch: grids per image, latents of both images in order, the
    prompt labels "Picture 1", "Picture 2"; each row equals its record encoded and run alone."""
    policy = make(registry, "qwen-image-edit-plus")
    records = [Prompt("swap them", images=[sources[0], sources[3]]), Prompt("make it red", images=[sources[1]])]
    cond = policy.encode(records)
    assert cond["image_shapes"].tolist() == [[[16, 16], [16, 32], [0, 0]], [[16, 16], [0, 0], [0, 0]]]
    assert cond["image_latents"].shape == (2, 3 * max_image_tokens(SIZE * SIZE, 2), 16)
    first = policy.encode([Prompt("x", images=[sources[0]])])["image_latents"][:, :256]
    torch.testing.assert_close(cond["image_latents"][:1, :256], first, atol=0, rtol=0)
    second = policy.encode([Prompt("x", images=[sources[3]])])["image_latents"][:, :512]
    torch.testing.assert_close(cond["image_latents"][:1, 256:768], second, atol=0, rtol=0)
    assert not cond["image_latents"][:1, 768:].any() and not cond["image_latents"][1:, 256:].any()
    text = policy.pipe.prompt_template_encode.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
                                                      "Picture 2: <|vision_start|><|image_pad|><|vision_end|>swap them")
    vision = int(cond["prompt_embeds_mask"][0].sum()) - (
        len(policy.pipe.tokenizer(text).input_ids) - 2 - policy.pipe.prompt_template_encode_start_idx)
    # Qwen2.5-VL's views (at most 64 pixels, sides even): 8x8 of the square, 10x4 of the 64x32 strip; 2x2 patches
    assert vision == 16 + 10
    x = policy.noise(gens(2))
    with torch.no_grad():
        together = policy.velocity(x, torch.tensor(0.5), cond)
        apart = torch.cat([policy.velocity(x[i:i + 1], torch.tensor(0.5), policy.encode([r]))
                           for i, r in enumerate(records)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)


def test_model_defaults_are_the_pipelines(registry: Any, sources: list[Path]) -> None:
    """A `model:` build takes the pipelines' own areas and sizes; the input size at the default area is the
    edit pipeline's own calculate_dimensions(1024 * 1024, ratio) (the literal in its __call__)."""
    for width, height in ((1000, 600), (512, 512), (300, 1200), (4000, 3000)):
        expected = pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, width / height)[:2]
        assert input_size(REAL_IMAGE_AREA, width, height) == expected
    assert (REAL_IMAGE_AREA, REAL_CONDITION_AREA) == (1024 * 1024, 384 * 384)


def test_model_folder_gets_the_pipelines_defaults(registry: Any, tmp_path: Path) -> None:
    folder = tmp_path / "plus"
    build_tiny_edit_plus_pipeline(0).save_pretrained(folder)
    policy = make(registry, "qwen-image-edit-plus", model=str(folder), lora={"rank": 2})
    assert (policy.image_area, policy.condition_image_area, policy.max_images) == (1024 * 1024, 384 * 384, 3)
    assert (policy.max_sequence_length, policy.true_cfg_scale, policy.negative_prompt) == (2048, 4.0, " ")
    assert policy.height == policy.width == 128 * policy.vae_scale_factor
    assert type(policy.pipe.processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert policy.text_encoder_modules() == {}  # deferred until the first encode, as every diffusers policy


def test_max_image_tokens_bounds_every_aspect_ratio() -> None:
    """The padded length covers every input the pipeline can make at an area (sampled over aspect ratios up to
    the processor's limit) and is reached."""
    for area, unit in ((SIZE * SIZE, 2), (1024 * 1024, 16), (384 * 384, 16)):
        bound = max_image_tokens(area, unit)
        seen = 0
        for r in np.exp(np.linspace(-math.log(MAX_ASPECT), math.log(MAX_ASPECT), 20001)):
            w, h = input_size(area, 1000 * float(r), 1000)
            seen = max(seen, (w // unit) * (h // unit))
        assert seen <= bound <= seen * 1.05, (area, seen, bound)


def test_fingerprint_follows_the_processor_and_the_areas(registry: Any) -> None:
    base = make(registry, "qwen-image-edit-plus")
    assert base.conditioning_fingerprint() == make(registry, "qwen-image-edit-plus").conditioning_fingerprint()
    for change in ({"condition_image_area": 48 * 48}, {"image_area": 48 * 48}, {"max_images": 2}):
        assert make(registry, "qwen-image-edit-plus", **change).conditioning_fingerprint() != \
            base.conditioning_fingerprint(), change
    other = make(registry, "qwen-image-edit-plus")
    other.pipe.processor.image_processor.size["longest_edge"] = 16 * 16  # Qwen2.5-VL would see more pixels
    assert other.conditioning_fingerprint() != base.conditioning_fingerprint()


def test_saves_name_the_editing_pipeline(registry: Any, tmp_path: Path) -> None:
    policy = make(registry, "qwen-image-edit-plus", lora={"rank": 2})
    policy.save(str(tmp_path))
    readme = (tmp_path / "README.md").read_text()
    assert "QwenImageEditPlusPipeline.from_pretrained" in readme and "pipe(image=[source, ...], prompt=prompt" in readme


def test_plan_matches_the_conditioning(registry: Any, sources: list[Path]) -> None:
    """`ff plan`'s conditioning shapes and dtypes for the tiny presets are what encode returns."""
    for name, images in (("qwen-image-edit", sources[:1]), ("qwen-image-edit-plus", sources[:2])):
        spec = registry.get("policy", name)
        options = spec.options.model_validate({"preset": "tiny", "true_cfg_scale": 2.0})
        plan = spec.plan(options, BuildContext(seed=0))
        policy = spec.create(options, BuildContext(seed=0))
        cond = policy.encode([Prompt("make it red", images=images)])
        assert plan.conditioning == {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()}
        assert plan.latent_shape == policy.latent_shape


def test_plan_of_qwen_image_edit_at_real_size(registry: Any) -> None:
    """`ff plan` on Qwen-Image-Edit's configs (tests/data/model-configs/qwen-image-edit: Qwen-Image's components
    under QwenImageEditPipeline, config files only): the 20.43B transformer, and per record the 1024x1024 input's
    latents padded to the longest input any aspect ratio gives (4920 tokens of 64 channels) beside 2048
    conditioning tokens of Qwen2.5-VL, twice with true CFG."""
    folder = Path(__file__).resolve().parents[2] / "data" / "model-configs" / "qwen-image-edit"
    spec = registry.get("policy", "qwen-image-edit")
    options = spec.options.model_validate({"model": str(folder), "height": 512, "width": 512})
    plan = spec.plan(options, BuildContext(seed=0))
    assert next(p for p in plan.parts if p.name == "transformer").parameters == 20_430_401_088
    assert plan.latent_shape == (1024, 64)
    assert plan.conditioning == {
        "prompt_embeds": ((2048, 3584), "bfloat16"), "prompt_embeds_mask": ((2048,), "int64"),
        "negative_prompt_embeds": ((2048, 3584), "bfloat16"), "negative_prompt_embeds_mask": ((2048,), "int64"),
        "image_latents": ((max_image_tokens(1024 * 1024, 16), 64), "bfloat16"), "image_shapes": ((1, 2), "int64")}
    assert max_image_tokens(1024 * 1024, 16) == 4920
