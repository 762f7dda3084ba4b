"""The text side of the OCR reward: which text a prompt asks for, how texts are normalised, and the score.

Pure Python (plus rapidfuzz for the edit distance); no OCR engine, no torch.

Quote rule (`quoted_text`):
- Double quotes first: a quoted part opens at `"` or `“` and closes at the next `"` or `”`. Every quoted
  part is taken, in order, joined by one space. A prompt with an opening double quote that is never closed
  is an error (the text it asks for is unclear).
- Single quotes only when the prompt has no double quote, and only when they are unambiguous: a quoted part
  opens at `'` or `‘` that is not preceded by a letter or digit and is followed by a non-space, and closes at
  the next `'` or `’` that is preceded by a non-space and not followed by a letter or digit. An apostrophe
  between two letters or digits (cat's, don’t) is never a quote. If any other single-quote character is
  left over (`'twas`, `dogs' bowl`), the single quotes are ambiguous and the prompt counts as having no
  quoted text.
- No quoted text: an error naming the prompt, unless the `unquoted: whole-prompt` option scores against the
  whole prompt.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from flowfactory.errors import RewardError

Whitespace = Literal["remove", "collapse", "keep"]
NormaliseBy = Literal["target", "max"]
Unquoted = Literal["error", "whole-prompt"]

_DOUBLE_OPEN = '"“'
_DOUBLE_CLOSE = '"”'
_DOUBLE = set(_DOUBLE_OPEN + _DOUBLE_CLOSE)
_SINGLE_OPEN = "'‘"
_SINGLE_CLOSE = "'’"
_SINGLE = set(_SINGLE_OPEN + _SINGLE_CLOSE)
# Opening single quote: not after a letter/digit, followed by a non-space; closing: after a non-space, not
# before a letter/digit. The content is the shortest run between them.
_SINGLE_QUOTED = re.compile(r"(?<![^\W_])[‘'](\S(?:.*?\S)?)['’](?![^\W_])")
_WS = re.compile(r"\s+")


class NoQuotedText(RewardError):
    """The prompt quotes no text (or quotes it ambiguously)."""


def _double_quoted(prompt: str) -> list[str] | None:
    """The double-quoted parts, or None when the prompt has no double quote at all."""
    if not any(c in _DOUBLE for c in prompt):
        return None
    parts: list[str] = []
    i = 0
    while i < len(prompt):
        if prompt[i] in _DOUBLE_OPEN:
            end = next((j for j in range(i + 1, len(prompt)) if prompt[j] in _DOUBLE_CLOSE), -1)
            if end < 0:
                raise RewardError(f"ocr: the prompt {prompt!r} opens a double quote at character {i} that is never "
                                  "closed; close it, so the reward knows which text the image must show")
            parts.append(prompt[i + 1:end])
            i = end + 1
        elif prompt[i] == "”":
            raise RewardError(f"ocr: the prompt {prompt!r} closes a double quote (”) at character {i} that was never "
                              "opened; open it with “ or \"")
        else:
            i += 1
    return parts


def _single_quoted(prompt: str) -> list[str] | None:
    """The single-quoted parts when unambiguous, else None."""
    if not any(c in _SINGLE for c in prompt):
        return None
    spans = [(m.start(), m.end(), m.group(1)) for m in _SINGLE_QUOTED.finditer(prompt)]
    if not spans:
        return None
    covered = set()
    for start, end, _ in spans:
        covered.update((start, end - 1))
    for i, c in enumerate(prompt):
        if c not in _SINGLE or i in covered:
            continue
        inside_word = 0 < i < len(prompt) - 1 and prompt[i - 1].isalnum() and prompt[i + 1].isalnum()
        if not inside_word:
            return None  # a stray single quote: which pairs are quotes is ambiguous
    return [text for _, _, text in spans]


def quoted_text(prompt: str, *, single_quotes: bool = True, unquoted: Unquoted = "error") -> str:
    """The text a prompt asks the image to show (module docstring: the quote rule)."""
    parts = _double_quoted(prompt)
    if parts is None and single_quotes:
        parts = _single_quoted(prompt)
    if parts is None:
        if unquoted == "whole-prompt":
            return prompt
        where = "double quotes" + (" or unambiguous single quotes" if single_quotes else "")
        raise NoQuotedText(f"ocr: the prompt {prompt!r} quotes no text (in {where}) for the image to show; quote it "
                           "(a sign that says \"OPEN\"), or set the reward option `unquoted: whole-prompt` to score "
                           "against the whole prompt")
    return " ".join(parts)


def normalise(text: str, *, case_sensitive: bool = False, whitespace: Whitespace = "remove") -> str:
    """NFKC (full-width letters and digits become ASCII), then case folding unless `case_sensitive`, then
    whitespace: `remove` drops all of it, `collapse` turns each run into one space and strips the ends, `keep`
    leaves it as it is."""
    text = unicodedata.normalize("NFKC", text)
    if not case_sensitive:
        text = text.casefold()
    if whitespace == "remove":
        return _WS.sub("", text)
    if whitespace == "collapse":
        return _WS.sub(" ", text).strip()
    return text


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over characters: insertions, deletions and substitutions each cost 1."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def similarity(target: str, read: str, *, normalise_by: NormaliseBy = "target", substring_match: bool = True) -> float:
    """1 - edit_distance(target, read) / n, clamped to [0, 1], on already normalised texts.

    n is len(target) (`normalise_by: target`, Flow-GRPO's: a reading longer than the target is not paid for
    beyond 0) or max(len(target), len(read)) (`max`: extra read text lowers the score). With
    `substring_match`, a target found whole inside the read text scores 1 (Flow-GRPO)."""
    if not target:
        raise ValueError("the target text is empty")
    if substring_match and target in read:
        return 1.0
    n = len(target) if normalise_by == "target" else max(len(target), len(read))
    return min(1.0, max(0.0, 1.0 - edit_distance(target, read) / n))
