"""Peak GPU memory and seconds per epoch of real-size GRPO runs, next to `ff plan`'s estimate. No downloads.

For FLUX.1-dev, Wan 2.1 T2V 1.3B, Z-Image-Turbo and Qwen-Image, LoRA (rank 32) and full finetune, over every
visible GPU (FSDP2, bf16):

1. materialise: a random-weight pipeline folder built from the stored configs in tests/data/model-configs/
   (every component at its real size, text encoders included: T5-XXL, UMT5-XXL, Qwen3-4B, Qwen2.5-VL 7B with its
   vision tower; initialised on the GPU in bf16, then `save_pretrained`); tokenizers are flowfactory's in-memory
   test tokenizers (not the real vocabularies: the text encoders see other token ids, at the same sequence lengths
   where the pipeline pads to max_sequence_length; Z-Image's carries Qwen3's chat template);
2. plan: `ff plan`'s per-process estimate for each run (`flowfactory.plan.plan_memory`, what `ff plan --json`
   prints), activations excluded;
3. run: `ff run` on a config pointing at that folder, one process per GPU (`torch.distributed.run`), recording
   each process's `torch.cuda.max_memory_allocated` over the whole run (load, rollouts, training, save);
4. report: a table (model, mode, processes, plan GiB, peak GiB, s/epoch) printed and written as results.json and
   results.md to $OUT if set, else benchmarks/out/ (or --out). s/epoch is the mean `time/epoch_s` of
   metrics.jsonl without the first epoch (warm-up).

A run whose plan exceeds the GPU's memory is reported as skipped (on one GPU: FLUX.1-dev's and Qwen-Image's full
finetunes, the AdamW state and float32 master weights of 12B and 20B parameters); a run that fails (e.g. out of
memory) is reported with the last line of its log and the others go on, as are a model's rows whose folder could
not be materialised (e.g. too little disk).

    python benchmarks/gpu.py                      # GPU machine: all GPUs, real sizes, every model
    python benchmarks/gpu.py --models flux wan        # the first two alone: ~8 min on one H200 (estimated)
    python benchmarks/gpu.py --models wan --modes lora --epochs 2
    python benchmarks/gpu.py --models z-image qwen-image --modes lora
    python benchmarks/gpu.py --tiny               # CPU, 1 process, tiny sizes: the same steps (the tests run it)

It installs and downloads nothing; the materialised folders (~34 GB for FLUX.1-dev, ~15 GB for Wan, ~21 GB for
Z-Image-Turbo, ~58 GB for Qwen-Image) go to a temporary folder (--work) and are removed when the model's runs end,
as are the run folders (--keep keeps both).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "model-configs"
GIB = 1024 ** 3
SKIP_FRACTION = 0.95  # a run whose plan exceeds this share of the GPU's memory is not launched


@dataclass(frozen=True)
class Model:
    """One benchmarked model: its stored configs, policy options at real and tiny size, and its run shape."""

    key: str  # folder under tests/data/model-configs/
    policy: str
    options: dict[str, Any]  # policy options besides model/lora/dtype, real size
    tiny_options: dict[str, Any]
    sampler: dict[str, Any]
    prompts_per_process: int  # distinct prompts per process per epoch; each sampled group_size times
    train: dict[str, Any]  # batch sizes
    shrink: dict[str, dict[str, Any]] = field(default_factory=dict)  # --tiny: component -> config overrides


FLUX = Model(
    key="flux.1-dev", policy="flux",
    options={"height": 512, "width": 512, "max_sequence_length": 512, "guidance_scale": 3.5},
    tiny_options={"height": 16, "width": 16, "max_sequence_length": 32, "guidance_scale": 3.5},
    sampler={"steps": 10, "noise_level": 0.7, "sde_window_size": 2, "sde_window_range": [0, 5]},
    prompts_per_process=2, train={"rollout_batch_size": 8, "micro_batch_size": 4},
    shrink={
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "projection_dim": 32},
        "text_encoder_2": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2},
        "vae": {"block_out_channels": [16], "down_block_types": ["DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
                "sample_size": 16},
    },
)
WAN = Model(
    key="wan2.1-t2v-1.3b", policy="wan",
    options={"height": 480, "width": 832, "num_frames": 33, "max_sequence_length": 512, "guidance_scale": 5.0,
             "shift": 3.0, "vae_decode_chunk": 1},
    tiny_options={"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16, "guidance_scale": 5.0,
                  "shift": 3.0, "vae_decode_chunk": 1},
    sampler={"steps": 10, "noise_level": 0.7, "sde_window_size": 2, "sde_window_range": [0, 5]},
    prompts_per_process=1, train={"rollout_batch_size": 2, "micro_batch_size": 1},
    shrink={
        "transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64,
                        "freq_dim": 32, "text_dim": 32, "rope_max_seq_len": 32},
        "text_encoder": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1,
                         "num_heads": 2},
        "vae": {"base_dim": 16, "dim_mult": [1, 1], "num_res_blocks": 1, "temperal_downsample": [True],
                "scale_factor_spatial": 2, "scale_factor_temporal": 2},
    },
)
Z_IMAGE = Model(
    key="z-image-turbo", policy="z-image",  # Z-Image-Turbo runs without CFG, in 9 steps (its model card)
    options={"height": 512, "width": 512, "max_sequence_length": 512, "guidance_scale": 0.0},
    tiny_options={"height": 16, "width": 16, "max_sequence_length": 64, "guidance_scale": 0.0},
    sampler={"steps": 9, "noise_level": 0.7, "sde_window_size": 2, "sde_window_range": [0, 5]},
    prompts_per_process=2, train={"rollout_batch_size": 8, "micro_batch_size": 4},
    shrink={
        "transformer": {"dim": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "n_refiner_layers": 1,
                        "axes_dims": [4, 6, 6], "cap_feat_dim": 32},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,  # hidden_states[-2]
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 512,
                         "bos_token_id": None, "eos_token_id": None},  # Qwen3's ids lie past 512 (generation only)
        "vae": {"block_out_channels": [16], "down_block_types": ["DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
                "sample_size": 16},
    },
)
QWEN_IMAGE = Model(
    key="qwen-image", policy="qwen-image",
    options={"height": 512, "width": 512, "max_sequence_length": 512, "true_cfg_scale": 4.0, "negative_prompt": " "},
    tiny_options={"height": 16, "width": 16, "max_sequence_length": 32, "true_cfg_scale": 4.0,
                  "negative_prompt": " "},
    sampler={"steps": 10, "noise_level": 0.7, "sde_window_size": 2, "sde_window_range": [0, 5]},
    prompts_per_process=1, train={"rollout_batch_size": 4, "micro_batch_size": 2},
    shrink={
        "transformer": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 32,
                        "axes_dims_rope": [8, 12, 12], "joint_attention_dim": 32},
        # Qwen2.5-VL: the text model's keys are flat in config.json (mrope_section sums to head_dim / 2), the
        # vision tower's (which text-to-image never runs) under vision_config
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "vocab_size": 512, "rope_scaling": {"mrope_section": [2, 3, 3]},
                         "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                                           "out_hidden_size": 32, "fullatt_block_indexes": [0]}},
        "vae": {"base_dim": 16, "dim_mult": [1], "num_res_blocks": 1, "temperal_downsample": []},
    },
)
MODELS: dict[str, Model] = {"flux": FLUX, "wan": WAN, "z-image": Z_IMAGE, "qwen-image": QWEN_IMAGE}
MODES = ("lora", "full")
GROUP_SIZE = 4


# ============================================================================ materialise (a worker process)

def _tokenizer(cls_name: str, name: str, pipeline: str) -> Any:
    """An in-memory tokenizer of the class model_index.json names (not the real vocabulary) for `pipeline`."""
    from flowfactory_diffusers import tokenizers

    if pipeline == "ZImagePipeline":  # it prompts through the tokenizer's chat template: Qwen3's
        from flowfactory_zimage.tiny import qwen3_tokenizer

        return qwen3_tokenizer()
    makers = {"CLIPTokenizer": tokenizers.clip_tokenizer, "T5TokenizerFast": tokenizers.t5_tokenizer,
              "Qwen2Tokenizer": tokenizers.qwen2_tokenizer}
    if cls_name not in makers:
        raise SystemExit(f"gpu.py: no in-memory tokenizer for {name} ({cls_name})")
    return makers[cls_name]()


def _merged(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with `overrides`; a dict override of a dict entry (a sub-config) merges into it."""
    out = dict(config)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _random_module(lib: str, cls: type, src: Path, name: str, overrides: dict[str, Any], device: str,
                   dtype: Any) -> Any:
    """The component `name` built from its stored config (with `overrides`) with random weights on `device`."""
    import torch
    from torch import nn

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the saved dtype: no float32 copy of 12B parameters
    try:
        with torch.device(device):
            if lib == "diffusers":
                module = cls.from_config(_merged(cls.load_config(src, subfolder=name), overrides))
            else:  # overrides go into config.json before the config is built: what it derives follows them
                raw, _ = cls.config_class.get_config_dict(src, subfolder=name)
                module = cls(cls.config_class.from_dict(_merged(raw, overrides)))
    finally:
        torch.set_default_dtype(previous)
    return nn.Module.to(module, dtype).eval()  # diffusers' own .to warns about its float32 modules


def materialise(src: Path, dest: Path, *, device: str, dtype_name: str, shrink: dict[str, dict[str, Any]]) -> None:
    """A pipeline folder `from_pretrained` loads: every component of src/model_index.json from its config with
    random weights (`shrink` overrides config keys), in-memory tokenizers, the stored scheduler config."""
    import torch
    from torch import nn

    from flowfactory_diffusers import quiet_transformers

    with quiet_transformers():
        import diffusers  # its pipelines' import-time notes (torchvision) stay quiet
    dtype = getattr(torch, dtype_name)
    index = json.loads((src / "model_index.json").read_text())
    components: dict[str, Any] = {}
    params = 0
    with quiet_transformers():
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            lib, cls_name = spec
            cls = getattr(importlib.import_module(lib), cls_name)
            if cls_name.endswith(("Tokenizer", "TokenizerFast")):
                components[name] = _tokenizer(cls_name, name, index["_class_name"])
            elif isinstance(cls, type) and issubclass(cls, nn.Module):
                components[name] = _random_module(lib, cls, src, name, shrink.get(name, {}), device, dtype)
                params += sum(p.numel() for p in components[name].parameters())
            else:  # scheduler: its config only
                components[name] = cls.from_pretrained(src, subfolder=name)
        pipe = getattr(diffusers, index["_class_name"])(**components)
    need = params * torch.finfo(dtype).bits // 8
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if need > 0.95 * free:
        raise SystemExit(f"gpu.py: {src.name} needs {need / GIB:.1f} GiB in {dest.parent}, which has "
                         f"{free / GIB:.1f} GiB free; give --work a larger disk")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder would hold the disk the next model needs
        raise
    (tmp / "materialised.json").write_text(json.dumps(
        {"from": str(src), "parameters": params, "dtype": dtype_name, "shrunk": sorted(shrink)}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"materialised {src.name}: {params:,} parameters, {need / GIB:.2f} GiB ({dtype_name}) in {dest}", flush=True)


def device_info() -> dict[str, Any]:
    """The accelerator this machine has (name, count, memory per device), or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cpu", "name": platform.processor() or platform.machine(), "count": 1, "memory": None,
                "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {"kind": "cuda", "name": props.name, "count": torch.cuda.device_count(), "memory": props.total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def _worker_materialise(args: list[str]) -> None:
    """`--worker materialise INFO.json DEVICE DTYPE [KEY DEST TINY]...`: build folders, write device info."""
    info_path, device, dtype_name, rest = Path(args[0]), args[1], args[2], args[3:]
    info = device_info()
    info_path.write_text(json.dumps(info))
    if device == "cuda" and info["kind"] != "cuda":
        raise SystemExit("gpu.py: no CUDA device (torch.cuda.is_available() is False); run with --tiny for the "
                         "CPU half")
    for key, dest, tiny in zip(rest[0::3], rest[1::3], rest[2::3], strict=True):
        model = next(m for m in MODELS.values() if m.key == key)
        materialise(CONFIGS / key, Path(dest), device=device, dtype_name=dtype_name,
                    shrink=model.shrink if tiny == "1" else {})


# ==================================================================================== run (a worker process)

def _worker_run(args: list[str]) -> None:
    """`--worker run PEAK_DIR CONFIG ...`: `ff run CONFIG ...` in this process, then its peak device memory."""
    import torch

    from flowfactory_cli.main import main

    peak_dir, rest = Path(args[0]), args[1:]
    code: int | str | None = 0
    try:
        main(["run", *rest])
    except SystemExit as exc:
        code = exc.code
    finally:
        rank = int(os.environ.get("RANK", "0"))
        record: dict[str, Any] = {"rank": rank, "allocated": None, "reserved": None}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            record.update(allocated=torch.cuda.max_memory_allocated(device),
                          reserved=torch.cuda.max_memory_reserved(device))
        peak_dir.mkdir(parents=True, exist_ok=True)
        (peak_dir / f"rank{rank}.json").write_text(json.dumps(record))
    sys.exit(code)


# ============================================================================================= the benchmark

@dataclass
class Result:
    """One row of the report."""

    model: str
    mode: str
    processes: int
    plan_gib: float | None  # None: not planned (the model could not be materialised)
    peak_gib: float | None = None  # max over processes of max_memory_allocated
    reserved_gib: float | None = None
    s_per_epoch: float | None = None
    rollout_s: float | None = None
    train_s: float | None = None
    epochs_timed: int = 0
    status: str = "ok"


def run_config(model: Model, mode: str, folder: Path, processes: int, epochs: int, tiny: bool) -> dict[str, Any]:
    """The run config of one benchmark row (written as YAML next to the materialised folder)."""
    fsdp = {"strategy": "fsdp", "reshard_after_forward": True, "reduce_dtype": "float32"}
    if not tiny:
        fsdp["param_dtype"] = "bfloat16"
    options = {"model": str(folder), **(model.tiny_options if tiny else model.options),
               "dtype": "float32" if tiny else "bfloat16", "gradient_checkpointing": True,
               "lora": {"rank": 32, "alpha": 64} if mode == "lora" else None}
    return {
        "name": f"gpu-{model.key}-{mode}", "seed": 0,
        "policy": {"name": model.policy, "options": options},
        "sampler": {"name": "flow-sde", "options": model.sampler},
        "rewards": [{"name": "jpeg-compressibility", "options": {"quality": 95}}],
        "optimizer": {"name": "grpo", "options": {"clip_range": 1.0e-4, "kl_beta": 0.0}},
        "data": {"train": "colours", "eval": None},
        "train": {"epochs": epochs, "prompts_per_epoch": model.prompts_per_process * processes,
                  "group_size": GROUP_SIZE, **model.train, "lr": 1.0e-4 if mode == "lora" else 1.0e-5,
                  "mixed_precision": "no" if tiny else "bf16", "parallel": fsdp, "eval_every": 0,
                  "sample_every": 0, "checkpoint_every": 0, "tensorboard": False},
    }


def plan_gib(config: Path, overrides: list[str], processes: int) -> float:
    """`ff plan CONFIG --processes N`'s device total per process, in GiB (activations excluded)."""
    from flowfactory.config import load
    from flowfactory.plan import plan_memory
    from flowfactory.plugins import get_registry

    registry = get_registry()
    cfg, options = load(config, overrides, registry=registry)
    return plan_memory(cfg, options, registry, processes, source=str(config)).device_total / GIB


def launch(config: Path, overrides: list[str], out: Path, processes: int, tiny: bool, log: Path) -> int:
    """`ff run` of `config` over `processes` processes (through this script's run worker); its exit code."""
    worker = [str(Path(__file__).resolve()), "--worker", "run", str(out / "peak"), str(config), "--output",
              str(out)]
    for item in overrides:
        worker += ["--set", item]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *worker]
    else:
        command = [sys.executable, *worker]
    env = dict(os.environ)
    if tiny:  # the CPU half stays on the CPU even where a GPU is present; one thread per process (no contention)
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
        env.setdefault("OMP_NUM_THREADS", "1")
    with log.open("w") as fh:
        return subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def too_big(plan: float, memory: int | None) -> str | None:
    """Why a run planned at `plan` GiB per process is not launched on devices of `memory` bytes, or None."""
    if memory is None or plan * GIB <= SKIP_FRACTION * memory:
        return None
    return f"skipped: plan > {SKIP_FRACTION * memory / GIB:.0f} GiB of the GPU"


def measure(result: Result, out: Path) -> None:
    """Fill `result` from a finished run's metrics.jsonl and its processes' peak-memory records."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[1:] or rows  # the first epoch is warm-up (compilation, allocator, encoder load)
    result.epochs_timed = len(timed)
    result.s_per_epoch = statistics.mean(r["time/epoch_s"] for r in timed)
    result.rollout_s = statistics.mean(r["time/rollout_s"] for r in timed)
    result.train_s = statistics.mean(r["time/train_s"] for r in timed)
    peaks = [json.loads(p.read_text()) for p in sorted((out / "peak").glob("rank*.json"))]
    allocated = [p["allocated"] for p in peaks if p["allocated"] is not None]
    if allocated:
        result.peak_gib = max(allocated) / GIB
        result.reserved_gib = max(p["reserved"] for p in peaks) / GIB


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


HEADER = ("model", "mode", "processes", "plan GiB", "peak GiB", "peak-plan GiB", "s/epoch", "status")


def table_rows(results: list[Result], digits: int) -> list[tuple[str, ...]]:
    """The report's cells, as printed."""
    return [(r.model, r.mode, str(r.processes), _fmt(r.plan_gib, digits), _fmt(r.peak_gib, digits),
             _fmt(None if r.peak_gib is None else r.peak_gib - r.plan_gib, digits), _fmt(r.s_per_epoch, 2), r.status)
            for r in results]


def print_table(rows: list[tuple[str, ...]]) -> str:
    """A plain aligned table (also what the tests parse)."""
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [HEADER, *rows]]
    return "\n".join(lines)


def markdown(rows: list[tuple[str, ...]], meta: dict[str, Any]) -> str:
    """results.md: the table and what it was measured on."""
    lines = [f"# flowfactory GPU benchmark ({meta['date']})", "",
             f"Device: {meta['device']['name']} x {meta['device']['count']}; torch {meta['device']['torch']}; "
             f"flowfactory {meta['commit']}; {'tiny sizes, CPU' if meta['tiny'] else 'real sizes, random weights'}.",
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "plan: `ff plan`'s device memory per process, activations excluded. peak: "
              "`torch.cuda.max_memory_allocated` over the whole run, the largest of the processes; peak-plan: what "
              "the plan does not count (activations, temporary buffers). s/epoch: mean `time/epoch_s` without the "
              "first epoch.", ""]
    for key, shape in meta["runs"].items():
        lines.append(f"- {key}: {shape}")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _tail(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "no output"


def write_report(out_dir: Path, results: list[Result], device: dict[str, Any], shapes: dict[str, str], tiny: bool,
                 digits: int) -> list[tuple[str, ...]]:
    """results.json and results.md with the rows so far; returns the table's cells."""
    rows = table_rows(results, digits)
    meta = {"date": datetime.date.today().isoformat(), "commit": _commit(), "tiny": tiny, "device": device,
            "runs": shapes}
    (out_dir / "results.json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2))
    (out_dir / "results.md").write_text(markdown(rows, meta))
    return rows


def benchmark(args: argparse.Namespace) -> list[Result]:
    """Materialise, plan, run and measure every (model, mode); print and write the report."""
    import yaml

    tiny = args.tiny
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flowfactory-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    models = [MODELS[m] for m in args.models]
    epochs = args.epochs or (2 if tiny else 3)
    device: dict[str, Any] = {}
    results: list[Result] = []
    shapes: dict[str, str] = {}
    digits = 4 if tiny else 2
    try:
        for model in models:
            folder = work / f"{model.key}{'-tiny' if tiny else ''}"
            info = work / "device.json"
            print(f"[{model.key}] materialising random weights from {CONFIGS / model.key} ...", flush=True)
            info.unlink(missing_ok=True)
            env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if tiny else {}))
            code = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", "materialise", str(info),
                 "cpu" if tiny else "cuda", "float32" if tiny else "bfloat16", model.key, str(folder),
                 "1" if tiny else "0"], env=env, cwd=ROOT).returncode
            device = json.loads(info.read_text()) if info.exists() else {}
            if code and device.get("kind") != ("cpu" if tiny else "cuda"):  # nothing can run here (no CUDA)
                raise SystemExit(f"gpu.py: materialising {model.key} failed (exit {code})")
            processes = args.processes or (1 if tiny else device["count"])
            if code:  # e.g. too little disk (its message is above): this model's rows say so, the others go on
                print(f"[{model.key}] materialising failed (exit {code})", flush=True)
                results += [Result(model.key, mode, processes, None, status=f"failed: materialising (exit {code})")
                            for mode in args.modes]
                write_report(out_dir, results, device, shapes, tiny, digits)
                continue
            for mode in args.modes:
                key = f"{model.key}/{mode}"
                config = work / f"{model.key}-{mode}.yaml"
                config.write_text(yaml.safe_dump(run_config(model, mode, folder, processes, epochs, tiny),
                                                 sort_keys=False))
                opts = model.tiny_options if tiny else model.options
                size = "x".join(str(opts[k]) for k in ("num_frames", "height", "width") if k in opts)
                shapes[key] = (f"{size}, {model.sampler['steps']} steps (SDE window {model.sampler['sde_window_size']}),"
                               f" {model.prompts_per_process} prompt(s) x group {GROUP_SIZE} per process, "
                               f"{epochs} epochs, {'LoRA rank 32' if mode == 'lora' else 'full finetune'}, "
                               + (f"fsdp over {processes} processes" if processes > 1
                                  else "1 process (fsdp over one process shards nothing)"))
                result = Result(model.key, mode, processes, plan_gib(config, args.set, processes))
                results.append(result)
                skip = None if args.force else too_big(result.plan_gib, device.get("memory"))
                if skip:
                    result.status = skip
                    print(f"[{key}] {result.status}", flush=True)
                    continue
                run_dir = work / "runs" / f"{model.key}-{mode}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = out_dir / f"{model.key}-{mode}.log"
                print(f"[{key}] training over {processes} process(es), plan {result.plan_gib:.3f} GiB; log {log}",
                      flush=True)
                code = launch(config, args.set, run_dir, processes, tiny, log)
                if code:
                    text = log.read_text(errors="replace")
                    oom = "OutOfMemoryError" in text or "CUDA out of memory" in text
                    result.status = "out of memory" if oom else f"failed (exit {code}): {_tail(log)}"
                else:
                    measure(result, run_dir)
                print(f"[{key}] {result.status}: peak {_fmt(result.peak_gib, digits)} GiB, "
                      f"{_fmt(result.s_per_epoch, 2)} s/epoch", flush=True)
                write_report(out_dir, results, device, shapes, tiny, digits)  # a cut-short session keeps its rows
                if not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = write_report(out_dir, results, device, shapes, tiny, digits)
    print()
    print(print_table(rows))
    print(f"\nplan: `ff plan` per process, activations excluded; peak: max_memory_allocated, largest process; "
          f"s/epoch: mean without the first epoch.\nwritten: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return results


def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny random models: the tests' half.")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                   help=f"Default: all, in this order: {' '.join(MODELS)}.")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--processes", type=int, default=None, help="Default: every visible GPU (1 with --tiny: gloo CPU processes).")
    p.add_argument("--epochs", type=int, default=None, help="Default: 3 (2 with --tiny); the first is not timed.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="An override for every run and plan, as `ff run --set` (repeatable).")
    p.add_argument("--out", default=None, help="Report folder. Default: $OUT, else benchmarks/out/.")
    p.add_argument("--work", default=None, help="Folder for the materialised models and runs. Default: a temp dir.")
    p.add_argument("--keep", action="store_true", help="Keep the materialised models and run folders.")
    p.add_argument("--force", action="store_true", help="Launch runs whose plan exceeds the GPU's memory too.")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    """Entry point: the benchmark, or one of its worker processes."""
    if argv[:1] == ["--worker"]:
        {"materialise": _worker_materialise, "run": _worker_run}[argv[1]](argv[2:])
        return
    benchmark(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
