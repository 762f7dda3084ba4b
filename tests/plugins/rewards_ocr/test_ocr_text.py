"""The OCR reward's text side, without an engine: which text a prompt asks for, normalisation, edit distance
and the score, against hand-computed values."""

from __future__ import annotations

import pytest

from flowfactory.errors import RewardError
from flowfactory_rewards_ocr.text import NoQuotedText, edit_distance, normalise, quoted_text, similarity


@pytest.mark.parametrize(("prompt", "text"), [
    ('a sign that says "OPEN 24 HOURS"', "OPEN 24 HOURS"),
    ("a neon sign that says “OPEN 24 HOURS” above a door", "OPEN 24 HOURS"),
    ('"HELLO" written in the sand', "HELLO"),
    ('a shop front with "BAKERY" above and "FRESH BREAD" below', "BAKERY FRESH BREAD"),
    ("a mug reading “TEA” and a mug reading \"COFFEE\"", "TEA COFFEE"),
    ("a chalkboard that says 'SOUP OF THE DAY'", "SOUP OF THE DAY"),
    ("the cat's bowl with ‘MEOW’ painted on it", "MEOW"),
    ("a sign saying 'DON'T STOP' at a crossing", "DON'T STOP"),
    ('it\'s a poster that says "SALE"', "SALE"),  # double quotes win; the apostrophe is irrelevant
])
def test_quoted_text(prompt, text):
    assert quoted_text(prompt) == text


def test_quoted_text_is_not_the_whole_prompt():
    """Flow-Factory scored the OCR'd text against the whole prompt; only the quoted part is asked for."""
    prompt = 'a red and white stop sign at a crossroads that says "STOP"'
    assert quoted_text(prompt) == "STOP"
    assert similarity(normalise(quoted_text(prompt)), "stop") == 1.0
    assert similarity(normalise(prompt), "stop") < 0.2


@pytest.mark.parametrize("prompt", [
    "a photo of a cat",
    "'twas the night before christmas, a card that says 'NOEL'",  # a stray opening quote: ambiguous
    "the dogs' kennel with 'WOOF' on the door",                    # a stray closing quote: ambiguous
])
def test_no_or_ambiguous_quotes_are_an_error_naming_the_prompt_and_the_option(prompt):
    with pytest.raises(NoQuotedText) as err:
        quoted_text(prompt)
    assert repr(prompt) in str(err.value) and "unquoted: whole-prompt" in str(err.value)
    assert quoted_text(prompt, unquoted="whole-prompt") == prompt


def test_single_quotes_can_be_turned_off():
    prompt = "a chalkboard that says 'SOUP'"
    assert quoted_text(prompt) == "SOUP"
    with pytest.raises(NoQuotedText, match="double quotes\\)"):
        quoted_text(prompt, single_quotes=False)
    assert quoted_text(prompt, single_quotes=False, unquoted="whole-prompt") == prompt


@pytest.mark.parametrize(("prompt", "message"), [
    ('a sign that says "OPEN', "never closed"),
    ("a sign that says OPEN” here", "never opened"),
])
def test_unbalanced_double_quotes_are_an_error(prompt, message):
    with pytest.raises(RewardError, match=message) as err:
        quoted_text(prompt, unquoted="whole-prompt")  # not a missing quote: whole-prompt does not hide it
    assert repr(prompt) in str(err.value)


def test_normalise():
    assert normalise("  Open\t24\n HOURS ") == "open24hours"
    assert normalise("  Open\t24\n HOURS ", whitespace="collapse") == "open 24 hours"
    assert normalise("  Open\t24\n HOURS ", whitespace="keep") == "  open\t24\n hours "
    assert normalise("Open  24", case_sensitive=True, whitespace="collapse") == "Open 24"
    assert normalise("ＯＰＥＮ２４") == "open24"  # full-width letters and digits (NFKC)
    assert normalise("STRASSE") == normalise("straße")  # case folding, not lower()


@pytest.mark.parametrize(("a", "b", "d"), [
    ("kitten", "sitting", 3),   # k->s, e->i, +g
    ("flaw", "lawn", 2),        # -f, +n
    ("", "abc", 3),
    ("abc", "abc", 0),
    ("helloworld", "hello", 5),
    ("helloworld", "hellowurld", 1),
    ("stop", "tops", 2),        # -s, +s: characters in order, not a bag of letters
])
def test_edit_distance_by_hand(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_similarity_by_hand():
    # normalised by the target's length (Flow-GRPO)
    assert similarity("helloworld", "hello") == pytest.approx(0.5)
    assert similarity("helloworld", "hellowurld") == pytest.approx(0.9)
    assert similarity("open", "") == 0.0
    # more errors than target characters: clamped to 0, never negative
    assert similarity("abc", "xyzxyzxyz", substring_match=False) == 0.0
    # the target inside longer read text: 1 with substring_match (Flow-GRPO) ...
    assert similarity("open", "weareopen") == 1.0
    # ... else the edit distance to all of it, by the target's length or by the longer text
    assert similarity("open", "weareopen", substring_match=False) == 0.0  # 5 insertions > 4 characters
    assert similarity("open", "opens", substring_match=False) == pytest.approx(0.75)
    assert similarity("open", "opens", substring_match=False, normalise_by="max") == pytest.approx(0.8)
    assert similarity("open", "weareopen", substring_match=False, normalise_by="max") == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="empty"):
        similarity("", "anything")
