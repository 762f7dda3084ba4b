"""Starting real servers for the tests of flowfactory-rewards-remote: `ff reward serve` through the real CLI
(`python -m flowfactory_cli`, what the `ff` script runs), or the fake OpenAI-compatible and Flow-GRPO servers of
remote_fakes.py, each a subprocess on a free port, waited for until it answers. Imported by the tests beside it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

HERE = Path(__file__).parent
FF = [sys.executable, "-m", "flowfactory_cli"]
FF_EXTRA = [sys.executable, str(HERE / "ff_remote_extra.py")]  # `ff` with the test rewards of that file installed
FAKES = [sys.executable, str(HERE / "remote_fakes.py")]
ENV = {**os.environ, "FLOWFACTORY_STRICT_PLUGINS": "1", "COLUMNS": "200"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(cmd: list[str], port: int, log: Path, env: dict | None = None, health: str = "/health",
          wait: float = 90.0) -> Server:
    """Start `cmd` (which listens on `port`) and return once GET `health` answers; its output goes to `log`."""
    with open(log, "ab") as sink:
        proc = subprocess.Popen(cmd, env=env or ENV, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if requests.get(url + health, timeout=1).status_code < 500:
                return Server(url, port, proc, log)
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd} did not answer within {wait:g} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def serve_cmd(*args: str, port: int, launcher: list[str] = FF) -> list[str]:
    return [*launcher, "reward", "serve", *args, "--port", str(port)]


@contextmanager
def serving(*args: str, log: Path, env: dict | None = None, launcher: list[str] = FF,
            port: int | None = None) -> Iterator[Server]:
    """`ff reward serve ARGS --port PORT` running for the block."""
    port = port or free_port()
    server = start(serve_cmd(*args, port=port, launcher=launcher), port, log, env)
    try:
        yield server
    finally:
        stop(server)


@contextmanager
def fake(kind: str, log: Path, env: dict | None = None) -> Iterator[Server]:
    """A fake server of remote_fakes.py (`openai` or `flowgrpo`) running for the block."""
    port = free_port()
    health = "/v1/models" if kind == "openai" else "/health"
    server = start([*FAKES, kind, str(port)], port, log, env, health=health)
    try:
        yield server
    finally:
        stop(server)
