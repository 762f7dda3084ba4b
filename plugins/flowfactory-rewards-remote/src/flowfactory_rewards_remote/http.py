"""HTTP with time limits, retries with exponential backoff and a bounded number of requests in flight, for the
client rewards. A request that still fails after its retries is a `RewardError` naming the URL and the error, so
the run stops before any weight changes, as for a local reward that raises."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests

from flowfactory.errors import FlowFactoryError, RewardError

T = TypeVar("T")
RETRIED_STATUS = frozenset({500, 502, 503, 504})


class HTTPFailure(Exception):
    """One attempt failed; `retry` says whether another attempt may help."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def answer_text(resp: requests.Response, limit: int = 600) -> str:
    """What an error answer says: the `error` field of a JSON answer, else the last lines of its text."""
    try:
        data = resp.json()
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):  # OpenAI-style: {"error": {"message": ...}}
            error = error.get("message")
        if isinstance(error, str):
            return error[:limit]
    except ValueError:
        pass
    text = resp.text.strip()
    if len(text) > limit:  # a traceback: its end says what failed
        text = "..." + text[-limit:]
    return text or "(empty answer)"



def bearer_headers(env: str | None, missing: str) -> dict[str, str]:
    """`{"Authorization": "Bearer <token>"}` with the token read from the environment variable `env` (none when
    `env` is None); an unset or empty variable is a FlowFactoryError with the message `missing`."""
    if env is None:
        return {}
    token = os.environ.get(env, "")
    if not token:
        raise FlowFactoryError(missing)
    return {"Authorization": f"Bearer {token}"}


class Client:
    """Requests to one service with the options of `flowfactory_rewards_remote._ClientOptions`; `what` names the
    service in messages, e.g. "remote reward 'colour-match'"."""

    def __init__(self, *, what: str, timeout: float, retries: int, backoff: float, max_concurrency: int,
                 headers: dict[str, str] | None = None, max_reply_bytes: int | None = None,
                 hint: str = "Check that the server is running and reachable"):
        self.what = what
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_concurrency = max_concurrency
        self.headers = dict(headers or {})
        self.max_reply_bytes = max_reply_bytes
        self.hint = hint
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False  # a proxy from the environment must not intercept a scorer on this network
        return session

    def _once(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            resp = self._session().request(method, url, timeout=self.timeout, stream=self.max_reply_bytes is not None,
                                           headers={**self.headers, **kwargs.pop("headers", {})}, **kwargs)
        except requests.Timeout:
            raise HTTPFailure(f"no answer within {self.timeout:g} s (option timeout)", retry=True) from None
        except requests.RequestException as exc:
            raise HTTPFailure(f"{type(exc).__name__}: {_short(exc)}", retry=True) from None
        if self.max_reply_bytes is not None:
            body = resp.raw.read(self.max_reply_bytes + 1, decode_content=True)
            resp.close()
            if len(body) > self.max_reply_bytes:
                raise HTTPFailure(f"the answer is over {self.max_reply_bytes / 2**20:g} MiB (option max_reply_mb)",
                                  retry=False)
            resp._content = body
        if resp.status_code >= 400:
            raise HTTPFailure(f"HTTP {resp.status_code}: {answer_text(resp)}",
                              retry=resp.status_code in RETRIED_STATUS)
        return resp

    def request(self, method: str, url: str, *, at_start: bool = False, **kwargs: Any) -> requests.Response:
        """The 2xx answer, after up to `retries` more attempts on network errors, timeouts and 5xx answers; else
        a RewardError naming the URL, the attempts and the last error. `at_start`: a check made when the reward is
        built, before any training."""
        attempt = 0
        while True:
            try:
                return self._once(method, url, **dict(kwargs))
            except HTTPFailure as exc:
                if exc.retry and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    attempt += 1
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                after = ("it was checked when the run started, before any training" if at_start else
                         "no weights were changed this epoch, and `ff run CONFIG --resume` continues from the last "
                         "checkpoint")
                raise RewardError(f"{self.what}: {method} {url} failed{tries}: {exc}. {self.hint}; {after}.") from None

    def map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        """fn over items with at most max_concurrency in flight, results in order; the first failure is raised
        once every call has ended (no request is left running)."""
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="flowfactory-remote")
        futures = [self._pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]


def _short(exc: BaseException) -> str:
    """A requests error without its nested repr noise: the innermost reason."""
    text = str(exc)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip("()'\" ").replace("NewConnectionError(", "").strip() or type(exc).__name__
