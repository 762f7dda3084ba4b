"""The run folder's lock and the metrics file's torn last line, in-process (the end-to-end cases through `ff run`
are in tests/e2e/test_failures.py)."""

from __future__ import annotations

import errno
import json
import os
import re
import socket

import pytest

from flowfactory.errors import FlowFactoryError
from flowfactory.train.logging import read_metrics
from flowfactory.train.runfolder import RunLock, lock_for_run, write_error


def test_a_held_folder_refuses_a_second_lock_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
    with pytest.raises(FlowFactoryError, match=rf"is in use by another run: process {os.getpid()} on host "):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # emptied, not deleted
    second = RunLock(tmp_path / "run")
    second.acquire()  # free again
    second.release()


def test_lock_for_run_releases_when_the_agreement_raises(tmp_path):
    def agree(error):
        raise FlowFactoryError("another process failed")

    with pytest.raises(FlowFactoryError, match="another process failed"):
        lock_for_run(tmp_path / "run", True, agree)
    lock = lock_for_run(tmp_path / "run", True, lambda error: None)  # not left held
    lock.release()


def test_only_the_main_process_takes_the_lock(tmp_path):
    seen = []
    lock = lock_for_run(tmp_path / "run", False, seen.append)
    assert seen == [None] and lock.fd is None and not (tmp_path / "run").exists()


def test_write_error_names_the_file_and_the_fix(tmp_path):
    full = write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "metrics.jsonl")
    assert str(full) == (f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device. Free space on the disk "
                         f"of {tmp_path} (or raise the quota); then continue the run with --resume.")
    denied = write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x")), tmp_path,
                         resume=False)
    assert str(denied) == (f"cannot write {tmp_path / 'x'}: Permission denied. Make {tmp_path} writable, or choose "
                           f"a writable folder with --output DIR.")


def test_read_metrics_drops_only_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epoch": 3, "rew')
    assert read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]
    assert f"{path}: dropped its last line (line 4), cut short by a crash" in capsys.readouterr().err
    path.write_text('{"epoch": 1}\n[1, 2]\n{"epoch": 3}\n')
    with pytest.raises(FlowFactoryError, match=re.escape(f"{path}:2: not a metrics row (a JSON list, not an object)")):
        read_metrics(path)
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert read_metrics(path) == [{"epoch": 1}, {"epoch": 2}]
    assert capsys.readouterr().err == ""
