"""The `ocr` reward on PIL-rendered text read by the real rapidocr (PP-OCR ONNX) models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowfactory.errors import RewardError
from flowfactory.train.rewards import score_one
from flowfactory.types import Samples
from flowfactory_rewards_ocr.reward import to_rgb_uint8

SIGN = 'a shop sign that says "{}"'


def scores(reward, images, prompts):
    return reward.score(Samples(prompts=list(prompts), images=torch.stack(list(images)))).tolist()


class TestOnRenderedText:
    """One batch of rendered images, scored once for the class."""

    cases = [  # (rendered lines, the text the prompt quotes)
        ("HELLO WORLD", "HELLO WORLD"),
        ("OPEN 24 HOURS", "OPEN 24 HOURS"),
        ("Fresh Coffee", "FRESH COFFEE"),
        (["OPEN", "24 HOURS"], "OPEN 24 HOURS"),  # two lines, read in order
        ("", "HELLO WORLD"),                       # blank
        ("HELLO", "HELLO WORLD"),                  # half of it
        ("HELLO WURLD", "HELLO WORLD"),            # one letter wrong
        ("BAKERY", "HELLO WORLD"),                 # other text
    ]

    @pytest.fixture(scope="class")
    @classmethod
    def scored(cls, make_reward, render):
        reward = make_reward()
        return scores(reward, [render(lines) for lines, _ in cls.cases], [SIGN.format(t) for _, t in cls.cases])

    def test_the_quoted_text_rendered_scores_near_1(self, scored):
        assert scored[:4] == pytest.approx([1.0] * 4, abs=0.1), scored  # measured: 1.0, 1.0, 1.0, 1.0

    def test_a_blank_image_scores_0(self, scored):
        assert scored[4] == 0.0

    def test_partial_text_scores_in_between(self, scored):
        assert scored[5] == pytest.approx(0.5, abs=0.1)   # "hello" for "helloworld": 5 of 10 missing
        assert scored[6] == pytest.approx(0.9, abs=0.1)   # one substitution in 10
        assert scored[7] < 0.3                            # "bakery": 9 edits for 10 characters

    def test_whitespace_is_removed_because_pp_ocr_drops_spaces(self, make_reward, render):
        image, prompt = render("OPEN 24 HOURS"), SIGN.format("OPEN 24 HOURS")
        assert make_reward().read((image.permute(1, 2, 0) * 255).round().byte().numpy()) == "OPEN24HOURS"
        collapsed = scores(make_reward(whitespace="collapse"), [image], [prompt])[0]
        assert collapsed == pytest.approx(1 - 2 / 13)  # the perfect image, two "missing" spaces


def test_scores_against_the_quoted_text_not_the_whole_prompt(make_reward, render):
    """Flow-Factory's bug: the read text was compared with the whole prompt, so a perfect image scored low."""
    prompt = 'a red stop sign at a crossroads that says "STOP"'
    image = render("STOP")
    assert scores(make_reward(), [image], [prompt]) == [1.0]
    whole = make_reward(unquoted="whole-prompt")
    assert scores(whole, [image], ["a red stop sign at a crossroads that says STOP"])[0] < 0.2


def test_options_change_the_comparison(make_reward, render):
    images = [render("Open Now", width=320), render("OPEN NOW PLEASE", width=320)]
    prompts = [SIGN.format("OPEN NOW"), SIGN.format("OPEN NOW")]
    assert scores(make_reward(), images, prompts) == [1.0, 1.0]  # case folded; target inside the reading
    exact_case = scores(make_reward(case_sensitive=True), images, prompts)
    assert exact_case[0] == pytest.approx(1 - 5 / 7)  # "OpenNow" vs "OPENNOW": p, e, n, o, w differ in case
    extra = scores(make_reward(substring_match=False), images, prompts)[1]
    assert extra == pytest.approx(1 - 6 / 7)  # "PLEASE" costs 6 insertions, over the target's 7 characters
    extra_max = scores(make_reward(substring_match=False, normalise_by="max"), images, prompts)[1]
    assert extra_max == pytest.approx(1 - 6 / 13)  # ... over the reading's 13


def test_min_confidence_drops_boxes(make_reward, render):
    image = render("HELLO")
    assert scores(make_reward(), [image], [SIGN.format("HELLO")]) == [1.0]
    assert scores(make_reward(min_confidence=0.999999), [image], [SIGN.format("HELLO")]) == [0.0]


def test_videos_are_scored_as_the_mean_over_frames(make_reward, render):
    reward = make_reward()
    assert reward.handles_video is False
    video = torch.stack([render("HELLO"), render("")])[None]  # one video: the text, then a blank frame
    out = score_one(reward, Samples(prompts=[SIGN.format("HELLO")], videos=video, group_ids=[0], metadata=[{}]))
    assert out.dtype == torch.float32 and out.tolist() == [0.5]


def test_grey_and_rgba_images(make_reward, render):
    rgb = render("HELLO")
    grey = rgb[:1]
    rgba = torch.cat([rgb, torch.ones_like(grey)])
    assert scores(make_reward(), [grey], [SIGN.format("HELLO")]) == [1.0]
    assert scores(make_reward(), [rgba], [SIGN.format("HELLO")]) == [1.0]


def test_images_become_uint8_once_and_are_left_alone():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2)
    before = x.clone()
    out = to_rgb_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]  # rounded and clamped
    assert torch.equal(x, before)
    with pytest.raises(RewardError, match="C = 1, 3 or 4"):
        to_rgb_uint8(torch.zeros(1, 2, 4, 4))


class _NoRead:
    name = "no-read"
    calls = 0

    def read(self, image):
        self.calls += 1
        return []


def test_a_prompt_without_quotes_fails_before_any_ocr_runs():
    from flowfactory_rewards_ocr import OCROptions
    from flowfactory_rewards_ocr.reward import OCRReward

    engine = _NoRead()
    reward = OCRReward(OCROptions(), engine=engine)
    prompts = [SIGN.format("HELLO"), "a photo of a cat"]
    with pytest.raises(RewardError, match="'a photo of a cat' quotes no text") as err:
        reward.score(Samples(prompts=prompts, images=torch.zeros(2, 3, 8, 8)))
    assert "unquoted: whole-prompt" in str(err.value)
    assert engine.calls == 0
    with pytest.raises(RewardError, match="empty or blank"):
        reward.score(Samples(prompts=['a sign that says "  "'], images=torch.zeros(1, 3, 8, 8)))
    with pytest.raises(RewardError, match="without images"):
        reward.score(Samples(prompts=[SIGN.format("HELLO")], videos=torch.zeros(1, 2, 3, 8, 8)))
