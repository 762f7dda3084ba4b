"""Tiny random CLIP models, processors and weight files for the CLIP reward tests, built once per session.

Nothing is downloaded: the tokenizer is flowfactory_diffusers.tokenizers' character-level CLIP BPE, the models are
random `CLIPModel(CLIPConfig(...))` saved with save_pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

IMAGE = 24  # the tiny processor's shortest_edge and crop
MEAN = (0.45, 0.5, 0.4)  # not CLIP's own numbers, so a hard-coded mean/std would show
STD = (0.25, 0.2, 0.3)
MAX_POSITIONS = 32  # the text model's length; the tokenizer's own model_max_length is 77


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Each test in this folder runs torch on one thread: the models are tiny, and on a shared 2-core machine
    two threads per op cost more in synchronisation than they gain (the folder runs 2-3x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip(seed: int, act: str = "quick_gelu", eos: int = 1, vocab: int | None = None) -> Any:
    from transformers import CLIPConfig, CLIPModel

    from flowfactory_diffusers.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=vocab or len(clip_tokenizer()), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_POSITIONS,
                hidden_act=act, bos_token_id=0, eos_token_id=eos, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE, patch_size=8, hidden_act=act)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return CLIPModel(config).eval()


def tiny_processor() -> Any:
    from transformers import CLIPImageProcessor, CLIPProcessor

    from flowfactory_diffusers.tokenizers import clip_tokenizer

    images = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                image_mean=list(MEAN), image_std=list(STD), resample=3)
    return CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer())


def to_open_clip(model: Any) -> dict[str, torch.Tensor]:
    """The test's own inverse of the reward's converter, written from open_clip's module layout (CLIP:
    visual.{conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks, ln_post, proj}, and
    token_embedding, positional_embedding, transformer.resblocks, ln_final, text_projection, logit_scale; each
    block: ln_1, attn (nn.MultiheadAttention: in_proj_weight = [q; k; v]), ln_2, mlp.c_fc, mlp.c_proj)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            a, b = f"{src}.encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            out[b + "ln_1.weight"], out[b + "ln_1.bias"] = sd[a + "layer_norm1.weight"], sd[a + "layer_norm1.bias"]
            out[b + "ln_2.weight"], out[b + "ln_2.bias"] = sd[a + "layer_norm2.weight"], sd[a + "layer_norm2.bias"]
            for kind in ("weight", "bias"):
                out[b + f"attn.in_proj_{kind}"] = torch.cat(
                    [sd[a + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
                out[b + f"attn.out_proj.{kind}"] = sd[a + f"self_attn.out_proj.{kind}"]
                out[b + f"mlp.c_fc.{kind}"] = sd[a + f"mlp.fc1.{kind}"]
                out[b + f"mlp.c_proj.{kind}"] = sd[a + f"mlp.fc2.{kind}"]

    cfg = model.config
    blocks("text_model", "", cfg.text_config.num_hidden_layers)
    blocks("vision_model", "visual.", cfg.vision_config.num_hidden_layers)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.ln_pre.weight"] = sd["vision_model.pre_layrnorm.weight"]
    out["visual.ln_pre.bias"] = sd["vision_model.pre_layrnorm.bias"]
    out["visual.ln_post.weight"] = sd["vision_model.post_layernorm.weight"]
    out["visual.ln_post.bias"] = sd["vision_model.post_layernorm.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    return {k: v.clone() for k, v in out.items()}


def aesthetic_mlp_state(seed: int, widths: tuple[int, ...] = (16, 24, 12, 8, 4, 1)) -> dict[str, torch.Tensor]:
    """Random weights in the improved-aesthetic-predictor layout: Linear layers at layers.{0,2,4,6,7}."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for (i, o), idx in zip(zip(widths[:-1], widths[1:]), (0, 2, 4, 6, 7)):
        sd[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        sd[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


@dataclass
class Tiny:
    root: Path
    clip: Path  # a quick_gelu CLIPModel + CLIPProcessor (pickscore, clip-score, aesthetic)
    arch: Path  # a gelu CLIPModel + CLIPProcessor: the hpsv2 architecture (its weights are never used)
    hps: Path  # {"state_dict": open_clip layout} of another gelu model (seed 2), torch.save'd
    hps_model: Any  # that model
    aesthetic_st: Path
    aesthetic_pth: Path
    aesthetic_sd: dict[str, torch.Tensor]
    image: int = IMAGE  # the processor's size
    std: tuple[float, ...] = STD  # the processor's image_std

    def options(self, reward: str) -> dict[str, Any]:
        return {
            "pickscore": {"model": str(self.clip), "processor": str(self.clip)},
            "pickscore-rank": {"model": str(self.clip), "processor": str(self.clip)},
            "clip-score": {"model": str(self.clip)},
            "aesthetic": {"clip_model": str(self.clip), "weights": str(self.aesthetic_st)},
            "hpsv2": {"checkpoint": str(self.hps), "architecture": str(self.arch)},
        }[reward]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-clip")
    processor = tiny_processor()
    clip, arch = root / "clip", root / "arch"
    tiny_clip(0).save_pretrained(clip)
    processor.save_pretrained(clip)
    tiny_clip(1, act="gelu").save_pretrained(arch)
    processor.save_pretrained(arch)
    hps_model = tiny_clip(2, act="gelu")
    torch.save({"state_dict": to_open_clip(hps_model), "epoch": 3}, root / "hps.pt")
    sd = aesthetic_mlp_state(0)
    save_file(sd, str(root / "aesthetic.safetensors"))
    torch.save(sd, root / "aesthetic.pth")
    return Tiny(root, clip, arch, root / "hps.pt", hps_model, root / "aesthetic.safetensors",
                root / "aesthetic.pth", sd)


@pytest.fixture(scope="session")
def make_reward(tiny: Tiny) -> Any:
    """make_reward(name, **options): the reward built through the registry on the tiny files."""
    from flowfactory.plugins import load
    from flowfactory.registry import BuildContext

    registry = load(strict=True).registry

    def make(name: str, **options: Any) -> Any:
        return registry.get("reward", name).create({**tiny.options(name), **options}, BuildContext(seed=0))

    return make
