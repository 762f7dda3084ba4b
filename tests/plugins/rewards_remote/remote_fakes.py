"""Small real servers that speak the protocols of the client rewards, for their tests. Run as
`python remote_fakes.py openai PORT` or `python remote_fakes.py flowgrpo PORT` (starlette + uvicorn).

openai: an OpenAI-compatible chat-completions endpoint with one model, `fake-judge`, that judges how red an image
  is: r = mean red channel / 255 of the PNG it is sent. With `logprobs`, the first answer token's alternatives are
  Yes (probability 0.9 r), No (0.9 (1 - r)) and Maybe (0.1), so P(yes) / (P(yes) + P(no)) = r. Otherwise it answers
  "Final Score: X" (X = 10 r, 3 decimals) after a distracting number when the question says "final", else "X".
  A question holding "gibberish" gets an answer without yes, no or a number. A message with several images (an
  edit's source and the sample) is judged on its last image, and in number mode answered "Image 1: X1 Image 2: X2
  ..." (Xi = 10 r of the i-th image, in message order). FAKE_API_KEY set: that bearer key is required.

flowgrpo: Flow-GRPO's reward-server protocol (a pickled dict in, a pickled dict out). Requests are read with the
  client's own plain-values reader, so they must hold plain values only. Paths: / (DeQA: "outputs" = mean
  brightness of each JPEG), /unifiedreward ("outputs" = 1 for prompts naming red else 0, times brightness),
  /geneval ("scores" = metadata["score"], plus the other GenEval keys), /evil (an answer whose unpickling would
  create the file FAKE_MARKER: a __reduce__ payload), /numpy (an answer holding numpy floats), /broken (500 and a
  traceback as text, as their servers answer a failure).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import sys

import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MODEL = "fake-judge"


def openai_app() -> Starlette:
    key = os.environ.get("FAKE_API_KEY")

    def denied(request: Request) -> JSONResponse | None:
        if key and request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                                status_code=401)
        return None

    async def models(request: Request) -> JSONResponse:
        return denied(request) or JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def chat(request: Request) -> JSONResponse:
        if (refused := denied(request)) is not None:
            return refused
        body = await request.json()
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist."}},
                                status_code=404)
        if body.get("temperature") != 0:
            return JSONResponse({"error": {"message": "the fake judge wants temperature 0"}}, status_code=400)
        content = body["messages"][-1]["content"]
        urls = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
        question = " ".join(c["text"] for c in content if c["type"] == "text")
        reds = []
        for url in urls:
            assert url.startswith("data:image/png;base64,")
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), formats=["PNG"]))
            reds.append(float(image[..., 0].astype(np.float64).mean() / 255))
        r = reds[-1]
        choice: dict = {"index": 0, "finish_reason": "stop"}
        if "gibberish" in question:
            answer = "I would rather not say."
            tokens = [{"token": "I", "logprob": -0.1, "top_logprobs": [{"token": "I", "logprob": -0.1},
                                                                      {"token": "The", "logprob": -2.5}]}]
        elif body.get("logprobs"):
            p = min(max(r, 1e-6), 1 - 1e-6)
            answer = "Yes" if p >= 0.5 else "No"
            alts = [{"token": "Yes", "logprob": math.log(0.9 * p)}, {"token": " no", "logprob": math.log(0.9 * (1 - p))},
                    {"token": "Maybe", "logprob": math.log(0.1)}]
            tokens = [{"token": "\n", "logprob": 0.0, "top_logprobs": [{"token": "\n", "logprob": 0.0}]},
                      {"token": answer, "logprob": alts[0 if answer == "Yes" else 1]["logprob"],
                       "top_logprobs": alts[: body.get("top_logprobs", 20)]}]
        elif len(reds) > 1:
            answer = " ".join(f"Image {i + 1}: {round(10 * red, 3)}" for i, red in enumerate(reds))
            tokens = None
        else:
            x = round(10 * r, 3)
            answer = f"Criterion 1 looks fine. Final Score: {x}" if "final" in question.lower() else f"{x}"
            tokens = None
        choice["message"] = {"role": "assistant", "content": answer}
        choice["logprobs"] = {"content": tokens} if body.get("logprobs") else None
        return JSONResponse({"id": "fake", "object": "chat.completion", "model": MODEL, "choices": [choice]})

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", chat, methods=["POST"])])


class _CreatesMarker:
    """Unpickling this calls open(FAKE_MARKER, "w"): the file appears if a client runs what it receives."""

    def __reduce__(self):
        return (open, (os.environ["FAKE_MARKER"], "w"))


def flowgrpo_app() -> Starlette:
    from flowfactory_rewards_remote.flowgrpo import safe_loads  # requests must be plain values

    def brightness(jpeg: bytes) -> float:
        image = np.asarray(Image.open(io.BytesIO(jpeg), formats=["JPEG"]).convert("RGB"), dtype=np.float64) / 255
        return float((image * np.array([0.299, 0.587, 0.114])).sum(-1).mean())

    async def health(request: Request) -> Response:
        return Response("ok")

    async def handle(request: Request) -> Response:
        kind = request.path_params.get("kind", "deqa")
        data = safe_loads(await request.body())
        images = data["images"]
        if kind == "deqa":
            reply = {"outputs": [brightness(j) for j in images]}
        elif kind == "unifiedreward":
            reply = {"outputs": [(1.0 if "red" in p else 0.0) * brightness(j) for p, j in zip(data["prompts"], images)]}
        elif kind == "geneval":
            metas = data["meta_datas"]
            assert data["only_strict"] is True
            scores = [float(m["score"]) for m in metas]
            reply = {"scores": scores, "rewards": [0.0] * len(images), "strict_rewards": [float(s == 1) for s in scores],
                     "group_rewards": {"colors": [0.0] * len(images)},
                     "group_strict_rewards": {"colors": [0.0] * len(images)}}
        elif kind == "evil":
            reply = {"outputs": [_CreatesMarker() for _ in images]}
        elif kind == "numpy":
            reply = {"outputs": [np.float64(0.5) for _ in images]}
        elif kind == "broken":
            text = "Traceback (most recent call last):\n  File \"app.py\", line 1\nKeyError: 'meta_datas'\n"
            return Response(text.encode(), status_code=500)
        else:
            return Response(json.dumps({"error": kind}).encode(), status_code=404)
        return Response(pickle.dumps(reply), media_type="application/octet-stream")

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/", handle, methods=["POST"]),
                             Route("/{kind}", handle, methods=["POST"])])


if __name__ == "__main__":
    which, port = sys.argv[1], int(sys.argv[2])
    app = openai_app() if which == "openai" else flowgrpo_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
