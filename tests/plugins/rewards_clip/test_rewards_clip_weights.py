"""Weight files: code in a pickle never runs, non-tensor contents are refused, errors name the option; the open_clip
key conversion against a genuine open_clip model when its source is available."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from flowfactory.errors import FlowFactoryError


class _Payload:
    """Unpickling this opens (creates) the marker file: code a weights file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_and_never_runs(make_reward: Any, tiny: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    armed = tmp_path / "armed.pth"
    torch.save({**tiny.aesthetic_sd, "extra": _Payload(marker)}, armed)
    for name, options in (("aesthetic", {"weights": str(armed)}), ("hpsv2", {"checkpoint": str(armed)})):
        with pytest.raises(FlowFactoryError, match=f"option {'weights' if name == 'aesthetic' else 'checkpoint'}="
                                                   r".*refused.*weights_only=True.*safetensors"):
            make_reward(name, **options)
    assert not marker.exists()
    torch.load(armed, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()


def test_non_tensor_contents_and_wrong_files(make_reward: Any, tiny: Any, tmp_path: Path) -> None:
    listed = tmp_path / "listed.pth"
    torch.save({**tiny.aesthetic_sd, "layers.0.weight": [1.0, 2.0]}, listed)
    with pytest.raises(FlowFactoryError, match=r"option weights=.*not tensors: 'layers.0.weight' \(list\)"):
        make_reward("aesthetic", weights=str(listed))
    with pytest.raises(FlowFactoryError, match="option weights=.*no such file"):
        make_reward("aesthetic", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(FlowFactoryError, match="option weights=.*not the improved-aesthetic-predictor MLP"):
        make_reward("aesthetic", weights=str(tiny.hps))
    # the published layout (768-1024-128-64-16-1) loads, and is refused next to a CLIP with other embeddings
    published = tmp_path / "published.pth"
    widths = (768, 1024, 128, 64, 16, 1)
    torch.save({f"layers.{i}.{p}": torch.zeros((o, n) if p == "weight" else (o,))
                for (n, o), i in zip(zip(widths[:-1], widths[1:]), (0, 2, 4, 6, 7)) for p in ("weight", "bias")},
               published)
    with pytest.raises(FlowFactoryError, match="takes 768-d embeddings but clip_model=.* gives 16-d"):
        make_reward("aesthetic", weights=str(published))


def test_a_checkpoint_that_is_not_open_clip_is_refused(make_reward: Any, tiny: Any, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {**torch.load(tiny.hps, weights_only=True)["state_dict"],
                               "visual.head.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(FlowFactoryError, match=r"option checkpoint=.*open_clip ViT CLIP does not have: "
                                               r"\['visual.head.weight'\]"):
        make_reward("hpsv2", checkpoint=str(foreign))
    truncated = tmp_path / "truncated.pt"
    sd = torch.load(tiny.hps, weights_only=True)["state_dict"]
    torch.save({k: v for k, v in sd.items() if not k.startswith("ln_final")}, truncated)
    with pytest.raises(FlowFactoryError, match="option checkpoint=.*does not fit the CLIP.*final_layer_norm"):
        make_reward("hpsv2", checkpoint=str(truncated))


def test_missing_folders_name_the_option(make_reward: Any, tiny: Any, tmp_path: Path) -> None:
    with pytest.raises(FlowFactoryError, match="pickscore option model=.*no such folder.*save_pretrained"):
        make_reward("pickscore", model=str(tmp_path / "nope"))
    with pytest.raises(FlowFactoryError, match="clip-score option processor=.*could not load a CLIPProcessor"):
        make_reward("clip-score", processor=str(tmp_path))
    with pytest.raises(FlowFactoryError, match="hpsv2 option architecture=.*no config.json"):
        make_reward("hpsv2", architecture=str(tmp_path))
    from transformers import CLIPConfig

    narrow = CLIPConfig.from_pretrained(tiny.arch)
    narrow.projection_dim = 8  # the checkpoint projects to 16
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(FlowFactoryError, match=r"hpsv2 option checkpoint=.*does not fit the CLIP of hpsv2 option "
                                               r"architecture=.*size mismatch for .*_projection.weight"):
        make_reward("hpsv2", architecture=str(tmp_path / "narrow"))


def _open_clip_model_module() -> Any:
    """open_clip's own model.py (with transformer.py and the rest of its package beside it), loaded from its
    installed source without running the package's __init__, which imports torchvision: the one name it needs
    from torchvision (FrozenBatchNorm2d, for ResNet towers this test does not build) is stubbed while loading."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip's source is not installed (pip install --no-deps open_clip_torch, or put its "
                    "unpacked wheel on PYTHONPATH)")
    name = "_flowfactory_test_open_clip"
    package = types.ModuleType(name)
    package.__path__ = [str(Path(spec.origin).parent)]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, name, package)
        for mod, value in (("torchvision", types.ModuleType("torchvision")),
                           ("torchvision.ops", types.ModuleType("torchvision.ops")), ("torchvision.ops.misc", misc)):
            mp.setitem(sys.modules, mod, value)
        try:
            return importlib.import_module(f"{name}.model")
        finally:
            for key in [k for k in sys.modules if k.startswith(name + ".")]:
                del sys.modules[key]


def test_conversion_of_a_genuine_open_clip_model(make_reward: Any, tiny: Any, tmp_path: Path) -> None:
    """A real open_clip CLIP (its VisionTransformer and TextTransformer), tiny and random, shaped like the
    `arch` folder's CLIPModel; its state_dict converted by hpsv2 must give the same image and text embeddings
    as open_clip's own encode_image / encode_text."""
    model_py = _open_clip_model_module()
    from transformers import CLIPConfig

    cfg = CLIPConfig.from_pretrained(tiny.arch)
    t, v = cfg.text_config, cfg.vision_config
    torch.manual_seed(7)
    oc = model_py.CLIP(
        embed_dim=cfg.projection_dim,
        vision_cfg=dict(layers=v.num_hidden_layers, width=v.hidden_size, head_width=v.hidden_size // v.num_attention_heads,
                        mlp_ratio=v.intermediate_size / v.hidden_size, patch_size=v.patch_size, image_size=v.image_size),
        text_cfg=dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                      heads=t.num_attention_heads, layers=t.num_hidden_layers,
                      mlp_ratio=t.intermediate_size / t.hidden_size, pool_type="eos", eos_id=t.eos_token_id),
        quick_gelu=False).eval()
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": oc.state_dict()}, path)
    reward = make_reward("hpsv2", checkpoint=str(path))
    images = torch.rand(3, 3, 40, 30, generator=torch.Generator().manual_seed(8))
    prompts = ["a red square", "a blue circle on a white field", "x"]
    tokens = reward.embedder.tokenizer(prompts, padding="max_length", max_length=t.max_position_embeddings,
                                       truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        img = oc.encode_image(reward.embedder.transform(images), normalize=True)
        txt = oc.encode_text(tokens, normalize=True)
    torch.testing.assert_close(reward.embedder.images(images), img, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(reward.embedder.texts(prompts), txt, atol=2e-6, rtol=1e-5)
    from flowfactory.types import Samples

    torch.testing.assert_close(reward.score(Samples(prompts=prompts, images=images)), (img * txt).sum(-1),
                               atol=2e-6, rtol=1e-5)
