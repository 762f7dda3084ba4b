"""The shipped text-rendering example: its config validates with the `ocr` reward, and every prompt of its
prompt files quotes the text the reward will look for."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowfactory.config import load
from flowfactory.train.data import load_prompts
from flowfactory_rewards_ocr import OCROptions
from flowfactory_rewards_ocr.reward import OCRReward

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
CONFIG = EXAMPLES / "sd3.5-medium-ocr.yaml"


def test_example_config_validates_with_the_ocr_reward():
    cfg, options = load(CONFIG)
    assert [r.name for r in cfg.rewards] == ["ocr"]
    assert options["rewards[0]"] == OCROptions(engine="rapidocr")


@pytest.mark.parametrize("name", ["ocr-train.txt", "ocr-eval.txt"])
def test_every_example_prompt_quotes_its_text(name):
    prompts = load_prompts(str(EXAMPLES / "prompts" / name))
    assert len(prompts) >= 8
    reward = OCRReward(OCROptions(), engine=object())  # targets only: no engine is called
    targets = [reward.target(p.text) for p in prompts]  # raises on a prompt without quoted text
    assert all(0 < len(t) <= 20 for t in targets), targets  # short words, as PP-OCR reads them best
    assert len(set(targets)) == len(targets)


def test_eval_prompts_are_held_out():
    train = set(load_prompts(str(EXAMPLES / "prompts" / "ocr-train.txt")))
    assert not train & set(load_prompts(str(EXAMPLES / "prompts" / "ocr-eval.txt")))
