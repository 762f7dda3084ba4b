"""flowfactory's reward contract suite, run on `ocr` with the real rapidocr engine.

The suite's own images are uniform noise, on which OCR reads nothing, so every image would score 0 and its
"scores depend on the images" check could not pass: here the images are each row's quoted text (or whole
prompt) rendered in black on light seeded noise, and the black images of that check score 0."""

from __future__ import annotations

from typing import ClassVar

import torch
from ocr_rendering import render_text

from flowfactory.testing import RewardContract


class _RenderedPrompts(RewardContract):
    component = "ocr"
    texts: ClassVar[tuple[str, ...]] = ()  # what each prompt asks the image to show

    @classmethod
    def images(cls, seed: int = 0) -> torch.Tensor:
        n = len(cls.prompts) * cls.group_size
        clean = torch.stack([render_text(cls.texts[r // cls.group_size], width=224, height=40, size=18) for r in range(n)])
        noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed))
        return (clean * 0.9 + noise * 0.1).clamp(0, 1)


class TestOCRContractQuotedPrompts(_RenderedPrompts):
    prompts = ('a shop sign that says "OPEN"', "a mug that reads “TEA”", "a poster that says 'SALE'")
    texts = ("OPEN", "TEA", "SALE")


class TestOCRContractWholePrompt(_RenderedPrompts):
    """The suite's own prompts, which quote nothing, scored against the whole prompt."""

    options = {"unquoted": "whole-prompt"}
    texts = RewardContract.prompts
