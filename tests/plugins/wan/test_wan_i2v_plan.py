"""`ff plan` for wan-i2v on the real-size stored configs, offline: Wan 2.1 I2V 14B 480P
(tests/data/model-configs/wan2.1-i2v-14b-480p) and Wan 2.2 I2V A14B (tests/data/model-configs/wan2.2-i2v-a14b).

Those folders hold config files only (model_index.json, each component's config, the scheduler's and, for Wan 2.1,
the CLIP image processor's; no weights, no tokenizer files). They were written from knowledge of the configs
published in Wan-AI/Wan2.1-I2V-14B-480P-Diffusers and Wan-AI/Wan2.2-I2V-A14B-Diffusers and from the diffusers
class signatures (every key of WanTransformer3DModel and AutoencoderKLWan written out, the ones newer than the
published files at the library's defaults), not downloaded. The parameter counts below are what those configs
build on the meta device; the test derives each from the others and from Wan's published shapes, which is the
check that the configs are the real models'."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from flowfactory import config as ff_config
from flowfactory.plan import MemoryPlan, PolicyPlan, plan_memory
from flowfactory.plugins import get_registry
from flowfactory.registry import BuildContext

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "tests" / "data" / "model-configs"
PROMPTS = ROOT / "examples" / "prompts" / "wan-i2v-train.jsonl"  # first frames: wan-i2v plans only image records

DIM, LAYERS, CLIP_DIM = 5120, 40, 1280  # Wan 14B's width and blocks; CLIP ViT-H/14's width
WAN_2_2_EXPERT = 14_288_901_184  # each of Wan 2.2 I2V A14B's two experts
# what Wan 2.1 I2V adds to an expert of the same shape: per block the image cross-attention's key/value projections
# and the key's RMSNorm, and the CLIP image embedder (LayerNorm, Linear 1280->1280, GELU, Linear 1280->5120, LayerNorm)
IMAGE_ATTENTION = LAYERS * (2 * (DIM * DIM + DIM) + DIM)
IMAGE_EMBEDDER = 2 * CLIP_DIM + (CLIP_DIM * CLIP_DIM + CLIP_DIM) + (CLIP_DIM * DIM + DIM) + 2 * DIM
WAN_2_1_I2V = 16_394_878_784
CLIP_VIT_H = 632_076_800  # CLIPVisionModelWithProjection, ViT-H/14 with its 1280 -> 1024 projection
UMT5_XXL = 5_680_910_336  # the encoder of umt5-xxl, as in wan2.1-t2v-1.3b
WAN_VAE = 126_892_531  # Wan 2.1's VAE, which Wan 2.2 A14B keeps
ROPE = 2 * 1024 * 128  # a transformer's buffers: the rotary cos and sin tables, cast to bfloat16 with the weights


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a read of the hub (or anything else) fails the test instead of being answered."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("test_wan_i2v_plan: no network (the plan reads the stored configs only)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def plan_of(folder: str, processes: int = 1, **options: Any) -> MemoryPlan:
    data = {"policy": {"name": "wan-i2v", "options": {"model": str(CONFIGS / folder), **options}},
            "sampler": {"name": "flow-sde", "options": {"steps": 10}}, "rewards": [{"name": "edit-colour"}],
            "optimizer": {"name": "grpo", "options": {"kl_beta": 0.0}},
            "data": {"train": str(PROMPTS), "eval": None},
            "train": {"prompts_per_epoch": 8, "group_size": 2, "parallel": {"strategy": "fsdp"}}}
    cfg, opts = ff_config.validate(data, "<test>", get_registry())
    return plan_memory(cfg, opts, get_registry(), processes)


def policy_plan(folder: str) -> PolicyPlan:
    """The policy's own plan (parts, latents, per-prompt conditioning) at the pipeline's defaults."""
    spec = get_registry().get("policy", "wan-i2v")
    return spec.plan(spec.validate_options({"model": str(CONFIGS / folder)}), BuildContext(seed=0))


def parts(plan: MemoryPlan) -> dict[str, tuple[int, int]]:
    return {p.name: (p.parameters, p.trainable_elements) for p in plan.parts}


def lora_elements(rank: int, modules: int) -> int:
    """A rank-`rank` adapter on `modules` 5120 -> 5120 projections in each of the 40 blocks."""
    return LAYERS * modules * rank * (DIM + DIM)


def test_the_stored_configs_are_the_published_pipelines() -> None:
    from diffusers import WanImageToVideoPipeline

    wan21, wan22 = CONFIGS / "wan2.1-i2v-14b-480p", CONFIGS / "wan2.2-i2v-a14b"
    index21 = WanImageToVideoPipeline.load_config(wan21)
    index22 = WanImageToVideoPipeline.load_config(wan22)
    assert index21["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert "transformer_2" not in index21 and index21.get("boundary_ratio") is None
    assert index22["image_encoder"] == [None, None] and index22["boundary_ratio"] == 0.9
    assert index22["transformer_2"] == index22["transformer"] == ["diffusers", "WanTransformer3DModel"]

    def config(folder: Path, name: str, file: str = "config.json") -> dict[str, Any]:
        return json.loads((folder / name / file).read_text())

    t21, t22 = config(wan21, "transformer"), config(wan22, "transformer")
    assert config(wan22, "transformer_2") == t22
    assert {k: v for k, v in t21.items() if k not in ("image_dim", "added_kv_proj_dim", "_diffusers_version")} == \
           {k: v for k, v in t22.items() if k not in ("image_dim", "added_kv_proj_dim", "_diffusers_version")}
    assert (t21["image_dim"], t21["added_kv_proj_dim"], t22["image_dim"], t22["added_kv_proj_dim"]) == \
           (CLIP_DIM, DIM, None, None)
    assert t21["in_channels"] == 16 + 4 + 16  # noise, frame mask, image latents
    assert config(wan21, "scheduler", "scheduler_config.json")["flow_shift"] == 3.0
    assert config(wan22, "scheduler", "scheduler_config.json")["flow_shift"] == 5.0
    assert config(wan21, "vae") == config(wan22, "vae") | {"_diffusers_version": "0.33.0.dev0"}


def test_wan_2_1_i2v_14b_has_16_4b_transformer_parameters() -> None:
    assert WAN_2_1_I2V == WAN_2_2_EXPERT + IMAGE_ATTENTION + IMAGE_EMBEDDER
    full = plan_of("wan2.1-i2v-14b-480p")
    assert parts(full) == {"transformer": (WAN_2_1_I2V, WAN_2_1_I2V), "image_encoder": (CLIP_VIT_H, 0),
                           "text_encoder": (UMT5_XXL, 0), "vae": (WAN_VAE, 0)}
    assert full.row("trainable parameters").bytes == 4 * WAN_2_1_I2V  # float32 master weights
    # the pipeline's defaults: 81 frames of 480x832, CFG 5.0, 512 text tokens (the last 512 context tokens are
    # the text for the image cross-attention)
    assert dict(policy_plan("wan2.1-i2v-14b-480p").conditioning) == {
        "prompt_embeds": ((512, 4096), "bfloat16"), "negative_prompt_embeds": ((512, 4096), "bfloat16"),
        "image_condition": ((20, 21, 60, 104), "float32"),  # frame mask (4) and image latents (16)
        "image_embeds": ((1, 257, CLIP_DIM), "bfloat16")}  # CLIP's 16 x 16 patches and the class token

    lora = plan_of("wan2.1-i2v-14b-480p", lora={"rank": 32})
    # the default targets: attn1's and attn2's to_q/to_k/to_v/to_out.0 and the image projections add_k/add_v_proj
    assert parts(lora)["transformer"] == (WAN_2_1_I2V + lora_elements(32, 10), lora_elements(32, 10))
    assert lora.row("frozen transformer weights").bytes == 2 * (WAN_2_1_I2V + ROPE)  # bfloat16 base
    text = plan_of("wan2.1-i2v-14b-480p", lora={"rank": 32, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    assert parts(text)["transformer"][1] == lora_elements(32, 8)

    eight = plan_of("wan2.1-i2v-14b-480p", 8, lora={"rank": 32})
    assert eight.row("trainable parameters").bytes == 4 * lora_elements(32, 10) // 8
    assert eight.row("frozen transformer weights").bytes == 2 * (WAN_2_1_I2V + ROPE) // 8
    assert eight.row("text encoders").bytes == lora.row("text encoders").bytes  # replicated


def test_wan_2_2_i2v_a14b_has_two_14_3b_experts() -> None:
    full = plan_of("wan2.2-i2v-a14b")
    assert parts(full) == {"transformer": (WAN_2_2_EXPERT, WAN_2_2_EXPERT),
                           "transformer_2": (WAN_2_2_EXPERT, WAN_2_2_EXPERT),
                           "text_encoder": (UMT5_XXL, 0), "vae": (WAN_VAE, 0)}
    assert full.row("trainable parameters").bytes == 2 * 4 * WAN_2_2_EXPERT
    assert dict(policy_plan("wan2.2-i2v-a14b").conditioning) == {  # no image encoder: the image only through its latents
        "prompt_embeds": ((512, 4096), "bfloat16"), "negative_prompt_embeds": ((512, 4096), "bfloat16"),
        "image_condition": ((20, 21, 60, 104), "float32")}

    # the default targets without add_k_proj/add_v_proj, which this model lacks (lora_optional_targets)
    lora = plan_of("wan2.2-i2v-a14b", lora={"rank": 32})
    expert = (WAN_2_2_EXPERT + lora_elements(32, 8), lora_elements(32, 8))
    assert parts(lora)["transformer"] == parts(lora)["transformer_2"] == expert
    assert lora.row("frozen transformer weights").bytes == 2 * 2 * (WAN_2_2_EXPERT + ROPE)

    eight = plan_of("wan2.2-i2v-a14b", 8, lora={"rank": 32})
    assert eight.row("frozen transformer weights").bytes == 2 * 2 * (WAN_2_2_EXPERT + ROPE) // 8


def test_the_default_lora_targets_name_the_image_projections() -> None:
    from flowfactory_wan import WAN_I2V_LORA_TARGETS, WAN_IMAGE_LORA_TARGETS
    from flowfactory_wan.i2v import WanI2VPolicy

    opts = get_registry().get("policy", "wan-i2v").validate_options({"model": "x/y", "lora": {"rank": 4}})
    assert opts.lora.target_modules == list(WAN_I2V_LORA_TARGETS)
    assert set(WAN_IMAGE_LORA_TARGETS) == {"add_k_proj", "add_v_proj"} <= set(opts.lora.target_modules)
    assert WanI2VPolicy.lora_optional_targets == WAN_IMAGE_LORA_TARGETS
