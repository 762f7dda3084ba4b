"""The `ocr` reward: 1 - normalised edit distance between the prompt's quoted text and the text read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from flowfactory.errors import RewardError
from flowfactory.types import Samples
from flowfactory_rewards_ocr.engines import Engine, make_engine
from flowfactory_rewards_ocr.text import normalise, quoted_text, similarity

if TYPE_CHECKING:
    from flowfactory_rewards_ocr import OCROptions


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] float in [0, 1] (C = 1, 3 or 4) -> [B, H, W, 3] uint8, rounded; alpha is dropped."""
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        raise RewardError(f"ocr: images must be [B, C, H, W] with C = 1, 3 or 4; got shape {tuple(images.shape)}")
    x = images.detach()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class OCRReward:
    """Scores each image by how closely the text an OCR engine reads in it matches the prompt's quoted text."""

    groupwise = False
    handles_video = False  # the core scores a video as the mean over its frames

    def __init__(self, options: OCROptions, engine: Engine | None = None):
        self.options = options
        self.engine = engine if engine is not None else make_engine(options.engine,
                                                                   easyocr_models=options.easyocr_models)

    def _norm(self, text: str) -> str:
        return normalise(text, case_sensitive=self.options.case_sensitive, whitespace=self.options.whitespace)

    def target(self, prompt: str) -> str:
        """The normalised text the prompt asks for; an error naming the prompt when there is none."""
        o = self.options
        text = self._norm(quoted_text(prompt, single_quotes=o.single_quotes, unquoted=o.unquoted))
        if not text:
            raise RewardError(f"ocr: the prompt {prompt!r} quotes only empty or blank text; quote the words the image "
                              "must show")
        return text

    def read(self, image: np.ndarray) -> str:
        """The text the engine reads in one RGB uint8 image: its boxes above `min_confidence`, in reading order,
        joined by a space (not normalised)."""
        boxes = self.engine.read(image)
        return " ".join(text for text, conf in boxes if conf > self.options.min_confidence)

    def score(self, samples: Samples) -> torch.Tensor:
        if samples.images is None:
            raise RewardError("ocr: this reward scores images; got samples without images")
        targets: dict[str, str] = {}
        for p in samples.prompts:  # every prompt checked before any OCR runs
            if p not in targets:
                targets[p] = self.target(p)
        arrays = to_rgb_uint8(samples.images)
        if len(arrays) != len(samples.prompts):
            raise RewardError(f"ocr: {len(arrays)} images for {len(samples.prompts)} prompts")
        scores = []
        for prompt, image in zip(samples.prompts, arrays):
            read = self._norm(self.read(image))
            scores.append(similarity(targets[prompt], read, normalise_by=self.options.normalise_by,
                                     substring_match=self.options.substring_match))
        return torch.tensor(scores, dtype=torch.float32)
