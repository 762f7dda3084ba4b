"""The sd3 options model and the build-time errors: each names the option key and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flowfactory.errors import FlowFactoryError
from flowfactory_sd3 import DEFAULT_LORA_TARGETS, LoraOptions, SD3Options


def error_text(raw: dict) -> str:
    with pytest.raises(ValidationError) as info:
        SD3Options.model_validate(raw)
    return str(info.value)


def test_exactly_one_of_model_and_preset() -> None:
    for raw, got in (({}, "neither"), ({"model": "x/y", "preset": "tiny"}, "both")):
        text = error_text(raw)
        assert "`model`" in text and "`preset`" in text and got in text


def test_revision_needs_model() -> None:
    assert "`revision`" in error_text({"preset": "tiny", "revision": "main"})


@pytest.mark.parametrize("raw, key", [
    ({"preset": "tiny", "lorra": {}}, "lorra"),
    ({"preset": "tiny", "lora": {"rank": 4, "scale": 2}}, "lora.scale"),
    ({"preset": "tiny", "lora": {"rank": 0}}, "lora.rank"),
    ({"preset": "tiny", "max_sequence_length": 513}, "max_sequence_length"),
    ({"preset": "huge"}, "preset"),
    ({"preset": "tiny", "dtype": "float64"}, "dtype"),
])
def test_bad_values_name_their_key(raw: dict, key: str) -> None:
    assert key in error_text(raw)


def test_defaults() -> None:
    opts = SD3Options.model_validate({"model": "stabilityai/stable-diffusion-3.5-medium", "lora": {"rank": 32}})
    assert opts.guidance_scale is None and opts.negative_prompt == "" and opts.lora is not None
    assert opts.lora.alpha is None
    assert opts.lora.target_modules == list(DEFAULT_LORA_TARGETS)
    assert "to_out.0" in opts.lora.target_modules and "add_q_proj" in opts.lora.target_modules


def test_every_option_is_described() -> None:
    for model in (SD3Options, LoraOptions):
        undocumented = [name for name, f in model.model_fields.items() if not f.description]
        assert undocumented == [], f"{model.__name__}: {undocumented}"


def test_missing_model_folder(sd3_spec, tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FlowFactoryError, match="option model=.*no such folder.*save_pretrained"):
        sd3_spec.create({"model": str(missing)})


def test_folder_without_model_index(sd3_spec, tmp_path) -> None:
    with pytest.raises(FlowFactoryError, match="model_index.json"):
        sd3_spec.create({"model": str(tmp_path)})


def test_size_must_fit_packing(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"height=33, width=32.*multiples of 2.*try height: 32"):
        make_policy(height=33, width=32)


def test_size_must_fit_the_position_table(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"pos_embed_max_size 32.*at most 64 pixels"):
        make_policy(height=128, width=128)


def test_unknown_lora_target(make_policy) -> None:
    with pytest.raises(FlowFactoryError, match=r"lora.target_modules: \['to_qkv'\]"):
        make_policy(lora={"target_modules": ["to_q", "to_qkv"]})


def test_entry_point_imports_no_torch() -> None:
    code = ("import sys, flowfactory_sd3\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


README = Path(__file__).resolve().parents[3] / "plugins" / "flowfactory-sd3" / "README.md"


def test_readme_configs_validate_and_table_lists_every_option() -> None:
    text = README.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        policy = yaml.safe_load(block)["policy"]
        assert policy["name"] == "sd3"
        SD3Options.model_validate(policy["options"])
    rows = set(re.findall(r"^\| `([\w.]+)`(?:, `([\w.]+)`)? \|", text, flags=re.M))
    documented = {key for row in rows for key in row if key}
    expected = set(SD3Options.model_fields) | {f"lora.{k}" for k in LoraOptions.model_fields}
    assert documented == expected
