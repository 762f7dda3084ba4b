"""Rollout store and replay: save an epoch's rollouts, and train later runs on them instead of sampling.

A run with `train.store_rollouts` writes, after each epoch's scoring and before its update, one safetensors
file per process under `<run>/rollouts/<epoch>/rows-<first>-<end>.safetensors` (global sample indexes
[first, end)). Nothing in it can run code: tensors, plus one JSON string in the safetensors metadata.

    tensors   trajectory.sigmas [S+1] f32, trajectory.stochastic [S] u8, trajectory.final [B, *latent],
              trajectory.latents [B, S+1, *latent] and trajectory.log_probs [B, S] f32 (when the algorithm
              kept them), media [B, C, H, W] or [B, T, C, H, W] (decoded samples, uint8 or float32),
              reward.<name> [B] f32 (each reward's scores)
    metadata  "flowfactory.rollouts": JSON {"format": 1, "epoch", "prompts" (texts), "keys", "group_ids",
              "rewards": [names], "media": "uint8" | "float32", and "records" (each row's prompt record:
              prompt, images, digests, targets, metadata; `Prompt.to_json`) when any row has more than text}

A run with `data.replay: <folder>` (another run's folder or its rollouts/ folder) reads epoch e's rows instead
of sampling epoch e: the prompts, trajectories and rewards come from the store (the rows of this process's
global range, whatever the process count that wrote them), and the update runs on them. Rewards are the
stored scores when the run's rewards are the stored ones, else the run's rewards score the stored media
(`data.replay_rescore: true` forces that). Replaying a run's own store with the same config reproduces its
weights exactly (tested); replaying it with another algorithm or other hyper-parameters compares them on
identical samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.types import Trajectory

FORMAT = 1
META_KEY = "flowfactory.rollouts"


@dataclass
class StoredRows:
    prompts: list[Prompt]
    keys: list[tuple[int, ...]]
    group_ids: list[int]
    trajectory: Trajectory
    media: torch.Tensor | None  # float32 in [0, 1]
    rewards: dict[str, torch.Tensor]  # name -> [B] float32


def epoch_dir(root: Path, epoch: int) -> Path:
    return root / f"{epoch:06d}"


def save_rows(root: Path, epoch: int, start: int, prompts: list[str | Prompt], keys: list[tuple[int, ...]],
              group_ids: list[int], trajectory: Trajectory, media: torch.Tensor | None,
              rewards: dict[str, torch.Tensor], media_format: str = "uint8") -> Path:
    """Write one process's rows [start, start + B) of `epoch`: a temporary file, flushed, then renamed."""
    from safetensors.torch import save_file

    n = len(prompts)
    records = as_prompts(prompts)
    tensors: dict[str, torch.Tensor] = {
        "trajectory.sigmas": trajectory.sigmas.detach().float().cpu(),
        "trajectory.stochastic": trajectory.stochastic.detach().to(torch.uint8).cpu(),
        "trajectory.final": trajectory.final.detach().cpu(),
    }
    if trajectory.latents is not None:
        tensors["trajectory.latents"] = trajectory.latents.detach().cpu()
    if trajectory.log_probs is not None:
        tensors["trajectory.log_probs"] = trajectory.log_probs.detach().float().cpu()
    if media is not None and media_format != "none":
        m = media.detach().float().clamp(0, 1).cpu()
        tensors["media"] = (m * 255).round().to(torch.uint8) if media_format == "uint8" else m
    for name, scores in rewards.items():
        tensors[f"reward.{name}"] = scores.detach().float().cpu()
    meta: dict[str, Any] = {"format": FORMAT, "epoch": epoch, "prompts": [r.text for r in records],
                            "keys": [list(k) for k in keys], "group_ids": [int(g) for g in group_ids],
                            "rewards": list(rewards), "media": media_format}
    if any(r.images or r.targets or r.metadata for r in records):
        meta["records"] = [r.to_json() for r in records]
    folder = epoch_dir(root, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rows-{start:08d}-{start + n:08d}.safetensors"
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={META_KEY: json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def find_store(path: str | Path) -> Path:
    """The rollouts folder of `path` (a run folder holding rollouts/, or a rollouts folder itself)."""
    p = Path(path)
    if (p / "rollouts").is_dir():
        p = p / "rollouts"
    if not p.is_dir() or not any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        raise FlowFactoryError(f"data.replay: {path} holds no stored rollouts (a run folder with a rollouts/ folder, "
                               f"written by a run with train.store_rollouts: true)")
    return p


def load_rows(root: Path, epoch: int, rows: range, device: Any = None) -> StoredRows:
    """The stored rows `rows` (global sample indexes) of `epoch`, from whichever files hold them."""
    from safetensors import safe_open

    folder = epoch_dir(root, epoch)
    if not folder.is_dir():
        raise FlowFactoryError(f"data.replay: {root} has no stored rollouts for epoch {epoch}; it holds epochs "
                               f"{', '.join(str(int(c.name)) for c in sorted(root.iterdir()) if c.name.isdigit())}. "
                               f"Lower train.epochs, or store more epochs")
    parts: list[tuple[int, int, Path]] = []
    for f in folder.glob("rows-*.safetensors"):
        _, a, b = f.stem.split("-")
        parts.append((int(a), int(b), f))
    parts.sort()
    chunks: list[dict[str, Any]] = []
    for a, b, f in parts:
        lo, hi = max(a, rows.start), min(b, rows.stop)
        if lo >= hi:
            continue
        with safe_open(str(f), framework="pt") as sf:
            meta = json.loads((sf.metadata() or {}).get(META_KEY, "null") or "null")
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise FlowFactoryError(f"data.replay: {f} is not a flowfactory rollout file (format {FORMAT})")
            sel = slice(lo - a, hi - a)
            tensors = {k: sf.get_slice(k)[sel] if k not in ("trajectory.sigmas", "trajectory.stochastic")
                       else sf.get_tensor(k) for k in sf.keys()}
        chunks.append({"meta": meta, "sel": sel, "tensors": tensors, "lo": lo, "hi": hi})
    covered = sum(c["hi"] - c["lo"] for c in chunks)
    if covered != len(rows):
        raise FlowFactoryError(f"data.replay: epoch {epoch} of {root} holds {covered} of the rows "
                               f"{rows.start}..{rows.stop - 1} this process trains on; replay with the "
                               f"prompts_per_epoch and group_size of the run that stored them")
    first = chunks[0]
    names = first["meta"]["rewards"]

    def cat(key: str) -> torch.Tensor | None:
        if key not in first["tensors"]:
            return None
        return torch.cat([c["tensors"][key] for c in chunks]).to(device)

    trajectory = Trajectory(sigmas=first["tensors"]["trajectory.sigmas"].to(device),
                            stochastic=first["tensors"]["trajectory.stochastic"].bool().to(device),
                            final=cat("trajectory.final"), latents=cat("trajectory.latents"),
                            log_probs=cat("trajectory.log_probs"))
    media = cat("media")
    if media is not None and media.dtype == torch.uint8:
        media = media.float() / 255
    pick = [(c["meta"], c["sel"]) for c in chunks]
    prompts = [Prompt.from_json(r) for meta, sel in pick
               for r in (meta["records"] if "records" in meta else [{"prompt": t} for t in meta["prompts"]])[sel]]
    keys = [tuple(k) for meta, sel in pick for k in meta["keys"][sel]]
    group_ids = [int(g) for meta, sel in pick for g in meta["group_ids"][sel]]
    rewards = {n: torch.cat([c["tensors"][f"reward.{n}"] for c in chunks]) for n in names}
    return StoredRows(prompts=prompts, keys=keys, group_ids=group_ids, trajectory=trajectory, media=media,
                      rewards=rewards)
