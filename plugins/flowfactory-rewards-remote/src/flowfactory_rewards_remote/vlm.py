"""The `vlm-judge` reward: a vision-language model behind an OpenAI-compatible chat-completions endpoint (vLLM,
SGLang serving Qwen2.5-VL, UnifiedReward, ...) judges each image against its prompt.

One request per image (a PNG data URL and the question), temperature 0, `max_concurrency` in flight; with
`input_images`, the row's input images (its prompt record's, an edit's source) go in the same message, before the
sample unless the template's `{input_images}` / `{image}` markers place them. Two score
modes: `yes-probability` reads the first answer token's `top_logprobs` and returns P(yes) / (P(yes) + P(no));
`number` returns the first number of the answer (after `number_after`, if set) divided by `max_score`. An answer
that gives neither is a RewardError quoting it.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.types import Samples
from flowfactory_rewards_remote import VLMJudgeOptions
from flowfactory_rewards_remote.http import Client, bearer_headers
from flowfactory_rewards_remote.remote import quantise

NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
MARKERS = re.compile(r"(\{image\}|\{input_images\})")  # where prompt_template places the images


def png_data_url(image_hwc: Any) -> str:
    """A uint8 [H, W, C] array as a `data:image/png;base64,...` URL."""
    from PIL import Image

    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _quote(text: str, limit: int = 300) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class VLMJudge:
    groupwise = False
    handles_video = False  # the core scores a video as the mean over its frames

    def __init__(self, options: VLMJudgeOptions):
        self.options = options
        headers = bearer_headers(options.api_key_env, (
            f"vlm-judge: option api_key_env names the environment variable {options.api_key_env}, which is not set "
            f"or is empty. Export the API key (export {options.api_key_env}=...) or set api_key_env: null."))
        self.client = Client(what=f"vlm-judge {options.model!r}", timeout=options.timeout, retries=options.retries,
                             backoff=options.backoff, max_concurrency=options.max_concurrency, headers=headers,
                             hint=f"Check that the OpenAI-compatible server at {options.base_url} is running and "
                                  "serves the model, or raise the option timeout or retries")
        self.url = f"{options.base_url}/chat/completions"
        fold = (lambda t: t.strip()) if options.case_sensitive else (lambda t: t.strip().lower())
        self._fold = fold
        self._yes = {fold(t) for t in options.yes_tokens}
        self._no = {fold(t) for t in options.no_tokens}
        if options.check_model:
            self._check_model()

    def _check_model(self) -> None:
        url = f"{self.options.base_url}/models"
        try:
            data = self.client.request("GET", url, at_start=True).json()
            ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            raise FlowFactoryError(f"vlm-judge: GET {url} did not answer an OpenAI model list; is option base_url "
                                   "an OpenAI-compatible API (ending in /v1)? Or set check_model: false.") from None
        if self.options.model not in ids:
            raise FlowFactoryError(f"vlm-judge: the server at {self.options.base_url} serves "
                                   f"{', '.join(map(repr, ids)) or 'no model'}, not {self.options.model!r} (option "
                                   "model). Set model to one of those.")

    def content(self, prompt: str, data_url: str, input_urls: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The user message's parts: the template's text pieces (with {prompt} filled in) and the images where its
        markers put them; a marker it lacks puts its images first (input images, then the sample)."""
        template = self.options.prompt_template
        if "{image}" not in template:
            template = "{image}" + template
        if self.options.input_images and "{input_images}" not in template:
            template = "{input_images}" + template
        parts: list[dict[str, Any]] = []
        for piece in MARKERS.split(template):
            if piece in ("{image}", "{input_images}"):
                urls = [data_url] if piece == "{image}" else list(input_urls)
                parts.extend({"type": "image_url", "image_url": {"url": url}} for url in urls)
            elif piece.strip():  # {prompt} is filled in after the split: a prompt's own braces place nothing
                parts.append({"type": "text", "text": piece.replace("{prompt}", prompt)})
        return parts

    def request_body(self, prompt: str, data_url: str, input_urls: Sequence[str] = ()) -> dict[str, Any]:
        o = self.options
        messages: list[dict[str, Any]] = []
        if o.system_prompt:
            messages.append({"role": "system", "content": o.system_prompt})
        messages.append({"role": "user", "content": self.content(prompt, data_url, input_urls)})
        body: dict[str, Any] = {"model": o.model, "messages": messages, "temperature": 0,
                                "max_tokens": o.max_tokens or (1 if o.mode == "yes-probability" else 512)}
        if o.mode == "yes-probability":
            body.update(logprobs=True, top_logprobs=o.top_logprobs)
        return body

    def _judge(self, item: tuple[str, str, tuple[str, ...]]) -> float:
        resp = self.client.request("POST", self.url, json=self.request_body(*item))
        try:
            choice = resp.json()["choices"][0]
            answer = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RewardError(f"vlm-judge: POST {self.url} answered no chat completion: {resp.text[:300]!r}") from None
        if self.options.mode == "number":
            return self.number(answer)
        return self.yes_probability(choice, answer)

    def number(self, answer: str) -> float:
        text = answer
        marker = self.options.number_after
        if marker is not None:
            at = answer.find(marker)
            if at < 0:
                raise RewardError(f"vlm-judge: the answer has no {marker!r} (option number_after): {_quote(answer)}")
            text = answer[at + len(marker):]
        found = NUMBER.search(text)
        if found is None:
            raise RewardError(f"vlm-judge: no number in the answer {_quote(answer)}; change prompt_template so "
                              "the model answers with a score, or use mode: yes-probability")
        return float(found.group()) / self.options.max_score

    def yes_probability(self, choice: dict[str, Any], answer: str) -> float:
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if not content:
            raise RewardError(f"vlm-judge: the server returned no logprobs for the answer {_quote(answer)}; "
                              "mode yes-probability needs `logprobs`/`top_logprobs` (vLLM and SGLang give them), "
                              "or use mode: number")
        first = next((t for t in content if isinstance(t, dict) and str(t.get("token", "")).strip()), None)
        if first is None:
            raise RewardError(f"vlm-judge: the answer {_quote(answer)} has no non-blank token")
        p_yes = p_no = 0.0
        seen = []
        for alt in first.get("top_logprobs") or [first]:
            token, logprob = str(alt.get("token", "")), alt.get("logprob")
            seen.append(token)
            if not isinstance(logprob, (int, float)):
                continue
            key = self._fold(token)
            if key in self._yes:
                p_yes += math.exp(logprob)
            elif key in self._no:
                p_no += math.exp(logprob)
        if p_yes + p_no <= 0:
            raise RewardError(f"vlm-judge: neither a yes token {sorted(self._yes)} nor a no token {sorted(self._no)} "
                              f"is among the first answer token's alternatives {seen[:10]} (answer {_quote(answer)}); "
                              "set yes_tokens/no_tokens, or ask for a yes/no answer in prompt_template")
        return p_yes / (p_yes + p_no)

    def score(self, samples: Samples) -> torch.Tensor:
        if samples.images is None:
            raise RewardError("vlm-judge scores images; got samples without images")
        images = quantise(samples.images)
        inputs = self.input_urls(samples) if self.options.input_images else [()] * len(samples)
        items = [(p, png_data_url(img), urls) for p, img, urls in zip(samples.prompts, images, inputs, strict=True)]
        return torch.tensor(self.client.map(self._judge, items), dtype=torch.float32)

    def input_urls(self, samples: Samples) -> list[tuple[str, ...]]:
        """Each row's input images as PNG data URLs (uint8, as Prompt.load_images reads them), each distinct
        image (by content digest) encoded once."""
        if len(samples.inputs) != len(samples):
            raise RewardError("vlm-judge (input_images: true) sends each row's input images, but these samples carry "
                              "no prompt records (Samples.inputs)")
        urls: dict[str, str] = {}
        out = []
        for record in samples.inputs:
            if not record.images:
                raise RewardError(f"vlm-judge (input_images: true): the prompt {record.text!r} has no input image to "
                                  "send with its sample; give it one ('image' in its .jsonl line), or set "
                                  "input_images: false")
            if any(d not in urls for d in record.digests):
                for d, image in zip(record.digests, record.load_images(), strict=True):
                    urls.setdefault(d, png_data_url(quantise(image)))
            out.append(tuple(urls[d] for d in record.digests))
        return out
