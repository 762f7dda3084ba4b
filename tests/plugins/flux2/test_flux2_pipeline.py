"""What is FLUX.2's own: noise and schedule as the pipelines draw and shift them, prompts that reach the
transformer through the chat template, a `model:` folder's defaults, klein's guidance rules (distilled models,
CFG rows), text-only records, and the torchvision hint for FLUX.2 [dev]'s processor. Parity of whole rollouts with
the pipelines, LoRA and full saves are in test_flux2_diffusers.py."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, texts
from flowfactory.train.data import load_prompts

PROMPTS = ["a red square", "a blue circle"]


def empirical_mu(seq_len: int, steps: int) -> float:
    """FLUX.2's mu, written out from its two fitted lines (at 10 and 200 steps) for a sequence under 4300 tokens."""
    at_200, at_10 = 0.00016927 * seq_len + 0.45666666, 8.73809524e-05 * seq_len + 1.89833333
    return at_200 + (steps - 200) * (at_200 - at_10) / 190.0


@pytest.mark.parametrize("variant", ["flux2", "klein"])
def test_noise_and_sigmas_match_the_pipeline(variant: str, make_flux2, make_klein, gens) -> None:
    policy = (make_flux2 if variant == "flux2" else make_klein)()
    z = policy.noise(gens(3))
    assert z.shape == (3, 256, 16) and z.dtype == torch.float32  # 16x16 tokens of 2x2 patches of 4 channels
    grid, _ = policy.pipe.prepare_latents(3, 4, 32, 32, torch.float32, torch.device("cpu"), gens(3))
    torch.testing.assert_close(z, grid, atol=0, rtol=0)  # prepare_latents returns them packed
    torch.testing.assert_close(policy.unpack(z), grid.permute(0, 2, 1).reshape(3, 16, 16, 16), atol=0, rtol=0)
    for steps in (1, 4, 8):
        s = policy.sigmas(steps)
        base = np.linspace(1.0, 1 / steps, steps)
        mu = empirical_mu(256, steps)
        expected = [math.exp(mu) / (math.exp(mu) + (1 / b - 1)) for b in base] + [0.0]  # exponential time shift
        torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    assert policy.sigmas(4)[1] != policy.sigmas(8)[2]  # the same base sigma 0.75 shifts by a mu that counts steps


def test_prompts_reach_the_transformer(make_flux2, make_klein, gens) -> None:
    """Every built-in prompt in its chat template fits the tiny presets' 48 tokens (truncation would cut the prompt
    away: the template comes first), and different prompts give different velocities, the same prompt the same."""
    flux2, klein = make_flux2(), make_klein()
    assert flux2.max_sequence_length == klein.max_sequence_length == 48
    builtin = sorted({p for name in ("colours", "colours-eval", "red-blue", "red-blue-eval")
                      for p in texts(load_prompts(name, None, "data.train"))})
    dev = flux2.pipe.tokenizer.apply_chat_template(format_input(builtin), tokenize=True, return_dict=True)
    assert max(len(ids) for ids in dev["input_ids"]) <= 48
    for prompt in builtin:
        text = klein.pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
        assert text.endswith("<think>\n\n</think>\n\n") and len(klein.pipe.tokenizer(text).input_ids) <= 48
    for policy in (flux2, klein):
        cond = policy.encode(PROMPTS)
        assert cond["prompt_embeds"].shape == (2, 48, 96)  # three text layers of width 32, side by side
        x = policy.noise(gens(1)).repeat(2, 1, 1)
        with torch.no_grad():
            v = policy.velocity(x, torch.tensor(0.5), cond)
            same = policy.velocity(x, torch.tensor(0.5), {k: c[[0, 0]] for k, c in cond.items()})
        # the prompt is a few of the 48 tokens (the template and padding are shared): a small but real difference
        assert (v[0] - v[1]).abs().max() > 1e-4
        torch.testing.assert_close(same[0], same[1], atol=1e-6, rtol=0)


def test_records_with_input_images_are_refused(make_flux2, make_klein, tmp_path: Path) -> None:
    image = tmp_path / "source.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    for policy in (make_flux2(), make_klein()):
        with pytest.raises(FlowFactoryError, match=r"text-to-image.*'make it blue'.*source\.png.*not supported"):
            policy.encode([Prompt("a red square"), Prompt("make it blue", images=[image])])
        torch.testing.assert_close(policy.encode([Prompt("a red square")])["prompt_embeds"],
                                   policy.encode(["a red square"])["prompt_embeds"], atol=0, rtol=0)


def test_validate_refuses_a_data_file_with_input_images(flux2_registry, tmp_path: Path) -> None:
    """The options declare no input images, so `ff validate` names such a record before any weight loads."""
    from flowfactory import config as ff_config
    from flowfactory.errors import ConfigError

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "source.png")
    (tmp_path / "edits.jsonl").write_text('{"prompt": "a red square"}\n{"prompt": "make it red", "image": "source.png"}\n')
    for name in ("flux2", "flux2-klein"):
        data = {"policy": {"name": name, "options": {"preset": "tiny"}}, "sampler": {"name": "ode"},
                "rewards": [{"name": "brightness"}], "optimizer": {"name": "nft"},
                "data": {"train": str(tmp_path / "edits.jsonl"), "eval": None}}
        with pytest.raises(ConfigError, match=r"data.train.*exactly 0 input image.*record 2 \('make it red'\) has 1"):
            ff_config.validate(data, str(tmp_path / "run.yaml"), flux2_registry)


def test_model_defaults_are_the_pipelines(make_flux2, make_klein, flux2_dir: Path, klein_dir: Path) -> None:
    flux2 = make_flux2(model=str(flux2_dir), lora={"rank": 2})
    klein = make_klein(model=str(klein_dir), lora={"rank": 2})
    for policy in (flux2, klein):
        assert policy.height == policy.width == 128 * policy.vae_scale_factor  # default_sample_size 128
        assert policy.max_sequence_length == 512 and policy.guidance_scale == 4.0
        assert policy.compute_dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert set(flux2.encode(["a cat"])) == {"prompt_embeds"}
    cond = klein.encode(["a cat"])  # a base (undistilled) klein runs CFG by default, as the pipeline
    assert set(cond) == {"prompt_embeds", "negative_prompt_embeds"} and cond["prompt_embeds"].shape == (1, 512, 96)
    torch.testing.assert_close(cond["negative_prompt_embeds"], klein.encode([""])["prompt_embeds"], atol=0, rtol=0)


def test_distilled_klein_runs_without_cfg(make_klein, klein_dir: Path, tmp_path: Path) -> None:
    distilled = tmp_path / "distilled"
    shutil.copytree(klein_dir, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    policy = make_klein(model=str(distilled), dtype="float32", height=32, max_sequence_length=16)
    assert policy.guidance_scale == 1.0 and not policy.do_cfg and set(policy.encode(["a cat"])) == {"prompt_embeds"}
    with pytest.raises(FlowFactoryError, match=r"option guidance_scale=4.0.*step-distilled.*FLUX.2-klein-base-9B"):
        make_klein(model=str(distilled), guidance_scale=4.0)
    assert make_klein(model=str(distilled), dtype="float32", guidance_scale=1.0, height=32).guidance_scale == 1.0


def test_cfg_velocity_needs_the_empty_prompts_rows(make_klein, gens) -> None:
    policy, plain = make_klein(guidance_scale=4.0), make_klein()
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        policy.velocity(policy.noise(gens(1)), torch.tensor(0.5), plain.encode(["a cat"]))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_pixtral_processor_without_torchvision_says_what_to_install(make_flux2, flux2_dir: Path,
                                                                   tmp_path: Path) -> None:
    """FLUX.2 [dev]'s tokenizer is a PixtralProcessor, which transformers builds only with torchvision."""
    folder = tmp_path / "pixtral"
    shutil.copytree(flux2_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}))
    with pytest.raises(FlowFactoryError, match=r"model=.*PixtralProcessor.*torchvision"):
        make_flux2(model=str(folder))
