"""Lose nothing, whatever fails: the run folder's lock, a torn metrics row, a prompt file that is not UTF-8, an
output folder that cannot be written, a full disk while checkpointing. Each through the real `ff run` in a
subprocess (ff_toy.py: `ff` with the toy policy installed): its exit code, its one message, and where a resume
applies, final weights bit-identical to an uninterrupted run's (docs/failures.md lists every case)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import free_port, rows, same_weights, train

from flowfactory.train import checkpoint as ckpt
from flowfactory.train.runfolder import RunLock

HERE = Path(__file__).parent
FF = [sys.executable, str(HERE / "ff_toy.py")]
ENV = {**os.environ, "FLOWFACTORY_STRICT_PLUGINS": "1", "COLUMNS": "200"}  # threads as here: equal float sums
TORCHRUN_ENV = {**ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
QUIET = {"eval_every": 0, "sample_every": 0}


def ff_run(path: Path, out: Path, *args: str, env: dict | None = None, timeout: float = 300,
           **kwargs) -> subprocess.CompletedProcess:
    """`ff run CONFIG --output OUT ARGS...` in a subprocess; output captured as text."""
    return subprocess.run([*FF, "run", str(path), "--output", str(out), *args], env=env or ENV, timeout=timeout,
                          capture_output=True, text=True, **kwargs)


def assert_one_message(res: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one `Error:` message holding every fragment, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert err.count("Error:") == 1, res.stderr
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def assert_same_weights(a: Path, b: Path) -> None:
    assert same_weights(a, b)


# --- one run at a time -------------------------------------------------------------------------------------

def test_two_runs_racing_into_one_folder_only_one_runs(toy_config, tmp_path):
    """Two `ff run` started together into one --output: one trains to the end, alone; the other is refused at
    once, naming the holder (process id, host, since when) and what to do."""
    path = toy_config(train={"epochs": 40, **QUIET, "checkpoint_every": 5})
    out = tmp_path / "shared"
    cmd = [*FF, "run", str(path), "--output", str(out)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], [(p.returncode, e) for p, _, e in results]
    winner = next(p for p in procs if p.returncode == 0)
    loser_err = " ".join(next(e for p, _, e in results if p.returncode == 2).split())
    assert f"{out} is in use by another run: process {winner.pid} on host {socket.gethostname()}, running since " \
           in loser_err
    assert "--resume" in loser_err and "another --output DIR" in loser_err and "Traceback" not in loser_err
    assert [r["epoch"] for r in rows(out)] == list(range(1, 41))  # one run's rows, each once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000035", "000040"]
    assert (out / ".lock").read_text() == ""  # released at the end


def test_a_locked_folder_refuses_every_process_of_a_multi_process_run(toy_registry, toy_config, tmp_path):
    """Under a 2-process launch only the main process tries the lock; both processes stop with its message
    (none waits for the other), and nothing is written into the folder."""
    path = toy_config(train={"epochs": 2, **QUIET, "checkpoint_every": 1})
    out = tmp_path / "held"
    lock = RunLock(out)
    lock.acquire()  # this test process holds the folder, as a running `ff run` would
    try:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(free_port()), str(HERE / "ff_toy.py"), "run", str(path), "--output",
                              str(out)],
                             env=TORCHRUN_ENV, capture_output=True, text=True, timeout=180)
    finally:
        lock.release()
    log = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0
    holder = f"{out} is in use by another run: process {os.getpid()} on host {socket.gethostname()}"
    assert log.count(holder) == 2, log  # each process's message names the holder
    assert "(on process 0 of 2; this process stopped with it)" in log
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_lock_file_left_by_kill_9_does_not_block_resume(toy_registry, toy_config, tmp_path):
    """kill -9 leaves .lock naming a dead process; the kernel released the lock, so --resume runs, and ends
    with the uninterrupted run's weights."""
    path = toy_config(train={"epochs": 40, **QUIET, "checkpoint_every": 2, "keep_checkpoints": 100})
    out = tmp_path / "killed"
    proc = subprocess.Popen([*FF, "run", str(path), "--output", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "000004").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # left behind, naming the dead run
    assert not (out / "final").exists()
    res = ff_run(path, out, "--resume")
    assert res.returncode == 0, res.stderr
    train(path, tmp_path / "whole")
    assert_same_weights(tmp_path / "whole", out)
    assert [r["epoch"] for r in rows(out)] == list(range(1, 41))


# --- metrics.jsonl -------------------------------------------------------------------------------------------

def test_a_torn_last_metrics_row_is_dropped_on_resume(toy_registry, toy_config, tmp_path):
    """A crash while epoch 7's row was written leaves half a JSON line: --resume drops it with a message, then
    ends bit-identical to an uninterrupted run."""
    path = toy_config(train={"epochs": 10, **QUIET, "checkpoint_every": 3})
    out = tmp_path / "torn"
    train(path, out, ["train.epochs=6"])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 7, "reward/mean": 0.41')
    res = ff_run(path, out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"{out / 'metrics.jsonl'}: dropped its last line (line 7), cut short by a crash" in \
           " ".join(res.stderr.split())
    train(path, tmp_path / "whole")
    assert_same_weights(tmp_path / "whole", out)
    assert [r["epoch"] for r in rows(out)] == list(range(1, 11))


def test_a_bad_metrics_row_before_the_last_is_an_error_naming_it(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 10, **QUIET, "checkpoint_every": 3})
    out = tmp_path / "bad"
    train(path, out, ["train.epochs=6"])
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    res = ff_run(path, out, "--resume")
    assert_one_message(res, f"{out / 'metrics.jsonl'}:3: not a metrics row", "Repair or delete line 3")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000003", "000006"]  # untouched


# --- messages instead of tracebacks --------------------------------------------------------------------------

def test_a_prompt_file_that_is_not_utf8_is_one_message(toy_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red cube\nune crème brûlée\n".encode("latin-1"))
    path = toy_config(data={"train": str(prompts)}, train={"epochs": 1, **QUIET})
    res = ff_run(path, tmp_path / "out")
    assert_one_message(res, f"data.train: {prompts} is not UTF-8 text: byte 0xe8 at line 2, column 7",
                       "Save the file as UTF-8", "iconv -f latin1 -t utf-8")
    assert not (tmp_path / "out").exists()  # the config is refused before any run starts


def _bound_by_permissions() -> list[str]:
    """A command prefix under which file permissions apply: root ignores them unless it drops the capabilities
    that override them (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop the override of permissions")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_an_output_folder_that_cannot_be_written_is_one_message(toy_config, tmp_path):
    path = toy_config(train={"epochs": 1, **QUIET})
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    res = subprocess.run([*_bound_by_permissions(), *FF, "run", str(path), "--output", str(readonly / "run")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    readonly.chmod(0o755)
    assert_one_message(res, f"cannot write {readonly / 'run'}: Permission denied",
                       f"Make {readonly} writable, or choose a writable folder with --output DIR")
    assert not (readonly / "run").exists()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_while_checkpointing_loses_nothing(toy_registry, toy_config, tmp_path, where):
    """The disk fills up while checkpoint 6 is written (its tensor files, or flushing them): one message,
    the partial checkpoint removed, checkpoint 3 intact; once there is space, --resume ends bit-identical."""
    path = toy_config(train={"epochs": 6, **QUIET, "checkpoint_every": 3})
    out = tmp_path / "full"
    res = ff_run(path, out, env={**ENV, "FLOWFACTORY_TEST_DISK_FULL_FROM": f"2:{where}"})
    assert_one_message(res, f"writing checkpoint 000006 in {out / 'checkpoints'} failed: No space left on device",
                       "Nothing was lost: the partial checkpoint was removed and checkpoint 000003 is intact",
                       f"Free space on the disk of {out / 'checkpoints'}", "then continue the run with --resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000003"]
    assert ckpt.latest(out / "checkpoints") == out / "checkpoints" / "000003"
    res = ff_run(path, out, "--resume")
    assert res.returncode == 0, res.stderr
    train(path, tmp_path / "whole")
    assert_same_weights(tmp_path / "whole", out)
    assert [r["epoch"] for r in rows(out)] == list(range(1, 7))


def test_a_full_disk_on_the_main_process_stops_every_process(toy_registry, toy_config, tmp_path):
    """Two processes: flushing the checkpoint fails on the main process only; both stop with its message
    (none waits in a collective), and a 2-process --resume completes the run."""
    path = toy_config(train={"epochs": 4, **QUIET, "checkpoint_every": 2})
    out = tmp_path / "full2"

    def two_processes(*args: str, env: dict = TORCHRUN_ENV) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(free_port()), str(HERE / "ff_toy.py"), "run", str(path), "--output", str(out), *args],
                              env=env, capture_output=True, text=True, timeout=240)

    res = two_processes(env={**TORCHRUN_ENV, "FLOWFACTORY_TEST_DISK_FULL_FROM": "2:fsync"})
    log = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0
    assert log.count("writing checkpoint 000004") >= 2, log  # the message, on both processes
    assert "checkpoint 000002 is intact" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002"]
    res = two_processes("--resume")
    assert res.returncode == 0, res.stderr
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3, 4] and (out / "final" / "toy.pt").is_file()
