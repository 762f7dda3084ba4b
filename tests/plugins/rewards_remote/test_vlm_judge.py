"""`vlm-judge` against a fake OpenAI-compatible server (remote_fakes.py, a real subprocess) that judges how red
each image is: both score modes, unparseable answers, the model check and the API key."""

from __future__ import annotations

import pytest
import torch
from test_reward_server import grid_images

from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.registry import BuildContext
from flowfactory.types import Samples


def judge(registry, server, monkeypatch, **options):
    monkeypatch.setenv("FF_TEST_JUDGE_KEY", "sk-fake")
    base = {"base_url": server.url + "/v1", "model": "fake-judge", "api_key_env": "FF_TEST_JUDGE_KEY"}
    return registry.get("reward", "vlm-judge").create({**base, **options}, BuildContext())


def redness(images: torch.Tensor) -> torch.Tensor:
    """What the fake judges: the mean red channel, on the uint8 grid the PNG holds."""
    return (images[:, 0] * 255).round().mean(dim=(1, 2)) / 255


def batch(n: int = 6) -> Samples:
    return Samples(prompts=[f"a red thing {i}" for i in range(n)], images=grid_images(n, seed=4) ** 2)


def test_yes_probability_from_the_first_answer_tokens_logprobs(registry, openai_server, monkeypatch):
    reward = judge(registry, openai_server, monkeypatch, max_concurrency=3, yes_tokens=["yes"], no_tokens=["no"])
    s = batch()
    scores = reward.score(s)
    assert scores.dtype == torch.float32 and scores.shape == (6,)
    assert torch.allclose(scores, redness(s.images), atol=1e-6)  # P(yes) / (P(yes) + P(no)), Maybe ignored


def test_number_mode_reads_the_first_number_or_the_one_after_a_marker(registry, openai_server, monkeypatch):
    s = batch()
    expected = torch.round(redness(s.images).double() * 10 * 1000) / 1000 / 10
    plain = judge(registry, openai_server, monkeypatch, mode="number", max_score=10,
                  prompt_template="Rate how well this shows {prompt} from 0 to 10.")
    assert torch.allclose(plain.score(s).double(), expected, atol=1e-6)
    final = judge(registry, openai_server, monkeypatch, mode="number", max_score=10, number_after="Final Score:",
                  prompt_template="Judge {prompt}; end with the final score.")
    assert torch.allclose(final.score(s).double(), expected, atol=1e-6)
    first = judge(registry, openai_server, monkeypatch, mode="number", max_score=10,
                  prompt_template="Judge {prompt}; end with the final score.")
    assert torch.equal(first.score(s), torch.full((6,), 0.1))  # "Criterion 1 ...": the first number is 1


@pytest.mark.parametrize("mode", ["yes-probability", "number"])
def test_an_unparseable_answer_is_a_reward_error_quoting_it(registry, openai_server, monkeypatch, mode):
    reward = judge(registry, openai_server, monkeypatch, mode=mode, prompt_template="gibberish about {prompt}")
    with pytest.raises(RewardError, match=r"'I would rather not say\.'"):
        reward.score(batch(2))


def test_wrong_model_key_and_template_fail_before_scoring(registry, openai_server, monkeypatch):
    with pytest.raises(FlowFactoryError, match=r"serves 'fake-judge', not 'qwen' \(option model\)"):
        judge(registry, openai_server, monkeypatch, model="qwen")
    monkeypatch.setenv("FF_TEST_WRONG_KEY", "sk-wrong")
    with pytest.raises(RewardError, match=r"GET .*/v1/models failed: HTTP 401: Incorrect API key provided"):
        judge(registry, openai_server, monkeypatch, api_key_env="FF_TEST_WRONG_KEY")
    monkeypatch.delenv("FF_TEST_NO_KEY", raising=False)
    with pytest.raises(FlowFactoryError, match=r"option api_key_env names the environment variable FF_TEST_NO_KEY"):
        judge(registry, openai_server, monkeypatch, api_key_env="FF_TEST_NO_KEY")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"prompt_template must contain \{prompt\}"):
        judge(registry, openai_server, monkeypatch, prompt_template="Is it good?")
