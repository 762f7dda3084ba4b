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


# --- input images: an edit's source in the message before the sample ---------------------------------------

@pytest.fixture(scope="module")
def edit_batch(tmp_path_factory) -> Samples:
    """Two edits of each of three sources (a PNG, the same bytes under another name, a JPEG; all 16x16)."""
    from test_remote_inputs import write_sources

    from flowfactory.prompts import Prompt

    sources = write_sources(tmp_path_factory.mktemp("judge-sources"))
    records = [Prompt(f"make it red {i}", images=[sources[k]]) for i, k in enumerate(("a", "a-copy", "b"))]
    return Samples.of([r for r in records for _ in range(2)], group_ids=[0, 0, 1, 1, 2, 2],
                      images=grid_images(6, seed=9))


def test_input_images_go_before_the_sample(registry, openai_server, monkeypatch, edit_batch):
    """The fake answers "Image 1: X1 Image 2: X2" (10 x the redness of each image, in message order): the first
    is the record's source, the second the sample."""
    source = redness(torch.stack([r.load_images()[0] for r in edit_batch.inputs]))
    sample = redness(edit_batch.images)
    template = "Is the second image a faithful edit of the first, following '{prompt}'? Rate it 0-10."
    for marker, expected in (("Image 1:", source), ("Image 2:", sample)):
        reward = judge(registry, openai_server, monkeypatch, mode="number", max_score=10, input_images=True,
                       number_after=marker, prompt_template=template)
        assert torch.allclose(reward.score(edit_batch).double(), (expected.double() * 1e4).round() / 1e4, atol=1e-6)
    assert not torch.allclose(source, sample)
    # yes-probability judges the last image of the message: the sample, with the source before it
    yes = judge(registry, openai_server, monkeypatch, input_images=True)
    assert torch.allclose(yes.score(edit_batch), sample, atol=1e-6)


def test_the_template_places_the_images(registry, openai_server, monkeypatch):
    from pydantic import ValidationError

    reward = judge(registry, openai_server, monkeypatch, input_images=True,
                   prompt_template="Source: {input_images} Edited by '{prompt}': {image} Faithful? Answer yes or no.")
    parts = reward.request_body("make {image} red", "data:sample", ["data:src1", "data:src2"])["messages"][-1]["content"]
    assert [p.get("text") or p["image_url"]["url"] for p in parts] == [
        "Source: ", "data:src1", "data:src2", " Edited by 'make {image} red': ", "data:sample",
        " Faithful? Answer yes or no."]  # a prompt's own braces place nothing
    default = judge(registry, openai_server, monkeypatch, input_images=True)
    parts = default.request_body("a cat", "data:sample", ["data:src"])["messages"][-1]["content"]
    assert [p.get("text") or p["image_url"]["url"] for p in parts] == [
        "data:src", "data:sample", "Does this image show a cat? Answer yes or no."]
    plain = judge(registry, openai_server, monkeypatch)  # input_images off: the message it always was
    assert plain.request_body("a cat", "data:sample")["messages"][-1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:sample"}},
        {"type": "text", "text": "Does this image show a cat? Answer yes or no."}]
    with pytest.raises(ValidationError, match=r"prompt_template places \{input_images\}, but input_images is false"):
        judge(registry, openai_server, monkeypatch, prompt_template="{input_images} {image} {prompt}?")
    with pytest.raises(ValidationError, match=r"prompt_template holds \{image\} 2 times"):
        judge(registry, openai_server, monkeypatch, prompt_template="{image} {prompt} {image}")


def test_input_images_need_records_with_images(registry, openai_server, monkeypatch):
    reward = judge(registry, openai_server, monkeypatch, input_images=True)
    with pytest.raises(RewardError, match=r"these samples carry no prompt records"):
        reward.score(batch(2))
    with pytest.raises(RewardError, match=r"the prompt 'a red thing' has no input image"):
        reward.score(Samples.of(["a red thing"], images=grid_images(1)))
