"""Checkpoints: named training state written by every process, atomically, and loaded without pickle.

Layout of `checkpoints/<epoch>/`:
- `tensors/*.safetensors`: every tensor of the state (trained parameters by name, optimizer state, EMA,
  the algorithm's tensors), written through `torch.distributed.checkpoint` in the safetensors format by
  every process: a sharded (FSDP2) tensor is saved as each process holds it, never gathered on one, and a
  replicated one once. Loading re-shards, so a checkpoint written by N processes resumes on M.
- `trainer.json`: the epoch, the run name, the rest of the state as JSON (tensors stand in as
  `{"__tensor__": name}`), each tensor's shape and dtype, and each file's size.

Nothing is unpickled: safetensors and JSON cannot carry code, and a checkpoint holding a pickle file (an
older flowfactory's `state.pt`, or anything else) is refused. A checkpoint is written into
`checkpoints/.tmp-<epoch>`, its files and folder flushed to disk, then renamed to `checkpoints/<epoch>`, so
a crash mid-write leaves the previous checkpoint intact; a checkpoint whose files do not match the sizes
recorded at write is skipped, with a message, in favour of the newest intact one. A write that fails (a full
disk, a refused permission) removes the partial folder and raises one message on every process, so the
previous checkpoint stays the newest and `--resume` starts from it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from flowfactory.errors import FlowFactoryError
from flowfactory.train.runfolder import write_fix
from flowfactory.train.state import flatten, unflatten

META = "trainer.json"
TENSORS = "tensors"
FORMAT = 2
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".metadata")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                     torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: Path, epoch: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write `state` (nested dicts of tensors and JSON values) as checkpoint `epoch`; every process calls it.
    A failed write (full disk, permissions) removes the partial folder and raises a FlowFactoryError on every
    process: the previous checkpoint stays the newest, and `--resume` starts from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    d = _dist()
    main = d is None or d.get_rank() == 0
    final = root / f"{epoch:06d}"
    tmp = root / f".tmp-{epoch:06d}"
    tree, tensors = flatten(state)
    error: BaseException | None = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / TENSORS).mkdir(parents=True)
        except OSError as exc:
            error = exc
    _together(error, root, epoch, tmp)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({k: v.detach() for k, v in tensors.items()},
                     storage_writer=HuggingFaceStorageWriter(str(tmp / TENSORS), save_distributed=True),
                     no_dist=d is None)
    except (Exception, dcp.CheckpointException) as exc:  # a BaseException; raised on every process when any failed
        error = exc
    if error is not None:
        _failed(_message(error, root, epoch), error, tmp)
    _barrier()
    if main:
        try:
            files = {}
            for f in sorted((tmp / TENSORS).iterdir()):
                _fsync(f)
                files[f"{TENSORS}/{f.name}"] = f.stat().st_size
            _fsync(tmp / TENSORS)
            info = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for name, t in tensors.items()}
            body = {"format": FORMAT, "epoch": epoch, **meta, "files": files, "tensors": info, "state": tree}
            with open(tmp / META, "w") as f:
                f.write(json.dumps(body, indent=1))
                f.flush()
                os.fsync(f.fileno())
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(root)
        except OSError as exc:
            error = exc
    _together(error, root, epoch, tmp)
    if main:
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _together(error: BaseException | None, root: Path, epoch: int, tmp: Path) -> None:
    """After a step only the main process did: every process learns whether it failed, and all raise."""
    d = _dist()
    text = None if error is None else _message(error, root, epoch)
    if d is not None:
        box = [text]
        d.broadcast_object_list(box, src=0)
        text = box[0]
    if text is not None:
        _failed(text, error, tmp)


def _failed(text: str, error: BaseException | None, tmp: Path) -> None:
    """Remove the partial checkpoint (main process) and raise the failure's message."""
    d = _dist()
    if d is None or d.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise FlowFactoryError(text) from error


def _message(error: BaseException, root: Path, epoch: int) -> str:
    """What failed, that nothing was lost, and what to do."""
    exc = _os_error(error)
    if exc is not None:
        reason = (exc.strerror or type(exc).__name__) + (f" ({exc.filename})" if exc.filename else "")
        fix = write_fix(exc, root)
    else:
        reason, fix = f"{type(error).__name__}: {error}", "Fix the cause"
    previous = [p.name for p in complete(root) if int(p.name) < epoch]
    kept = (f"checkpoint {previous[-1]} is intact and stays the newest" if previous
            else "no earlier checkpoint exists, so --resume starts from epoch 1")
    return (f"writing checkpoint {epoch:06d} in {root} failed: {reason}. Nothing was lost: the partial checkpoint "
            f"was removed and {kept}. {fix}, then continue the run with --resume.")


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failure (dcp wraps each process's exception in a CheckpointException)."""
    if isinstance(error, OSError):
        return error
    for failure in getattr(error, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, OSError):
            return exc
    return None


def complete(root: Path) -> list[Path]:
    """Checkpoint folders with their metadata written, oldest first (not yet verified: see `problem`)."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / META).is_file()]
    return sorted(dirs, key=lambda d: int(d.name))


def refuse_pickles(path: Path) -> None:
    """Raise if the checkpoint folder holds a file that would need unpickling (which can run any code)."""
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if found:
        raise FlowFactoryError(
            f"{path}: holds {found[0].name}, a pickled file; flowfactory never unpickles checkpoints (loading a "
            f"pickle runs whatever code it names, so a shared checkpoint could run someone else's code). This "
            f"checkpoint is from an older flowfactory or was altered: start a new run with another --output, or "
            f"delete {path} to resume from an older checkpoint.")


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's trainer.json, after refusing pickles and checking the format."""
    refuse_pickles(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as exc:
        raise FlowFactoryError(f"{path / META}: unreadable ({exc}); delete {path} to resume from an older "
                               f"checkpoint") from exc
    if meta.get("format") != FORMAT:
        raise FlowFactoryError(f"{path}: checkpoint format {meta.get('format')!r}, this flowfactory reads format "
                               f"{FORMAT}; resume it with the flowfactory version that wrote it")
    return meta


def problem(path: Path) -> str | None:
    """Why the checkpoint cannot be trusted (missing or resized files, unreadable metadata), or None."""
    try:
        meta = read_meta(path)
    except FlowFactoryError as exc:
        return str(exc)
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} were written"
    return None


def latest(root: Path, notes: list[str] | None = None) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is skipped with a note in `notes`. A checkpoint
    holding a pickle is not skipped but refused: someone put it there, and the user must decide."""
    for path in reversed(complete(root)):
        refuse_pickles(path)
        why = problem(path)
        if why is None:
            return path
        if notes is not None:
            notes.append(f"skipped damaged checkpoint {path.name}: {why}")
    return None


def shapes(meta: dict[str, Any], prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name below `prefix`: (shape, dtype)} of the checkpoint's tensors."""
    out = {}
    for name, info in meta["tensors"].items():
        if name.startswith(prefix):
            out[name[len(prefix):]] = (tuple(info["shape"]), DTYPES[info["dtype"]])
    return out


def load(path: Path, live: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of checkpoint `path`. Tensors are loaded in place into `live`'s tensors of the same name,
    shape and dtype (so sharded parameters receive their own shard); others come back as new CPU tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = read_meta(path)
    _, live_tensors = flatten(live)
    targets: dict[str, torch.Tensor] = {}
    for name, info in meta["tensors"].items():
        shape, dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
        t = live_tensors.get(name)
        if t is not None and tuple(t.shape) == shape and t.dtype == dtype:
            targets[name] = t.detach()
        else:
            targets[name] = torch.empty(shape, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(path / TENSORS)), no_dist=_dist() is None)
        except Exception as exc:
            raise FlowFactoryError(f"{path}: cannot read its tensors ({type(exc).__name__}: {exc}); delete it to "
                                   f"resume from an older checkpoint") from exc
    return unflatten(meta["state"], targets), meta
