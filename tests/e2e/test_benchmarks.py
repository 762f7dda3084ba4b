"""The benchmark scripts keep running: benchmarks/rollout.py for every policy, at the smallest size.

Timings are not asserted (noisy machines); what is asserted is what the script reports besides them: our
rollout's images equal the stock pipeline's, and the report names the pipeline it measured against.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package), registered in sys.modules for the
    test's duration: dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy, pipeline", [
    ("flux", "FluxPipeline"),
    ("flux-kontext", "FluxKontextPipeline"),
    ("flux2", "Flux2Pipeline"),
    ("flux2-klein", "Flux2KleinPipeline"),
    ("sd3", "StableDiffusion3Pipeline"),
    ("qwen-image", "QwenImagePipeline"),
    ("qwen-image-2.1", "QwenImage21Pipeline"),
    ("qwen-image-edit", "QwenImageEditPipeline"),
    ("qwen-image-edit-plus", "QwenImageEditPlusPipeline"),
    ("wan", "WanPipeline"),
    ("z-image", "ZImagePipeline"),
])
def test_rollout_benchmark_runs_and_matches_the_stock_pipeline(policy: str, pipeline: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--policy", policy, "--steps", "2", "--batch", "2",
         "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"pipeline ({pipeline}.__call__" in out
    assert re.search(r"ratio ours / pipeline: \d+\.\d{3}", out)
    diff = re.search(r"max abs image difference: (\S+)", out)
    assert diff is not None and float(diff.group(1)) < 1e-4, out
    assert "torchvision" not in result.stderr  # the pipelines' import warnings stay quiet


def test_memory_benchmark_halves_a_full_finetune_without_reference() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    ratios = dict(re.findall(r"^(flux|sd3|qwen-image|wan)\s+\S+ MB\s+\S+ MB\s+(\d\.\d{3})$", result.stdout, flags=re.M))
    assert ratios == {"flux": "0.500", "sd3": "0.500", "qwen-image": "0.500", "wan": "0.500"}, result.stdout
    assert "FLUX.1-dev transformer: 11.90B parameters" in result.stdout


def test_gpu_benchmark_cpu_half_reports_every_model_and_mode(tmp_path: Path) -> None:
    """benchmarks/gpu.py --tiny: materialise, plan, run and measure each (model, mode) on one CPU process."""
    import json

    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", str(out),
                             "--work", str(work), "--keep"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    models = ("flux.1-dev", "wan2.1-t2v-1.3b", "z-image-turbo", "qwen-image")
    names = "|".join(re.escape(m) for m in models)
    rows = re.findall(rf"^({names})\s+(lora|full)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S.*)$",
                      result.stdout, flags=re.M)
    table = {(model, mode): (int(n), float(plan), f"{peak} {rest}", float(seconds), status)
             for model, mode, n, plan, peak, rest, seconds, status in rows}
    assert len(rows) == 8 and set(table) == {(m, mode) for m in models for mode in ("lora", "full")}, result.stdout
    for n, plan, peak, seconds, status in table.values():
        assert (n, peak, status) == (1, "n/a n/a", "ok") and plan > 0 and seconds > 0  # no CUDA numbers on CPU
    for model in models:  # float32 weights and AdamW state of the whole transformer
        assert table[(model, "full")][1] > table[(model, "lora")][1]

    report = json.loads((out / "results.json").read_text())
    assert report["tiny"] is True and report["device"]["kind"] == "cpu"
    for r in report["results"]:
        assert r["epochs_timed"] == 1 and r["peak_gib"] is None
        assert round(r["plan_gib"], 4) == table[(r["model"], r["mode"])][1]
    assert "| flux.1-dev | lora | 1 |" in (out / "results.md").read_text()

    # the plan column is `ff plan`'s device total for the same config
    plan = subprocess.run([sys.executable, "-m", "flowfactory_cli", "plan", str(work / "flux.1-dev-lora.yaml"),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    expected = next(r["plan_gib"] for r in report["results"] if (r["model"], r["mode"]) == ("flux.1-dev", "lora"))
    assert json.loads(plan.stdout)["device_total"] / 1024 ** 3 == pytest.approx(expected, rel=1e-12)


def test_gpu_benchmark_reads_peaks_of_every_process_and_skips_what_cannot_fit(tmp_path: Path, monkeypatch) -> None:
    """What the CPU half cannot show: CUDA peaks of several processes, and the plan-based skip."""
    import json

    gpu = load_benchmark("gpu", monkeypatch)
    run = tmp_path / "run"
    (run / "peak").mkdir(parents=True)
    times = [(30.0, 20.0, 10.0), (12.0, 8.0, 4.0), (14.0, 9.0, 5.0)]  # epoch, rollout, train; the first is warm-up
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "time/epoch_s": e, "time/rollout_s": r, "time/train_s": t}) + "\n"
        for i, (e, r, t) in enumerate(times)))
    for rank, (allocated, reserved) in enumerate([(30 * 2 ** 30, 32 * 2 ** 30), (31 * 2 ** 30, 33 * 2 ** 30)]):
        (run / "peak" / f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "allocated": allocated, "reserved": reserved}))
    result = gpu.Result("flux.1-dev", "lora", 2, plan_gib=12.5)
    gpu.measure(result, run)
    assert (result.peak_gib, result.reserved_gib, result.s_per_epoch) == (31.0, 33.0, 13.0)
    assert (result.rollout_s, result.train_s, result.epochs_timed) == (8.5, 4.5, 2)
    assert gpu.table_rows([result], 2) == [("flux.1-dev", "lora", "2", "12.50", "31.00", "18.50", "13.00", "ok")]
    unmade = gpu.Result("qwen-image", "full", 1, None, status="failed: materialising (exit 1)")  # e.g. a full disk
    assert gpu.table_rows([unmade], 2) == [("qwen-image", "full", "1", "n/a", "n/a", "n/a", "n/a",
                                            "failed: materialising (exit 1)")]

    h200 = 143_771_287_552  # bytes torch reports for one H200
    assert gpu.too_big(186.73, h200) == "skipped: plan > 127 GiB of the GPU"  # FLUX.1-dev full finetune, 1 process
    assert gpu.too_big(32.32, h200) is None and gpu.too_big(186.73, None) is None


def test_peer_grpo_benchmark_configures_both_projects_alike(tmp_path: Path, monkeypatch) -> None:
    """benchmarks/peer_grpo.py needs Flow-Factory, which CI does not have; what it writes for our side must stay
    a valid run config, and the two configs must keep describing the same run (the comparison's premise)."""
    import yaml

    from flowfactory.config import validate

    peer = load_benchmark("peer_grpo", monkeypatch)
    peer.build_pipeline(tmp_path / "pipe")
    (tmp_path / "train.txt").write_text("\n".join(peer.PROMPTS) + "\n")
    ours = yaml.safe_load(peer.OURS.format(seed=7, pipe=tmp_path / "pipe", tokens=512, prompts=tmp_path / "train.txt",
                                           epochs=8, steps=2))
    theirs = yaml.safe_load(peer.PEER.format(data=tmp_path, out=tmp_path / "out", pipe=tmp_path / "pipe", epochs=8,
                                             steps=2, seed=7))
    cfg, options = validate(ours, "peer_grpo.py")
    assert cfg.train.steps_per_epoch == 2 and cfg.seed == 7
    t, s = theirs["train"], theirs["scheduler"]
    assert (t["gradient_step_per_epoch"], t["seed"], t["max_epochs"]) == (2, 7, cfg.train.epochs)
    assert t["learning_rate"] == cfg.train.lr and t["adam_weight_decay"] == cfg.train.weight_decay
    assert t["max_grad_norm"] == cfg.train.max_grad_norm and t["adv_clip_range"] == cfg.train.adv_clip
    assert t["clip_range"] == options["optimizer"].clip_range and t["kl_beta"] == options["optimizer"].kl_beta
    assert (t["unique_sample_num_per_epoch"], t["group_size"]) == (cfg.train.prompts_per_epoch, cfg.train.group_size)
    assert t["per_device_batch_size"] == cfg.train.micro_batch_size and t["global_std"] is False
    assert cfg.train.adv_std == "group"
    sampler = options["sampler"]
    assert (t["num_inference_steps"], s["noise_level"], s["num_sde_steps"]) == (
        sampler.steps, sampler.noise_level, sampler.sde_window_size)
    assert s["sde_steps"] == list(range(sampler.steps // 2))  # our window start is drawn from [0, steps // 2)
    assert t["resolution"] == options["policy"].height == options["policy"].width
    assert theirs["model"]["model_name_or_path"] == str(options["policy"].model)
    compile(peer.PEER_DRIVER, "peer_driver.py", "exec")
    compile(peer.PEER_REWARD, "peer_brightness.py", "exec")
