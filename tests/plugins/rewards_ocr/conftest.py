"""Shared by the OCR reward's tests: text rendered with PIL's own font, and one rapidocr engine for the
whole session (loading it is the slow part)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from ocr_rendering import render_text

Render = Callable[..., torch.Tensor]


@pytest.fixture(scope="session")
def render() -> Render:
    return render_text


@pytest.fixture(scope="session")
def rapidocr_engine() -> Any:
    from flowfactory_rewards_ocr.engines import RapidOCREngine

    return RapidOCREngine()


@pytest.fixture(scope="session")
def make_reward(rapidocr_engine: Any) -> Callable[..., Any]:
    """make_reward(**options): an `ocr` reward with those options on the session's rapidocr engine."""
    from flowfactory_rewards_ocr import OCROptions
    from flowfactory_rewards_ocr.reward import OCRReward

    return lambda **options: OCRReward(OCROptions(**options), engine=rapidocr_engine)
