"""The HTTP server of `ff reward serve`: one reward, one device, scoring calls one at a time (docs/reward-server.md).

A starlette application run by uvicorn. Every answer is JSON; nothing a client sends can stop the server: an
unreadable body is a 400, a body of the wrong shape a 422, a reward that raises a 500 with its message, and the
next request is served as usual.

The served reward gets `Samples` as the loop builds them: every row's prompt record in `inputs` (text, metadata,
and the input images the request carries, written as PNG files into a temporary folder that lives for the call,
so `inputs[i].load_images()` gives exactly the pixels sent) and `metadata`.
"""

from __future__ import annotations

import asyncio
import hmac
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flowfactory_rewards_remote.protocol import CONTENT_TYPE, PROTOCOL, BadRequest, ScoreRequest, decode


@dataclass
class Served:
    """What the server serves: the built reward, its name and validated options, where it runs."""

    name: str
    reward: Any
    options: dict[str, Any]
    package: str
    version: str
    device: str = "cpu"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "groupwise": bool(getattr(self.reward, "groupwise", False)),
                "handles_video": bool(getattr(self.reward, "handles_video", False)), "package": self.package,
                "version": self.version, "device": self.device, "protocol": PROTOCOL, "inputs": True}


def records(req: ScoreRequest, folder: Path) -> list[Any]:
    """Each row's prompt record: its text, its metadata and its input images, each distinct one written once into
    `folder` as a PNG (lossless: `Prompt.load_images()` reads back exactly the uint8 pixels sent)."""
    from PIL import Image

    from flowfactory.prompts import Prompt

    paths: dict[str, Path] = {}
    for n, (name, arr) in enumerate(req.input_images.items()):
        paths[name] = folder / f"input-{n}.png"
        Image.fromarray(arr).save(paths[name], format="PNG", compress_level=1)
    return [Prompt(text, images=[paths[name] for name in names], metadata=meta)
            for text, names, meta in zip(req.prompts, req.inputs, req.metadata, strict=True)]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def create_app(served: Served, *, token: str | None = None, max_request_bytes: int = 256 * 1024 * 1024) -> Starlette:
    """The ASGI application. `token`: bearer token every request except GET /health must carry (None: none)."""
    lock = asyncio.Lock()  # one scoring call at a time: one model on one device
    stats = {"requests": 0, "failures": 0}

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "reward": served.name, "protocol": PROTOCOL})

    async def rewards(request: Request) -> JSONResponse:
        if not authorised(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return JSONResponse({"protocol": PROTOCOL, "rewards": [served.record()]})

    async def read_body(request: Request) -> bytes:
        limit_mb = max_request_bytes / 2**20
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                raise BadRequest(f"Content-Length {declared!r} is not a number") from None
            if declared_n > max_request_bytes:
                raise BadRequest(f"the request is {declared_n / 2**20:.1f} MiB; this server takes at most "
                                 f"{limit_mb:g} MiB (--max-request-mb): send fewer images per request "
                                 "(the remote reward's batch_size)", 413)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_request_bytes:
                raise BadRequest(f"the request is over {limit_mb:g} MiB, the most this server takes "
                                 "(--max-request-mb): send fewer images per request", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def run_reward(req: ScoreRequest) -> list[float]:
        import torch

        from flowfactory.train.rewards import score_one
        from flowfactory.types import Samples

        device = torch.device(served.device)
        if req.images is not None:
            media = {"images": torch.from_numpy(req.images).to(device).permute(0, 3, 1, 2).float() / 255}
        else:
            media = {"videos": torch.from_numpy(req.videos).to(device).permute(0, 1, 4, 2, 3).float() / 255}
        with tempfile.TemporaryDirectory(prefix="ff-reward-inputs-") as folder:
            samples = Samples(prompts=req.prompts, group_ids=req.group_ids, metadata=req.metadata,
                              inputs=records(req, Path(folder)), **media)
            with torch.no_grad():
                scores = score_one(served.reward, samples, served.name).detach().cpu()
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward {served.name!r} returned non-finite scores {scores.tolist()}")
        return [float(s) for s in scores]  # float32 -> float64 is exact, and JSON keeps every digit of it

    async def score(request: Request) -> JSONResponse:
        if not authorised(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != CONTENT_TYPE:
            return _error(415, f"POST /score takes Content-Type {CONTENT_TYPE}; got {ctype or 'none'!r}")
        try:
            req = decode(await read_body(request))
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        if req.reward is not None and req.reward != served.name:
            return _error(409, f"this server serves reward {served.name!r}; the request is for {req.reward!r}")
        t0 = time.perf_counter()
        async with lock:
            stats["requests"] += 1
            try:
                scores = await asyncio.to_thread(run_reward, req)
            except Exception as exc:  # the reward's failure goes back to the client; the server keeps serving
                stats["failures"] += 1
                return _error(500, f"{type(exc).__name__}: {exc}", reward=served.name)
        return JSONResponse({"scores": scores, "reward": served.name, "protocol": PROTOCOL,
                             "seconds": round(time.perf_counter() - t0, 6)})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        if status == 404:
            detail = f"no endpoint {request.url.path}; endpoints: GET /health, GET /rewards, POST /score"
        return _error(status, str(detail))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}")

    routes = [Route("/health", health, methods=["GET"]), Route("/rewards", rewards, methods=["GET"]),
              Route("/score", score, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
