"""Sharded (FSDP2) and multi-process training on CPU processes (gloo): equality with one process, resume across
process counts, kill -9 and resume, a failure on one process only, and checkpoints that are never unpickled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import free_port, rows, train, weights

from flowfactory.errors import FlowFactoryError
from flowfactory.train import checkpoint as ckpt

HERE = Path(__file__).parent
FSDP = {"parallel": {"strategy": "fsdp"}}
ODE6 = {"name": "ode", "options": {"steps": 6}}
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "FLOWFACTORY_STRICT_PLUGINS": "1", "OMP_NUM_THREADS": "1"}


def torchrun(path: Path, out: Path, *args: str, port: int, check: bool = True, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """The toy run over 2 gloo processes, as `ff run` under a 2-process launch."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(HERE / "run_toy.py"), str(path), str(out), *args],
                          check=check, env=env or ENV, timeout=timeout, capture_output=not check, text=True)


def kill_9_all(marker: str) -> None:
    """SIGKILL every process whose command line names `marker`, and wait until none is left."""
    def matching() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return [p for p in pids if p != os.getpid()]

    deadline = time.time() + 30
    while (pids := matching()) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    assert not matching()


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:  # equal up to float32 summation order (Adam steps are 3e-3)
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)
    assert [r["reward/mean"] for r in rows(a)] == pytest.approx([r["reward/mean"] for r in rows(b)], abs=1e-5)


@pytest.mark.parametrize("sections, atol", [
    ({}, 1e-5),  # grpo over flow-sde
    ({"sampler": ODE6, "optimizer": {"name": "nft", "options": {"num_times": 2}}}, 1e-5),
    ({"sampler": ODE6, "optimizer": {"name": "awm", "options": {"num_times": 2, "time_type": "uniform"}}}, 1e-4),
    ({"sampler": ODE6, "optimizer": {"name": "awm", "options": {"num_times": 2}}}, 1e-4),  # discrete times
    # a KL term: the frozen reference copy is sharded too, and its forwards are collective
    ({"optimizer": {"name": "grpo", "options": {"clip_range": 0.2, "kl_beta": 0.05}}}, 1e-5),
    ({"sampler": {"name": "flow-sde", "options": {"steps": 6, "sde_window_size": 2, "sde_window_schedule": {
        "type": "sliding", "every_epochs": 1}}}}, 1e-5),  # MixGRPO: grpo over a window that moves every epoch
    # reward back-propagation through 2 checkpointed steps and the decode
    ({"sampler": ODE6, "optimizer": {"name": "draft", "options": {"k": 2}}}, 1e-5),
    # two optimizer steps per epoch: which step a rollout trains in does not depend on the process count
    ({"train": {"steps_per_epoch": 2, "micro_batch_size": 4}}, 1e-5),
], ids=["grpo", "nft", "awm", "awm-default", "grpo-kl", "mixgrpo", "draft", "grpo-2-steps"])
def test_fsdp_two_processes_equal_one_process(toy_registry, toy_config, tmp_path, sections, atol):
    """FSDP2 over 2 processes (every parameter sharded in two) ends with the 1-process weights, rewards and eval."""
    sections = dict(sections)
    path = toy_config(train={"epochs": 4, "eval_every": 2, "sample_every": 0, "checkpoint_every": 0, **FSDP,
                             **sections.pop("train", {})}, **sections)
    train(path, tmp_path / "one")
    torchrun(path, tmp_path / "two", port=free_port())
    assert_same_run(tmp_path / "one", tmp_path / "two", atol)
    assert rows(tmp_path / "one")[1]["eval/reward/mean"] == pytest.approx(rows(tmp_path / "two")[1]["eval/reward/mean"],
                                                                          abs=1e-5)


def test_checkpoint_of_two_fsdp_processes_resumes_on_one_and_back(toy_registry, toy_config, tmp_path):
    """DCP re-shards: a checkpoint written by 2 sharded processes resumes on 1, and one written by 1 resumes on 2,
    both ending with the weights of an uninterrupted 1-process run."""
    path = toy_config(train={"epochs": 6, "eval_every": 0, "sample_every": 0, "checkpoint_every": 2, **FSDP})
    train(path, tmp_path / "whole")
    torchrun(path, tmp_path / "two-then-one", "train.epochs=3", port=free_port())
    two = ckpt.read_meta(ckpt.latest(tmp_path / "two-then-one" / "checkpoints"))
    assert two["processes"] == 2 and two["epoch"] == 3
    assert len(list((tmp_path / "two-then-one" / "checkpoints" / "000003" / "tensors").glob("*.safetensors"))) == 2
    summary = train(path, tmp_path / "two-then-one", resume=True)
    assert summary.resumed_from == 3
    assert_same_run(tmp_path / "whole", tmp_path / "two-then-one", 1e-5)

    train(path, tmp_path / "one-then-two", ["train.epochs=3"])
    torchrun(path, tmp_path / "one-then-two", "--resume", port=free_port())
    assert_same_run(tmp_path / "whole", tmp_path / "one-then-two", 1e-5)


def test_fsdp_kill_9_then_resume_is_bit_identical(toy_registry, toy_config, tmp_path):
    """kill -9 of a 2-process FSDP2 run, then --resume, ends with exactly the uninterrupted FSDP2 run's weights."""
    path = toy_config(train={"epochs": 40, "eval_every": 0, "sample_every": 0, "checkpoint_every": 2,
                             "keep_checkpoints": 100, **FSDP})
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "run_toy.py"), str(path), str(out)]
    proc = subprocess.Popen(cmd, env=ENV)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "000004").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    kill_9_all(str(out))  # the launcher and both training processes (they run in sessions of their own)
    proc.wait()
    assert len(rows(out)) < 40 and not (out / "final").exists()
    torchrun(path, out, "--resume", port=free_port())
    torchrun(path, tmp_path / "whole", port=free_port())
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rows(out)] == list(range(1, 41))


def test_a_reward_failing_on_one_process_stops_every_process(toy_registry, toy_config, tmp_path):
    """A reward that raises on process 1 only: both processes stop within seconds (no hang in gather) with the
    reward's message, the last complete epoch is checkpointed, and --resume finishes the run."""
    path = toy_config(rewards=[{"name": "flaky-on-one-process"}],
                      train={"epochs": 4, "eval_every": 0, "sample_every": 0, "checkpoint_every": 10})
    out = tmp_path / "r"
    start = time.time()
    res = torchrun(path, out, port=free_port(), check=False, timeout=120, env={**ENV, "FLOWFACTORY_TEST_FAIL": "1:3"})
    assert res.returncode != 0
    assert time.time() - start < 90  # a hang would sit in the gloo collective until the timeout above
    log = res.stdout + res.stderr
    assert "reward 'flaky-on-one-process' raised ConnectionError: judge unreachable" in log
    assert "on process 1 of 2" in log  # process 0 stops with process 1's message
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["000002"]
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    torchrun(path, out, "--resume", port=free_port())
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3, 4] and (out / "final" / "toy.pt").is_file()


class _Boom:
    """A pickled object whose unpickling would run code (it writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_checkpoint_holding_a_pickle_is_refused(toy_registry, toy_config, tmp_path):
    path = toy_config(train={"epochs": 2, "eval_every": 0, "sample_every": 0, "checkpoint_every": 1})
    out = tmp_path / "r"
    train(path, out)
    marker = tmp_path / "ran-code"
    torch.save({"params": _Boom(marker)}, out / "checkpoints" / "000002" / "state.pt")
    with pytest.raises(FlowFactoryError, match=r"000002: holds state\.pt, a pickled file; flowfactory never unpickles"):
        train(path, out, ["train.epochs=3"], resume=True)
    assert not marker.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(toy_registry, toy_config, tmp_path, capfd):
    path = toy_config(train={"epochs": 6, "eval_every": 0, "sample_every": 0, "checkpoint_every": 2,
                             "keep_checkpoints": 3})
    train(path, tmp_path / "whole")
    out = tmp_path / "r"
    train(path, out, ["train.epochs=4"])
    shard = next((out / "checkpoints" / "000004" / "tensors").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # torn by a crash or a full disk
    summary = train(path, out, resume=True)
    assert summary.resumed_from == 2
    assert "skipped damaged checkpoint 000004" in capfd.readouterr().err
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_halves_the_resident_parameter_and_optimizer_bytes():
    """Per-process bytes of the trained parameters and AdamW state under 2-process FSDP2 are about half of one
    process's (the toy net's rows split unevenly only where a dimension is odd)."""
    res = subprocess.run([sys.executable, str(HERE.parent.parent / "benchmarks" / "memory.py"), "--fsdp-only"],
                         check=True, capture_output=True, text=True, env=ENV, timeout=300)
    ratio = [float(ln.split()[-1]) for ln in res.stdout.splitlines() if ln.startswith("fsdp2 2-process ratio")]
    assert ratio and 0.45 <= ratio[0] <= 0.55, res.stdout


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fsdp_tiny_flux_through_accelerate_launch_equals_one_process(tmp_path, lora):
    """The documented launch line, `accelerate launch --multi_gpu --num_processes 2 -m flowfactory_cli run`, with
    train.parallel.strategy: fsdp on the tiny FLUX: final/ (gathered from the shards) holds the 1-process weights
    and loads with stock diffusers."""
    import yaml
    from safetensors.torch import load_file

    cfg = yaml.safe_load((HERE.parents[1] / "examples" / "quickstart.yaml").read_text())
    cfg["train"].update(epochs=2, eval_every=0, sample_every=0, checkpoint_every=0, **FSDP)
    if lora:
        cfg["policy"]["options"]["lora"] = {"rank": 4}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run(["ff", "run", str(path), "--output", str(tmp_path / "one")], check=True, env=ENV, timeout=300,
                   capture_output=True)
    res = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "flowfactory_cli", "run", str(path), "--output", str(tmp_path / "two")],
                         env=ENV, timeout=300, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "returned a view tensor" not in res.stderr
    name = "pytorch_lora_weights.safetensors" if lora else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "one" / "final" / name), load_file(tmp_path / "two" / "final" / name)
    assert a.keys() == b.keys() and len(a) == (44 if lora else 108)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [r["reward/mean"] for r in rows(tmp_path / "one")] == pytest.approx(
        [r["reward/mean"] for r in rows(tmp_path / "two")], abs=1e-5)
    if not lora:
        from diffusers import FluxTransformer2DModel

        loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "two" / "final" / "transformer")
        assert sum(p.numel() for p in loaded.parameters()) == 7_076_752
