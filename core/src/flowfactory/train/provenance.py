"""<run>/provenance.json: what produced a run, so it can be told apart from others and reproduced.

Written by the main process at set-up: the resolved config, every installed flowfactory package with its version
(the core, the CLI and each distribution with a `flowfactory` entry point), the git commit of the project's
checkout (and whether it had uncommitted changes) when flowfactory runs from one, the versions of the libraries a
run depends on, Python, the devices and the process count. A `--resume` keeps the first record and appends its own
to `resumes`, so a run continued under other versions says so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from flowfactory.plugins import ENTRY_POINT_GROUP
from flowfactory.train.runfolder import write_error

FILE = "provenance.json"
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "pydantic", "pluggy")


def flowfactory_packages() -> dict[str, str]:
    """{distribution name: version} of flowfactory, flowfactory-cli and every distribution with an entry point in the
    `flowfactory` group, sorted by name."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        if name in ("flowfactory", "flowfactory-cli") or any(ep.group == ENTRY_POINT_GROUP for ep in dist.entry_points):
            found[name] = dist.version
    return dict(sorted(found.items()))


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """{name: installed version, or None when not installed}."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: Path) -> dict[str, Any] | None:
    """{"commit", "dirty", "root"} of the git checkout holding `path`; `dirty`: tracked files differ from the
    commit. None when `path` is in no checkout or git is not installed."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "root": root}


def project_git() -> dict[str, Any] | None:
    """The checkout flowfactory itself runs from (an editable install), if any."""
    import flowfactory

    return git_state(Path(flowfactory.__file__).resolve().parent)


def devices(accelerator: Any) -> dict[str, Any]:
    """The processes and devices of the launch, as the main process sees them."""
    import torch

    cuda = torch.cuda.is_available()
    return {"processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cuda_version": torch.version.cuda, "hostname": platform.node()}


def record(config: dict[str, Any], accelerator: Any) -> dict[str, Any]:
    """One set-up's provenance."""
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv, "cwd": os.getcwd(),
            "packages": flowfactory_packages(), "git": project_git(), "libraries": library_versions(),
            "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                       "executable": sys.executable, "platform": platform.platform()},
            "devices": devices(accelerator), "config": config}


def write(out: Path, config: dict[str, Any], accelerator: Any, resumed_from: int | None = None) -> dict[str, Any]:
    """Write <out>/provenance.json (through a temporary file renamed into place). A resume (`resumed_from`: the
    checkpoint's epoch, 0 for none) of a run that has one appends its record to `resumes`."""
    path = out / FILE
    new = record(config, accelerator)
    data = new
    if resumed_from is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            data.setdefault("resumes", []).append({"from_epoch": resumed_from, **new})
        except (OSError, ValueError):
            data = new  # unreadable: this set-up's record replaces it
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(exc, path) from exc
    return data
