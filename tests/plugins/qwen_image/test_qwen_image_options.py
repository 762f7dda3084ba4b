"""The qwen-image options model and the build-time errors: each names the option key and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flowfactory.errors import FlowFactoryError
from flowfactory.policies.options import DEFAULT_LORA_TARGETS
from flowfactory_qwen_image import QWEN_IMAGE_LORA_TARGETS, LoraOptions, QwenImageOptions


def error_text(raw: dict) -> str:
    with pytest.raises(ValidationError) as info:
        QwenImageOptions.model_validate(raw)
    return str(info.value)


def test_exactly_one_of_model_and_preset() -> None:
    for raw, got in (({}, "neither"), ({"model": "x/y", "preset": "tiny"}, "both")):
        text = error_text(raw)
        assert "`model`" in text and "`preset`" in text and got in text and "QwenImagePipeline" in text


def test_revision_needs_model() -> None:
    assert "`revision`" in error_text({"preset": "tiny", "revision": "main"})


@pytest.mark.parametrize("raw, key", [
    ({"preset": "tiny", "lorra": {}}, "lorra"),
    ({"preset": "tiny", "guidance_scale": 4.0}, "guidance_scale"),  # Qwen-Image's is true_cfg_scale
    ({"preset": "tiny", "lora": {"rank": 4, "scale": 2}}, "lora.scale"),
    ({"preset": "tiny", "lora": {"rank": 0}}, "lora.rank"),
    ({"preset": "tiny", "max_sequence_length": 1025}, "max_sequence_length"),
    ({"preset": "tiny", "true_cfg_scale": -1.0}, "true_cfg_scale"),
    ({"preset": "huge"}, "preset"),
    ({"preset": "tiny", "dtype": "float64"}, "dtype"),
])
def test_bad_values_name_their_key(raw: dict, key: str) -> None:
    assert key in error_text(raw)


def test_defaults() -> None:
    opts = QwenImageOptions.model_validate({"model": "Qwen/Qwen-Image", "lora": {"rank": 32}})
    assert opts.true_cfg_scale is None and opts.negative_prompt == " " and opts.lora is not None
    assert opts.lora.target_modules == list(DEFAULT_LORA_TARGETS) == list(QWEN_IMAGE_LORA_TARGETS)


def test_every_option_is_described() -> None:
    for model in (QwenImageOptions, LoraOptions):
        undocumented = [name for name, f in model.model_fields.items() if not f.description]
        assert undocumented == [], f"{model.__name__}: {undocumented}"


def test_missing_model_folder(qwen_spec, tmp_path) -> None:
    with pytest.raises(FlowFactoryError, match="option model=.*no such folder.*save_pretrained"):
        qwen_spec.create({"model": str(tmp_path / "nope")})


def test_folder_without_model_index(qwen_spec, tmp_path) -> None:
    with pytest.raises(FlowFactoryError, match="model_index.json"):
        qwen_spec.create({"model": str(tmp_path)})


def test_size_must_fit_packing(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33, width=32)


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\].*img_mlp"):
        make_policy(lora={"target_modules": ["to_q", "to_qkv"]})


def test_cfg_velocity_needs_negative_embeddings(make_policy, gens) -> None:
    import torch

    policy, plain = make_policy(true_cfg_scale=4.0), make_policy()
    with pytest.raises(KeyError, match="negative prompt"):
        policy.velocity(policy.noise(gens(1)), torch.tensor(0.5), plain.encode(["a cat"]))


def test_entry_point_imports_no_torch() -> None:
    code = ("import sys, flowfactory_qwen_image\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-qwen-image" / "README.md"


def test_readme_configs_validate_and_table_lists_every_option() -> None:
    text = README.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        policy = yaml.safe_load(block)["policy"]
        assert policy["name"] == "qwen-image"
        QwenImageOptions.model_validate(policy["options"])
    rows = set(re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|", text, flags=re.M))
    documented = {key for row in rows for key in row if key}
    expected = set(QwenImageOptions.model_fields) | {f"lora.{k}" for k in LoraOptions.model_fields}
    assert documented == expected
