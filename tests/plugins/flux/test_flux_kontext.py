"""The flux-kontext policy: flowfactory's diffusers suite with prompt records that carry source images (parity
with FluxKontextPipeline, LoRA and full saves it loads), and what is Kontext's own: the source latents against
the pipeline's own preparation, resized sources, the errors for prompts without one image, the fingerprint, the
plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.plan import dtype_name
from flowfactory.plugins import load
from flowfactory.prompts import Prompt
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import ODESampler
from flowfactory.testing.contracts import make_generators
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_flux.tiny import build_tiny_kontext_pipeline

SIZE = 32
CALL = {"height": SIZE, "width": SIZE, "max_area": SIZE * SIZE, "_auto_resize": False, "max_sequence_length": 32}


def write_sources(folder: Path, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> list[Path]:
    """Two RGB PNGs of `size` (width, height): a red square on grey, and noise."""
    w, h = size
    square = np.full((h, w, 3), 128, dtype=np.uint8)
    square[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (200, 30, 30)
    noise = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    paths = [folder / f"square-{w}x{h}.png", folder / f"noise-{w}x{h}.png"]
    for arr, p in zip((square, noise), paths, strict=True):
        Image.fromarray(arr).save(p)
    return paths


def records(paths: list[Path]) -> tuple[Prompt, ...]:
    return (Prompt("make the square blue", images=[paths[0]]), Prompt("make it red", images=[paths[1]]))


def pil(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class TestFluxKontextDiffusers(DiffusersPolicyContract):
    component = "flux-kontext"
    pipeline_class = FluxKontextPipeline
    transformer_class = FluxTransformer2DModel
    tiny_builder = staticmethod(build_tiny_kontext_pipeline)
    call_kwargs = CALL
    model_options = {"height": SIZE, "width": SIZE, "max_sequence_length": 32}
    bad_options = (*COMMON_BAD_OPTIONS, ({"preset": "tiny", "max_sequence_length": 513}, "max_sequence_length"))
    encode_option_changes = ({"max_sequence_length": 12}, {"dtype": "bfloat16"}, {"height": 16, "width": 16})
    readme = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-flux" / "README.md"

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _records(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        """The suite's prompts: two edit records whose sources are PNGs at the run's size."""
        cls.prompts = records(write_sources(tmp_path_factory.mktemp("kontext-sources")))

    def stock_inputs(self, policy: Any) -> dict[str, Any]:
        return {"image": [pil(p.images[0]) for p in self.prompts]}


# --- what is Kontext's own -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec() -> Any:
    return load(strict=True).registry.get("policy", "flux-kontext")


def make(spec: Any, seed: int = 0, **options: Any) -> Any:
    if "model" not in options:
        options.setdefault("preset", "tiny")
    return spec.create(options, BuildContext(seed=seed))


@pytest.fixture(scope="module")
def policy(spec: Any) -> Any:
    return make(spec)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> FluxKontextPipeline:
    folder = tmp_path_factory.mktemp("stock-kontext")
    build_tiny_kontext_pipeline(0).save_pretrained(folder)
    pipe = FluxKontextPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_source_latents_are_the_pipelines_own(policy: Any, sources: list[Path], stock: FluxKontextPipeline) -> None:
    """image_latents rows equal what FluxKontextPipeline.prepare_latents makes of each source; each row depends
    only on its record; the text half is FLUX.1's."""
    recs = records(sources)
    cond = policy.encode(list(recs))
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds", "image_latents"}
    assert cond["image_latents"].shape == (2, 256, 16) and cond["image_latents"].dtype == torch.float32
    image = stock.image_processor.preprocess([pil(p) for p in sources], SIZE, SIZE)
    _, expected, _, image_ids = stock.prepare_latents(image, 2, 4, SIZE, SIZE, torch.float32, torch.device("cpu"),
                                                       [torch.Generator().manual_seed(i) for i in range(2)])
    torch.testing.assert_close(cond["image_latents"], expected, atol=1e-6, rtol=0)
    assert bool((image_ids[:, 0] == 1).all())
    alone = policy.encode([recs[1]])
    assert all(torch.equal(alone[k][0], cond[k][1]) for k in cond)
    text, _, _ = stock.encode_prompt([r.text for r in recs], None, max_sequence_length=32)
    torch.testing.assert_close(cond["prompt_embeds"], text, atol=1e-5, rtol=0)


def test_a_source_of_another_size_is_resized_as_the_pipeline_resizes(
        policy: Any, stock: FluxKontextPipeline, tmp_path: Path) -> None:
    """Sources of 48x40 and 20x24 pixels: the rollout equals the stock pipeline given each source resized to
    32x32 by PIL (Lanczos), the pipeline's own resize for PIL images."""
    paths = [write_sources(tmp_path, (48, 40))[0], write_sources(tmp_path, (20, 24), seed=1)[1]]
    recs = records(paths)
    z, steps = policy.noise(make_generators(range(2))), 3
    traj = ODESampler(steps).rollout(policy, policy.encode(list(recs)), z, make_generators(range(2)), keep="final",
                                     deterministic=True)
    resized = [pil(p).resize((SIZE, SIZE), Image.LANCZOS) for p in paths]
    theirs = stock(image=resized, prompt=[r.text for r in recs], num_inference_steps=steps, latents=z.clone(),
                   output_type="latent", **CALL).images
    assert (traj.final - theirs).abs().max() < 1e-4


def test_velocity_reads_the_source(policy: Any, sources: list[Path]) -> None:
    recs = records(sources)
    cond = policy.encode(list(recs))
    x, sigma = policy.noise(make_generators(range(2))), torch.tensor(0.7)
    swapped = {**cond, "image_latents": cond["image_latents"].flip(0)}  # each prompt gets the other's source
    with torch.no_grad():
        v, v_swapped = policy.velocity(x, sigma, cond), policy.velocity(x, sigma, swapped)
    assert v.shape == x.shape and (v - v_swapped).abs().max() > 1e-3
    with pytest.raises(FlowFactoryError, match="no 'image_latents'.*encode"):
        policy.velocity(x, sigma, {k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")})
    with pytest.raises(ValueError, match=r"image_latents has shape \(2, 64, 16\), expected"):
        policy.velocity(x, sigma, {**cond, "image_latents": cond["image_latents"][:, :64]})


def test_prompts_without_exactly_one_source_are_errors_naming_them(policy: Any, sources: list[Path]) -> None:
    ok = records(sources)[0]
    for bad, has in ((Prompt("make it green"), "none"), ("a plain string", "none"),
                     (Prompt("two sources", images=sources), "2")):
        text = bad.text if isinstance(bad, Prompt) else bad
        with pytest.raises(FlowFactoryError, match=rf"flux-kontext.*{text!r} has {has}.*exactly one"):
            policy.encode([ok, bad])


def test_fingerprint_follows_the_vae(spec: Any, tmp_path: Path) -> None:
    """The VAE encodes the sources, so its weights (in memory) or files (model:) enter the fingerprint."""
    base = make(spec)
    before = base.conditioning_fingerprint()
    with torch.no_grad():
        next(base.vae.parameters()).add_(0.01)
    assert base.conditioning_fingerprint() != before
    build_tiny_kontext_pipeline(0).save_pretrained(tmp_path)
    loaded = make(spec, model=str(tmp_path), dtype="float32")
    first = loaded.conditioning_fingerprint()
    config = tmp_path / "vae" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert loaded.conditioning_fingerprint() != first


def test_shares_flux_weights_from_one_seed(spec: Any, policy: Any) -> None:
    flux = load(strict=True).registry.get("policy", "flux").create({"preset": "tiny"}, BuildContext(seed=0))
    ours, theirs = policy.transformer.state_dict(), flux.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert make(spec).guidance_scale == 2.5  # Kontext-dev's model-card guidance


def test_saved_readme_passes_the_resized_source(policy: Any, tmp_path: Path) -> None:
    policy.save(str(tmp_path))
    text = (tmp_path / "README.md").read_text()
    assert "pipe(image=source, prompt=prompt, height=32, width=32, max_area=1024, _auto_resize=False" in text
    assert "resized to 32x32" in text
    assert json.loads((tmp_path / "flowfactory.json").read_text())["policy"] == "flux-kontext"


def test_plan_matches_the_built_policy(spec: Any, policy: Any, sources: list[Path]) -> None:
    opts = spec.validate_options({"preset": "tiny"})
    plan = spec.plan(opts, BuildContext(seed=0, reference=True))
    assert plan.latent_shape == tuple(policy.latent_shape)
    cond = policy.encode([records(sources)[0]])
    assert {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()} == dict(plan.conditioning)


def test_validate_refuses_prompt_sets_without_one_source_each(tmp_path: Path) -> None:
    """`input_images = (1, 1)` on the options: ff validate names the first record of each set without exactly
    one input image, and accepts the example's sets."""
    from flowfactory import config as ff_config
    from flowfactory.errors import ConfigError

    examples = Path(__file__).resolve().parents[3] / "examples"
    src = write_sources(tmp_path)
    lines = [{"prompt": "make it red", "image": src[0].name}, {"prompt": "two of them", "images": [p.name for p in src]}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    base = {"policy": {"name": "flux-kontext", "options": {"preset": "tiny"}},
            "sampler": {"name": "flow-sde", "options": {"steps": 2}}, "rewards": [{"name": "edit-colour"}],
            "optimizer": {"name": "grpo"}, "train": {"prompts_per_epoch": 2, "group_size": 2}}
    with pytest.raises(ConfigError) as info:
        ff_config.validate({**base, "data": {"train": "red-blue", "eval": str(tmp_path / "mixed.jsonl")}}, "<test>")
    text = str(info.value)
    assert "data.train: policy 'flux-kontext' reads exactly 1 input image(s) per prompt, but record 1 " \
           "('a red square') has 0 (and 7 more of its 8)" in text
    assert "data.eval: policy 'flux-kontext' reads exactly 1 input image(s) per prompt, but record 2 " \
           "('two of them') has 2" in text
    ff_config.validate({**base, "data": {"train": str(examples / "prompts" / "kontext-edits-train.jsonl"),
                                         "eval": str(examples / "prompts" / "kontext-edits-eval.jsonl")}}, "<test>")


def test_plan_of_the_kontext_dev_configs() -> None:
    """FLUX.1-Kontext-dev's stored configs (tests/data/model-configs, no weights): FLUX.1-dev's 11.9B transformer,
    and per prompt the source latents [1024, 64] bfloat16 beside T5's [512, 4096] and CLIP's pooled [768]."""
    from flowfactory import config as ff_config
    from flowfactory.plan import plan_memory

    examples = Path(__file__).resolve().parents[3] / "examples"
    folder = Path(__file__).resolve().parents[2] / "data" / "model-configs" / "flux.1-kontext-dev"
    data = {"policy": {"name": "flux-kontext", "options": {"model": str(folder), "lora": {"rank": 32}}},
            "sampler": {"name": "flow-sde", "options": {"steps": 3}}, "rewards": [{"name": "edit-colour"}],
            "optimizer": {"name": "grpo"}, "train": {"prompts_per_epoch": 8, "group_size": 2},
            "data": {"train": str(examples / "prompts" / "kontext-edits-train.jsonl"), "eval": None}}
    cfg, options = ff_config.validate(data, "<test>")
    plan = plan_memory(cfg, options, load(strict=True).registry)
    transformer = next(p for p in plan.parts if p.name == "transformer")
    assert transformer.parameters - transformer.trainable_elements == 11_901_408_320
    assert "[1024, 64] bfloat16" in plan.row("rollout buffer").detail
    assert plan.row("conditioning cache").bytes == 8 * 2 * (512 * 4096 + 768 + 1024 * 64)  # 8 distinct records
