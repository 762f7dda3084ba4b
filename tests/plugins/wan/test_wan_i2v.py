"""What is the wan-i2v policy's own (the diffusers suite is test_wan_i2v_diffusers.py): the image condition and CLIP
states against an independent computation, rows independent of each other, first-last-frame (Wan 2.1 FLF2V and
Wan 2.2) and Wan 2.2's two experts against WanImageToVideoPipeline, a two-expert LoRA save the stock pipeline loads,
the errors for records and pipelines the policy cannot run, the memory plan, and the example's prompt set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from wan_frames import pil

from flowfactory.errors import FlowFactoryError
from flowfactory.plan import dtype_name
from flowfactory.prompts import Prompt
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import ODESampler

SIZE, FRAMES = 16, 5
ROOT = Path(__file__).resolve().parents[3]


def records(frames: list[Path], last: bool = False) -> list[Prompt]:
    """Two records: the square's first frame (and, with `last`, the noise as its last), and the bar's."""
    square, bar, noise = frames
    return [Prompt("a red square", images=[square, noise] if last else [square]),
            Prompt("a blue bar", images=[bar, square] if last else [bar])]


def ours(policy: Any, prompts: list[Prompt], steps: int, z: torch.Tensor, gens: Any) -> torch.Tensor:
    traj = ODESampler(steps).rollout(policy, policy.encode(prompts), z, gens(len(prompts)), keep="final",
                                     deterministic=True)
    return policy.decode(traj.final)


def stock(pipe: Any, prompts: list[Prompt], steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The stock pipeline, one call per record: its first image as `image`, a second one as `last_image`."""
    kwargs = {"guidance_scale": 1.0, "max_sequence_length": 512, **kwargs}
    out = []
    for i, record in enumerate(prompts):
        last = {"last_image": pil(record.images[1])} if len(record.images) > 1 else {}
        out.append(pipe(image=pil(record.images[0]), prompt=record.text, height=SIZE, width=SIZE, num_frames=FRAMES,
                        num_inference_steps=steps, latents=z[i:i + 1].clone(), output_type="pt", **last,
                        **kwargs).frames)
    return torch.cat(out)


def load_stock(folder: Path) -> Any:
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- encode ------------------------------------------------------------------------------------------------

def frame_mask(frames: int, temporal: int, last: bool, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[temporal, F', h, w]: 1 at the given pixel frames, the first frame repeated to fill its latent frame."""
    given = [1.0] + [0.0] * (frames - 2) + [1.0 if last else 0.0]
    per = torch.tensor([given[0]] * temporal + given[1:]).view(-1, temporal).T  # [temporal, F']
    return per[:, :, None, None].expand(-1, -1, *latent_hw).clone()


@pytest.mark.parametrize("last", [False, True], ids=["first", "first-last"])
def test_image_condition_is_the_masked_video_latents(make_i2v, frames, last: bool) -> None:
    """Recomputed without the pipeline: each image resized (Lanczos) to 16x16 in [-1, 1] at its frame of an
    otherwise zero video, the VAE's mode normalised by its mean/std, after the frame mask."""
    policy = make_i2v(tiny_experts=2)  # Wan 2.2-style: a last frame needs no FLF2V model
    prompts = records(frames, last)
    cond = policy.encode(prompts)
    vae = policy.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    for i, record in enumerate(prompts):
        pixels = [torch.from_numpy(np.asarray(pil(p).resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32) / 255)
                  .permute(2, 0, 1) * 2 - 1 for p in record.images]
        video = torch.zeros(1, 3, FRAMES, SIZE, SIZE)
        video[0, :, 0] = pixels[0]
        if last:
            video[0, :, -1] = pixels[1]
        with torch.no_grad():
            latents = (vae.encode(video).latent_dist.mode() - mean) / std
        mask = frame_mask(FRAMES, 2, last, (8, 8))
        expected = torch.cat([mask[None], latents], dim=1)
        assert cond["image_condition"].shape == (2, 6, 3, 8, 8) and cond["image_condition"].dtype == torch.float32
        torch.testing.assert_close(cond["image_condition"][i:i + 1], expected, atol=1e-6, rtol=0)
    assert "image_embeds" not in cond  # Wan 2.2 has no image encoder


def test_clip_states_are_the_encoders_penultimate_layer(make_i2v, frames) -> None:
    policy = make_i2v()
    prompts = records(frames)
    cond = policy.encode(prompts)
    assert cond["image_embeds"].shape == (2, 1, 17, 32)
    for i, record in enumerate(prompts):
        pixels = policy.pipe.image_processor(images=pil(record.images[0]), return_tensors="pt").pixel_values
        assert pixels.shape == (1, 3, 32, 32)  # shorter side to 32, centre crop
        with torch.no_grad():
            states = policy.pipe.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(states) == 3  # embeddings and 2 layers: the penultimate is the first layer's output
        torch.testing.assert_close(cond["image_embeds"][i], states[-2], atol=1e-6, rtol=0)


def test_rows_depend_on_their_own_record_only(make_i2v, frames) -> None:
    policy = make_i2v(guidance_scale=3.0)
    prompts = records(frames)
    both = policy.encode(prompts)
    for i, record in enumerate(prompts):
        alone = policy.encode([record])
        assert alone.keys() == both.keys()
        for key in both:
            torch.testing.assert_close(both[key][i:i + 1], alone[key], atol=1e-6, rtol=0, msg=key)
    same_text = [Prompt("a red square", images=[frames[0]]), Prompt("a red square", images=[frames[1]])]
    cond = policy.encode(same_text)
    assert not torch.equal(cond["image_condition"][0], cond["image_condition"][1])
    assert same_text[0].key != same_text[1].key  # the conditioning cache keeps both rows


# --- first-last frame and two experts against the stock pipeline -------------------------------------------

def test_flf2v_rollout_equals_the_pipeline_with_last_image(make_i2v, frames, tiny_i2v_dirs, gens) -> None:
    """Wan 2.1 FLF2V-style (the image position embedding spans two images): both frames' CLIP states and latents."""
    folder = tiny_i2v_dirs("flf")
    policy = make_i2v(model=str(folder), dtype="float32", height=SIZE, width=SIZE, num_frames=FRAMES,
                      guidance_scale=1.0)
    assert policy.images_per_record == (2,)
    prompts = records(frames, last=True)
    assert policy.encode(prompts)["image_embeds"].shape == (2, 2, 17, 32)
    z = policy.noise(gens(2))
    mine = ours(policy, prompts, 3, z, gens)
    pipe = load_stock(folder)
    assert (mine - stock(pipe, prompts, 3, z)).abs().max() < 1e-4
    only_first = [Prompt(r.text, images=r.images[:1]) for r in prompts]
    with pytest.raises(FlowFactoryError, match="needs a first and a last frame"):
        policy.encode(only_first)


def test_two_expert_rollout_equals_the_pipeline(make_i2v, frames, tiny_i2v_dirs, gens) -> None:
    """Wan 2.2 I2V A14B-style: the first expert above the boundary 0.9, the second below, each its CFG scale; one
    record with a last frame, one without, in one batch."""
    policy = make_i2v(tiny_experts=2, guidance_scale=3.0, guidance_scale_2=2.0)
    assert policy.boundary_ratio == 0.9 and policy.images_per_record == (1, 2)
    square, bar, noise = frames
    prompts = [Prompt("a red square", images=[square, noise]), Prompt("a blue bar", images=[bar])]
    steps = 4
    assert set(policy.expert_index(policy.sigmas(steps)[:-1]).tolist()) == {0, 1}
    z = policy.noise(gens(2))
    mine = ours(policy, prompts, steps, z, gens)
    pipe = load_stock(tiny_i2v_dirs("2.2"))
    theirs = stock(pipe, prompts, steps, z, guidance_scale=3.0, guidance_scale_2=2.0, max_sequence_length=16)
    assert (mine - theirs).abs().max() < 1e-4
    swapped = stock(pipe, prompts, steps, z, guidance_scale=2.0, guidance_scale_2=3.0, max_sequence_length=16)
    assert (mine - swapped).abs().max() > 1e-3  # each expert's scale matters, so the check has teeth


def test_two_expert_lora_save_loads_into_the_stock_pipeline(make_i2v, frames, tiny_i2v_dirs, tmp_path, gens,
                                                            perturb) -> None:
    policy = make_i2v(tiny_experts=2, lora={"rank": 4, "alpha": 8.0})
    perturb(policy.trainable_parameters(), seed=3, scale=0.1)
    out = tmp_path / "final"
    policy.save(str(out))
    info = json.loads((out / "flowfactory.json").read_text())
    assert (info["policy"], info["kind"], info["experts"]) == ("wan-i2v", "lora", 2)
    readme = (out / "README.md").read_text()
    assert "WanImageToVideoPipeline.from_pretrained" in readme and "image=first_frame" in readme
    prompts, steps = records(frames, last=True), 3
    z = policy.noise(gens(2))
    mine = ours(policy, prompts, steps, z, gens)
    pipe = load_stock(tiny_i2v_dirs("2.2"))
    untrained = stock(pipe, prompts, steps, z, max_sequence_length=16)
    pipe.load_lora_weights(str(out))
    pipe.load_lora_weights(str(out / "transformer_2"), load_into_transformer_2=True)
    assert (mine - stock(pipe, prompts, steps, z, max_sequence_length=16)).abs().max() < 1e-4
    assert (mine - untrained).abs().max() > 1e-3


def test_default_lora_adapts_the_image_cross_attention_where_the_model_has_one(make_i2v) -> None:
    """Wan 2.1 I2V: add_k_proj/add_v_proj get adapters (diffusers then loads the LoRA as an I2V LoRA, with no
    zero padding and no peft warning); Wan 2.2 I2V has no image states, so the two targets are left out there,
    while a target that matches nothing else is still an error."""
    def adapted(policy: Any) -> set[str]:
        return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in policy.transformer.named_parameters()
                if "lora_A" in n}

    assert adapted(make_i2v(lora={"rank": 4})) == {"to_q", "to_k", "to_v", "0", "add_k_proj", "add_v_proj"}
    assert adapted(make_i2v(tiny_experts=2, lora={"rank": 4})) == {"to_q", "to_k", "to_v", "0"}
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_kv'\] match no module"):
        make_i2v(tiny_experts=2, lora={"rank": 4, "target_modules": ["to_q", "to_kv", "add_k_proj"]})


# --- errors ------------------------------------------------------------------------------------------------

def test_records_without_a_usable_image_are_errors_naming_the_prompt(make_i2v, frames) -> None:
    policy = make_i2v()
    with pytest.raises(FlowFactoryError, match=r"prompt 'a red square' has no input image.*\"image\" field"):
        policy.encode(["a red square"])
    with pytest.raises(FlowFactoryError, match="prompt 'a blue bar' has 2 input images.*reads one image"):
        policy.encode([Prompt("a red square", images=frames[:1]), Prompt("a blue bar", images=frames[1:])])
    two = make_i2v(tiny_experts=2)
    with pytest.raises(FlowFactoryError, match="prompt 'three' has 3 input images.*one image.*or two"):
        two.encode([Prompt("three", images=frames)])
    single = make_i2v(tiny_experts=2, num_frames=1)
    with pytest.raises(FlowFactoryError, match="num_frames=1.*try num_frames: 3"):
        single.encode([Prompt("first and last", images=frames[:2])])


def test_wan21_i2v_needs_512_text_tokens(make_i2v) -> None:
    with pytest.raises(FlowFactoryError, match="max_sequence_length=16.*last 512 context tokens"):
        make_i2v(max_sequence_length=16)
    assert make_i2v(tiny_experts=2, max_sequence_length=32).max_sequence_length == 32  # no image cross-attention


def test_the_wrong_kind_of_pipeline_is_refused(make_i2v, make_policy, tiny_dir, tiny_i2v_dirs, tmp_path) -> None:
    with pytest.raises(FlowFactoryError, match="wan-i2v policy: the transformer takes 4 input channels.*wan policy"):
        make_i2v(model=str(tiny_dir), height=SIZE, width=SIZE, num_frames=FRAMES)
    with pytest.raises(FlowFactoryError, match="wan policy: the transformer takes 10 input channels.*wan-i2v"):
        make_policy(model=str(tiny_i2v_dirs("2.2")), height=SIZE, width=SIZE, num_frames=FRAMES)
    from flowfactory_wan.tiny import build_tiny_i2v_pipeline

    pipe = build_tiny_i2v_pipeline(0, experts=2)
    pipe.register_to_config(expand_timesteps=True)  # Wan 2.2 TI2V-5B's schedule
    pipe.save_pretrained(tmp_path / "ti2v")
    with pytest.raises(FlowFactoryError, match="expand_timesteps.*TI2V-5B.*per token|expand_timesteps.*TI2V-5B"):
        make_i2v(model=str(tmp_path / "ti2v"))


# --- plan, defaults, data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"preset": "tiny", "guidance_scale": 3.0}, {"preset": "tiny", "tiny_experts": 2}])
def test_plan_agrees_with_the_built_policy(i2v_spec, frames, options: dict[str, Any]) -> None:
    opts = i2v_spec.validate_options(options)
    plan = i2v_spec.plan(opts, BuildContext(seed=0, reference=True))
    policy = i2v_spec.create(opts, BuildContext(seed=0, reference=True))
    assert plan.latent_shape == tuple(policy.latent_shape) == (4, 3, 8, 8)
    cond = policy.encode(records(frames)[:1])
    assert {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()} == dict(plan.conditioning)
    trained = sum(p.trainable_bytes for p in plan.parts if p.role == "trained")
    assert trained == sum(p.numel() * p.element_size() for p in policy.trainable_parameters())
    frozen = {p.name for p in plan.parts if p.role != "trained" and p.role != "reference"}
    assert frozen == {n for n, m in policy.pipe.components.items()
                      if isinstance(m, torch.nn.Module) and not n.startswith("transformer")}


def test_model_defaults_are_the_pipelines(make_i2v, tiny_i2v_dirs) -> None:
    policy = make_i2v(model=str(tiny_i2v_dirs("2.1")), lora={"rank": 2})
    assert (policy.height, policy.width, policy.num_frames) == (480, 832, 81)
    assert (policy.max_sequence_length, policy.guidance_scale) == (512, 5.0)
    assert policy.compute_dtype == torch.bfloat16 and policy.pipe.image_encoder.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in policy.pipe.image_encoder.parameters())
    assert policy.latent_shape == (4, 41, 240, 416)  # the tiny VAE: 4 channels, 2x time and space


def test_the_examples_prompt_set_encodes(make_i2v) -> None:
    """examples/prompts/wan-i2v-train.jsonl: every record has its first frame, and the tiny example's policy encodes them all."""
    from flowfactory.train.data import load_prompts

    prompts = load_prompts(str(ROOT / "examples" / "prompts" / "wan-i2v-train.jsonl"), None, "data.train")
    assert len(prompts) >= 4 and all(len(p.images) == 1 and p.images[0].is_file() for p in prompts)
    cond = make_i2v().encode(prompts)
    assert cond["image_condition"].shape[0] == len(prompts)


def test_validate_checks_the_prompt_sets_images(tmp_path) -> None:
    """`ff validate`: wan-i2v needs one or two input images per record (a text set fails before any weight loads);
    text-to-video wan refuses records with images."""
    from flowfactory import config as ff_config
    from flowfactory.config import ConfigError
    from flowfactory.plugins import get_registry

    def validate(policy: str, train: str) -> None:
        data = {"policy": {"name": policy, "options": {"preset": "tiny"}},
                "sampler": {"name": "flow-sde", "options": {"steps": 2}}, "rewards": [{"name": "brightness"}],
                "optimizer": {"name": "grpo"}, "data": {"train": train, "eval": None},
                "train": {"prompts_per_epoch": 2, "group_size": 2}}
        ff_config.validate(data, str(tmp_path / "run.yaml"), get_registry())

    images = str(ROOT / "examples" / "prompts" / "wan-i2v-train.jsonl")
    validate("wan-i2v", images)
    with pytest.raises(ConfigError, match="'wan-i2v' reads 1 to 2 input image"):
        validate("wan-i2v", "red-blue")
    with pytest.raises(ConfigError, match="'wan' reads exactly 0 input image"):
        validate("wan", images)
