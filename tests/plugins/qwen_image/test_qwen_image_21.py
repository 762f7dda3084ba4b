"""The qwen-image-2.1 policy (Qwen-Image 2.1, QwenImage21Pipeline): flowfactory's Policy and diffusers suites
(ODE rollout equal to the stock pipeline with and without CFG, LoRA and full saves it loads), and what is 2.1's own:
each prompt at its own length (the pipeline's batch padding moves the image), the key/value cache, the pipeline's
noise and sample_sigmas, RGB of the RGBA decode, the errors, the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import retrieve_timesteps
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.plan import dtype_name
from flowfactory.plugins import load
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import ODESampler
from flowfactory.testing import PolicyContract
from flowfactory.testing.contracts import make_generators
from flowfactory_diffusers.testing import COMMON_BAD_OPTIONS, DiffusersPolicyContract
from flowfactory_qwen_image.qwen21 import load_qwen21_processor
from flowfactory_qwen_image.tiny import build_tiny_qwen21_pipeline

README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-qwen-image" / "README.md"
SIZE = 64
PROMPTS = ("a red square", "a blue circle!!")  # of different lengths: the pipeline would pad the first


def call_kwargs(policy: Any) -> dict[str, Any]:
    return dict(height=SIZE, width=SIZE, use_kv_cache=False, true_cfg_scale=policy.true_cfg_scale,
                negative_prompt=policy.negative_prompt if policy.do_cfg else None)


def stock(pipe: Any, prompts: tuple[str, ...], z: torch.Tensor, steps: int, **kwargs: Any) -> torch.Tensor:
    """The pipeline one prompt at a time (a batch would pad the shorter prompts), RGB of its RGBA images or the
    latents."""
    out = [pipe(prompt=p, latents=z[i:i + 1].clone(), num_inference_steps=steps, **kwargs).images
           for i, p in enumerate(prompts)]
    images = torch.cat(out)
    return images if kwargs.get("output_type") == "latent" else images[:, :3]


class TestQwenImage21LoraContract(PolicyContract):
    component = "qwen-image-2.1"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestQwenImage21CfgContract(PolicyContract):
    component = "qwen-image-2.1"
    options = {"preset": "tiny", "true_cfg_scale": 3.0}


class TestQwenImage21Diffusers(DiffusersPolicyContract):
    component = "qwen-image-2.1"
    pipeline_class = QwenImage21Pipeline
    transformer_class = QwenImage21Transformer2DModel
    tiny_builder = staticmethod(build_tiny_qwen21_pipeline)
    call_kwargs = staticmethod(call_kwargs)
    prompts = PROMPTS
    model_options = {"height": SIZE, "max_sequence_length": 64}
    lora = {"rank": 4, "alpha": 8.0}
    cfg_options = {"true_cfg_scale": 3.0, "negative_prompt": "a green tree"}
    parity_steps = (2, 4)
    bad_options = (*COMMON_BAD_OPTIONS,
                   ({"preset": "tiny", "guidance_scale": 4.0}, "guidance_scale"),
                   ({"preset": "tiny", "true_cfg_scale": -1.0}, "true_cfg_scale"),
                   ({"preset": "tiny", "max_sequence_length": 0}, "max_sequence_length"))
    readme = README

    def stock_pipeline(self, folder: Path, policy: Any) -> Any:
        """The stock pipeline from the folder, its processor read by `load_qwen21_processor` (the stock loader
        wants torchvision for a video processor)."""
        pipe = QwenImage21Pipeline.from_pretrained(folder, processor=load_qwen21_processor(folder / "processor"))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def stock_call(self, pipe: Any, policy: Any, steps: int, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return stock(pipe, texts(self.prompts), z, steps, **{**self.pipeline_kwargs(policy), "output_type": "pt",
                                                             **kwargs})


# --- what is Qwen-Image 2.1's own -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec() -> Any:
    return load(strict=True).registry.get("policy", "qwen-image-2.1")


def make(spec: Any, seed: int = 0, **options: Any) -> Any:
    return spec.create({"preset": "tiny", **options}, BuildContext(seed=seed))


def test_each_prompt_runs_at_its_own_length(spec: Any) -> None:
    """A batch of prompts of different lengths gives each what the pipeline gives it alone; the pipeline's own
    batch pads the shorter prompt, which moves its image's position and changes it."""
    policy = make(spec)
    prompts = ("a red square", "a blue circle!!", "a red square")
    cond = policy.encode(list(prompts))
    assert cond["prompt_embeds_mask"].sum(dim=1).tolist()[0] == cond["prompt_embeds_mask"].sum(dim=1).tolist()[2]
    z = policy.noise(make_generators(range(3)))
    with torch.no_grad():
        together = policy.velocity(z, torch.tensor(0.5), cond)
        alone = torch.cat([policy.velocity(z[i:i + 1], torch.tensor(0.5), {k: v[i:i + 1] for k, v in cond.items()})
                           for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    pipe = build_tiny_qwen21_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    final = ODESampler(3).rollout(policy, cond, z, make_generators(range(3)), keep="final", deterministic=True).final
    ours = policy.decode(final)
    theirs = stock(pipe, prompts, z, 3, height=SIZE, width=SIZE, use_kv_cache=False, output_type="pt")
    assert (ours - theirs).abs().max() < 1e-4
    batched = pipe(prompt=list(prompts), latents=z.clone(), num_inference_steps=3, height=SIZE, width=SIZE,
                   use_kv_cache=False, output_type="pt").images[:, :3]
    assert (batched[0] - theirs[0]).abs().max() > 1e-4  # padded to the longer prompt: another image


def test_key_value_cache_changes_only_rounding(spec: Any) -> None:
    """The pipeline's default caches the prompt's keys and values after the first step; the policy recomputes
    them (as use_kv_cache=False), which agrees with the cached run to rounding."""
    policy = make(spec)
    z = policy.noise(make_generators(range(2)))
    cond = policy.encode(list(PROMPTS))
    ours = policy.decode(ODESampler(4).rollout(policy, cond, z, make_generators(range(2)), keep="final",
                                               deterministic=True).final)
    pipe = build_tiny_qwen21_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    cached = stock(pipe, PROMPTS, z, 4, height=SIZE, width=SIZE, use_kv_cache=True, output_type="pt")
    assert (ours - cached).abs().max() < 1e-4


def test_noise_sigmas_and_sample_sigmas_are_the_pipelines(spec: Any) -> None:
    policy = make(spec)
    z = policy.noise(make_generators(range(3)))
    assert z.shape == (3, 16, 16)  # 4x4 latent tokens of 16 channels, unpatched
    expected, _ = policy.pipe.prepare_latents(None, 3, 16, SIZE, SIZE, torch.float32, torch.device("cpu"),
                                              make_generators(range(3)))
    torch.testing.assert_close(z, expected, atol=0, rtol=0)
    sched = type(policy.pipe.scheduler).from_config(policy.pipe.scheduler.config)
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (16 - 256)  # the tiny scheduler's calculate_shift at 16 tokens
    retrieve_timesteps(sched, 4, "cpu", sigmas=np.linspace(1.0, 0.25, 4), mu=mu)
    torch.testing.assert_close(policy.sigmas(4), sched.sigmas.float(), atol=1e-7, rtol=0)
    policy.pipe.register_to_config(sample_sigmas=[1.0, 0.6, 0.3])  # a model that fixes its own sigmas
    with pytest.raises(FlowFactoryError, match="its own 3 sigmas.*steps to 3"):
        policy.sigmas(4)
    s = policy.sigmas(3)
    assert s.shape == (4,) and s[0] == 1.0 and s[-1] == 0.0


def test_decode_is_the_rgb_of_the_rgba_vae(spec: Any) -> None:
    policy = make(spec)
    z = policy.noise(make_generators(range(2)))
    images = policy.decode(z)
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= float(images.min()) <= float(images.max()) <= 1
    pipe = policy.pipe
    rgba = pipe.vae.decode(pipe._unpack_latents(z, SIZE, SIZE, 16), return_dict=False)[0][:, :, 0]
    assert rgba.shape[1] == 4
    torch.testing.assert_close(images, (rgba[:, :3] / 2 + 0.5).clamp(0, 1), atol=0, rtol=0)


def test_errors_name_the_prompt(spec: Any, tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(source)
    policy = make(spec, max_sequence_length=20)
    with pytest.raises(FlowFactoryError, match=r"prompt 'edit it' has input images.*text-to-image"):
        policy.encode([Prompt("edit it", images=[source])])
    with pytest.raises(FlowFactoryError, match=r"max_sequence_length=20: prompt 'a very long prompt indeed' is \d+ "
                                               r"tokens.*at least"):
        policy.encode(["a very long prompt indeed"])
    with pytest.raises(FlowFactoryError, match=r"height=48, width=48: both must be multiples of 32"):
        make(spec, height=48)


def test_model_folder_defaults_and_plan(spec: Any, tmp_path: Path) -> None:
    build_tiny_qwen21_pipeline(0).save_pretrained(tmp_path)
    policy = spec.create({"model": str(tmp_path), "lora": {"rank": 2}}, BuildContext(seed=0))
    assert (policy.height, policy.width, policy.max_sequence_length, policy.true_cfg_scale) == (1024, 1024, 1024, 1.0)
    assert policy.text_encoder_modules() == {}  # deferred until the first encode
    options = spec.options.model_validate({"preset": "tiny", "true_cfg_scale": 2.0})
    plan = spec.plan(options, BuildContext(seed=0))
    tiny = spec.create(options, BuildContext(seed=0))
    cond = tiny.encode(["a red square"])
    assert plan.conditioning == {k: (tuple(v.shape[1:]), dtype_name(v.dtype)) for k, v in cond.items()}
    assert plan.latent_shape == tiny.latent_shape and plan.sample_shape == (3, SIZE, SIZE)
