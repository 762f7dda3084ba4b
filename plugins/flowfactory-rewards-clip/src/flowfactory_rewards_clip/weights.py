"""Weight files: loaded as plain tensors only, and open_clip's CLIP key layout mapped onto transformers' CLIPModel.

`.safetensors` files hold tensors by construction. Any other file (`.pth`, `.pt`, ...) goes through
`torch.load(..., weights_only=True)`, whose unpickler builds tensors, containers and plain values and refuses
everything else, so a file that carries code is an error and the code never runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError

_METADATA = (int, float, str, bool, type(None))


def load_tensors(path: str, where: str, expected: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from `path` (or from its "state_dict" entry), on the CPU.

    `where` is "reward option key=value" and `expected` says which file belongs there; both go into the errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FlowFactoryError(f"{where}: no such file. Give the path of {expected} (a relative path is "
                               "resolved against the config's folder).")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(file), device="cpu"))
        except Exception as exc:
            raise FlowFactoryError(f"{where}: not a readable safetensors file ({exc}). Give {expected}.") from exc
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowFactoryError(
            f"{where}: refused: the file is not plain tensors that torch.load(weights_only=True) can read "
            f"({first}). flowfactory never unpickles objects from a weights file, since unpickling can run "
            f"code. Give {expected}; a file from a source you trust can be re-saved as .safetensors "
            "(safetensors.torch.save_file) and used instead.") from exc
    return _state_dict(obj, where, expected)


def _state_dict(obj: Any, where: str, expected: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        others = {k: v for k, v in obj.items() if k != "state_dict"}
        bad = [k for k, v in others.items() if not isinstance(v, _METADATA)]
        if bad:
            raise FlowFactoryError(f"{where}: the checkpoint holds {bad[:5]} besides its state_dict, which are "
                                   f"not plain values; give {expected}.")
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise FlowFactoryError(f"{where}: the file holds {type(obj).__name__}, not a state dict of tensors; "
                               f"give {expected}.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FlowFactoryError(f"{where}: the state dict has entries that are not tensors: "
                               f"{', '.join(bad[:5])}; give {expected}.")
    return dict(obj)


# --- LAION improved aesthetic predictor ------------------------------------------------------------------------

AESTHETIC_LINEAR = (0, 2, 4, 6, 7)  # indices of the Linear layers in its nn.Sequential (dropouts between)


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head: Linear layers 768-1024-128-64-16-1 with dropout after the first
    three and no activation (the published `linearMSE` weights), as `layers.{0,2,4,6,7}`. The widths are read
    from the weights; in eval mode the dropouts are the identity."""

    def __init__(self, widths: list[int], dropouts: tuple[float, ...] = (0.2, 0.2, 0.1)):
        super().__init__()
        mods: list[torch.nn.Module] = []
        for i in range(len(widths) - 1):
            mods.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i < len(dropouts):
                mods.append(torch.nn.Dropout(dropouts[i]))
        self.layers = torch.nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], where: str) -> AestheticMLP:
        want = {f"layers.{i}.{p}" for i in AESTHETIC_LINEAR for p in ("weight", "bias")}
        if set(sd) != want:
            raise FlowFactoryError(
                f"{where}: not the improved-aesthetic-predictor MLP: expected the keys {sorted(want)}, found "
                f"{sorted(sd)[:10]}. Give sac+logos+ava1-l14-linearMSE.pth (or the same tensors as .safetensors).")
        widths = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in AESTHETIC_LINEAR]
        mlp = cls(widths)
        try:
            mlp.load_state_dict(sd)
        except RuntimeError as exc:
            raise FlowFactoryError(f"{where}: the MLP's layer shapes do not chain ({exc}).") from exc
        if widths[-1] != 1:
            raise FlowFactoryError(f"{where}: the MLP's last layer has {widths[-1]} outputs, not 1.")
        return mlp.eval()


# --- open_clip -> transformers CLIPModel -------------------------------------------------------------------------

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "text_projection.weight": "text_projection.weight",  # open_clip towers whose projection is an nn.Linear
}
_TRANSPOSED = {  # open_clip multiplies x @ proj; transformers' Linear holds proj.T
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_IGNORED = {"attn_mask"}  # a buffer older open_clip versions saved; rebuilt by the model
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_transformers(sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT image tower, text transformer) under transformers' CLIPModel names.

    Each block's fused `attn.in_proj_weight` / `in_proj_bias` ([3 * width, ...], rows q, k, v) is split into
    `self_attn.q_proj`, `k_proj`, `v_proj`; `visual.proj` and `text_projection` are transposed. A `module.`
    prefix (a DistributedDataParallel save) is dropped. Keys it does not know are an error naming them."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw, value in sd.items():
        key = raw.removeprefix("module.")
        if key in _IGNORED:
            continue
        if key in _DIRECT:
            out[_DIRECT[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            unknown.append(raw)
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight / bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        elif rest in _BLOCK:
            out[prefix + _BLOCK[rest]] = value
        else:
            unknown.append(raw)
    if unknown:
        raise FlowFactoryError(
            f"{where}: keys an open_clip ViT CLIP does not have: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}. "
            "Give the HPS v2.1 checkpoint (HPS_v2.1_compressed.pt), an open_clip ViT-H-14 state dict.")
    return out
