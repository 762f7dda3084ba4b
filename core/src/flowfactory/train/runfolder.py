"""The output folder of a run: one run at a time, and one clear message when it cannot be written.

A run holds an exclusive lock (`fcntl.flock`) on `<output>/.lock` from the start of its set-up to its end,
and writes the holder into the file (process id, host, start time, command), so a second run into the same
folder is refused with a message naming the run that holds it. Only the main process of a multi-process
run takes the lock; the others learn the outcome through the run's agreement collective, so every process
stops with the same message. The kernel drops the lock when its process ends, however it ends (kill -9
included), so a lock file left behind never blocks a later run or `--resume`; the file is emptied on a
normal release and never deleted (deleting it could let two runs lock two different files).

A failed write (full disk, quota, permissions, read-only file system) becomes a `FlowFactoryError` naming
the file, the reason and the fix, instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from flowfactory.errors import FlowFactoryError

LOCK_NAME = ".lock"
FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


def write_fix(exc: OSError, folder: Path) -> str:
    """What the user does about a failed write under `folder`."""
    if exc.errno in FULL:
        return f"Free space on the disk of {folder} (or raise the quota)"
    if exc.errno in DENIED:
        return f"Make {folder} writable, or choose a writable folder with --output DIR"
    return f"Fix the cause above for {folder}"


def write_error(exc: OSError, path: Path | str, resume: bool = True) -> FlowFactoryError:
    """One message for a failed write: the file, the reason, the fix (and that --resume continues)."""
    where = Path(exc.filename) if exc.filename else Path(path)
    reason = exc.strerror or type(exc).__name__
    then = "; then continue the run with --resume" if resume else ""
    folder = where if where.is_dir() else where.parent
    return FlowFactoryError(f"cannot write {where}: {reason}. {write_fix(exc, folder)}{then}.")


@contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """Turn a full disk or a refused write anywhere in a run into one message (other errors pass through)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL or exc.errno in DENIED:
            raise write_error(exc, out) from exc
        raise


class RunLock:
    """The exclusive lock of one run on its output folder (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a FlowFactoryError naming the run that holds it."""
        import fcntl

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(exc, self.out, resume=False) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FlowFactoryError(_refusal(self.out, holder)) from None
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                os.close(fd)
                raise write_error(exc, self.path, resume=False) from exc
            print(f"flowfactory: cannot lock {self.path} ({exc.strerror}; this file system has no locks): nothing "
                  f"stops a second run from writing into {self.out} at the same time", file=sys.stderr)
        self.fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            self.release()
            raise write_error(exc, self.path, resume=False) from exc

    def release(self) -> None:
        """Empty the file (a normal end) and drop the lock; the file stays."""
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the holder recorded in the file is merely stale
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def lock_for_run(out: Path, main: bool, agree: Callable[[BaseException | None], None]) -> RunLock:
    """The main process takes the lock; `agree` (the run's agreement collective) then raises the refusal on
    every process, so none goes on alone and none waits for one that stopped."""
    lock = RunLock(out)
    error: BaseException | None = None
    if main:
        try:
            lock.acquire()
        except FlowFactoryError as exc:
            error = exc
    try:
        agree(error)
    except BaseException:
        lock.release()
        raise
    return lock


def _alive_here(holder: dict[str, Any]) -> bool:
    """False for a holder recorded on this host whose process is gone (the file's content is stale)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return True


def _read_holder(fd: int, wait: float = 2.0) -> dict[str, Any] | None:
    """The holder recorded in the lock file. A run that has just taken the lock writes itself in at once;
    until then the file is empty or names an earlier, ended run, so read again for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    holder = None
    while True:
        try:
            holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "null")
        except ValueError:
            holder = None
        if isinstance(holder, dict) and _alive_here(holder):
            return holder
        if time.monotonic() > deadline:
            return holder if isinstance(holder, dict) else None
        time.sleep(0.05)


def _refusal(out: Path, holder: dict[str, Any] | None) -> str:
    if holder:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        who = f"process {pid} on host {host}, running since {holder.get('since', '?')}"
        if holder.get("command"):
            who += f" (`{holder['command']}`)"
        stop = f"stop it (`kill {pid}` on {host} saves its last complete epoch)"
    else:
        who = "a run that has not yet written its process id into the lock file"
        stop = "stop it"
    return (f"{out} is in use by another run: {who}. One run at a time writes a folder: wait for that run to "
            f"end, or {stop}, then continue it with --resume; or give this run another --output DIR. (The lock, "
            f"{out / LOCK_NAME}, is released when its process ends, however it ends.)")
