"""The README's install, from packages: `pip install flowfactory-cli flowfactory-flux flowfactory-grpo`.

The wheels and sdists of core, cli, diffusers (the policy base flux depends on), flux and grpo are built with
`python -m build` (sdist, then the wheel from
the sdist, so a file the sdist misses is missing from the wheel too) from copies of the package folders, so the
checkout's egg-info, which the editable installs read, is never rewritten. Then:

- every file of each package's source folder is in its wheel and sdist (templates, prompt sets, py.typed);
- the wheels install with pip into a clean virtual environment, `--find-links` the build folder and
  `torch==2.13.0` pinned (the CPU wheel), and there `ff --version`, `ff list` and a 2-epoch quickstart work.

The third-party dependencies come from the package indexes, resolved by pip for the built wheels, but
installing them (torch, transformers, diffusers, ...) takes 1-2.5 minutes on a 2-core CPU. So they are installed
once into a dependency layer, cached under ~/.cache/flowfactory/wheel-test-deps/<hash of the wheels'
requirements>: the wheels are installed there, then our five packages uninstalled, which leaves exactly what pip
resolved for them and nothing of ours. Each test run makes a new, empty venv whose .pth adds that layer's
site-packages, and installs our wheels into it with the same pip command; pip finds the dependencies satisfied.
(`venv --system-site-packages` cannot do this: it exposes the base interpreter's site-packages, never another
venv's.) A change to any package's dependencies changes the hash, and the layer is rebuilt.

`nox -s wheels` runs this file alone (--noconftest: it needs only pytest and build).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU build in /opt/wheels; any other spec pulls a multi-GB CUDA build
# distribution name -> (source folder, import package)
PACKAGES = {
    "flowfactory": ("core", "flowfactory"),
    "flowfactory-cli": ("cli", "flowfactory_cli"),
    "flowfactory-diffusers": ("plugins/flowfactory-diffusers", "flowfactory_diffusers"),
    "flowfactory-flux": ("plugins/flowfactory-flux", "flowfactory_flux"),
    "flowfactory-grpo": ("plugins/flowfactory-grpo", "flowfactory_grpo"),
}
INSTALL = ["flowfactory-cli", "flowfactory-flux", "flowfactory-grpo"]  # the README's pip install line
OURS = re.compile(r"^flowfactory([-_].*)?$", re.IGNORECASE)
SKIP = shutil.ignore_patterns("*.egg-info", "__pycache__", "*.pyc", "build", "dist")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowfactory" / "wheel-test-deps"


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _version(pyproject: Path) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    assert m, pyproject
    return m.group(1)


def _package_files(src: Path) -> set[str]:
    """Files under src/<package>/ as wheel paths, without bytecode."""
    return {p.relative_to(src).as_posix() for p in src.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("`build` is missing: pip install -r requirements.txt")
    tmp = tmp_path_factory.mktemp("wheels")
    out = tmp / "dist"
    for dist_name, (folder, _) in PACKAGES.items():
        copy = tmp / "src" / dist_name
        shutil.copytree(ROOT / folder, copy, ignore=SKIP)
        # --no-isolation: the build requirement (setuptools) is requirements.txt's; an isolated build
        # environment per package costs ~10 s each
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(copy)], timeout=300)
    return out


def test_wheels_and_sdists_hold_every_package_file(dist: Path) -> None:
    for dist_name, (folder, package) in PACKAGES.items():
        version = _version(ROOT / folder / "pyproject.toml")
        stem = f"{dist_name.replace('-', '_')}-{version}"
        wheel, sdist = dist / f"{stem}-py3-none-any.whl", dist / f"{stem}.tar.gz"
        assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())
        expected = {f"{package}/{f}" for f in _package_files(ROOT / folder / "src" / package)}
        assert any(f.endswith("py.typed") for f in expected) or package != "flowfactory"
        with zipfile.ZipFile(wheel) as z:
            in_wheel = {n for n in z.namelist() if not n.startswith(f"{stem}.dist-info/")}
            meta = z.read(f"{stem}.dist-info/METADATA").decode()
        assert in_wheel == expected, (dist_name, sorted(expected - in_wheel), sorted(in_wheel - expected))
        with tarfile.open(sdist) as t:
            in_sdist = {n.split("/src/", 1)[1] for n in t.getnames() if f"/src/{package}/" in n}
        in_sdist = {n for n in in_sdist if not n.endswith("/")}
        assert expected <= in_sdist, (dist_name, sorted(expected - in_sdist))
        assert f"Version: {version}" in meta


def _requirements(dist: Path) -> list[str]:
    reqs = []
    for wheel in sorted(dist.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs += [line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
    return sorted(reqs)


def _pip(python: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """The test runner's pip, acting on `python`'s environment (pip --python): the venvs need no pip of their own."""
    return _run([sys.executable, "-m", "pip", "--python", str(python), *args], timeout=timeout)


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _dependency_layer(dist: Path) -> Path:
    """site-packages holding the third-party dependencies pip resolves for our wheels (and none of ours)."""
    key = hashlib.sha256("\n".join([sys.version, TORCH, *_requirements(dist)]).encode()).hexdigest()[:16]
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    layer = root / key
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building the same layer
        if not (layer / "complete").exists():
            tmp = root / f"{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], timeout=120)
            python = tmp / "bin" / "python"
            _pip(python, "install", "--no-compile", "--find-links", str(dist), TORCH, *INSTALL, timeout=900)
            _pip(python, "uninstall", "-y", *PACKAGES, timeout=120)
            left = [p.name for p in _site_packages(tmp).iterdir() if OURS.match(p.name.split("-")[0])]
            assert not left, f"flowfactory files left in the dependency layer: {left}"
            shutil.rmtree(layer, ignore_errors=True)
            tmp.rename(layer)  # the layer is only ever read as a site-packages folder, so it may move
            (layer / "complete").write_text(json.dumps(_requirements(dist), indent=1))
            for old in root.iterdir():  # one layer per requirements: drop those of older ones
                if old.is_dir() and old != layer:
                    shutil.rmtree(old, ignore_errors=True)
    return _site_packages(layer)


def test_readme_install_from_wheels_runs(dist: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    deps = _dependency_layer(dist)
    layer_s = time.monotonic() - start

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    (_site_packages(venv) / "_flowfactory_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    python, bindir = venv / "bin" / "python", venv / "bin"
    _pip(python, "install", "--no-compile", "--find-links", str(dist), TORCH, *INSTALL, timeout=600)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {"PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}", "FLOWFACTORY_STRICT_PLUGINS": "1",
            "OMP_NUM_THREADS": "1",  # a shared 2-core machine: torch's spinning threads slow a loaded CPU 10x
            "COLUMNS": "200", "NO_COLOR": "1"}

    # our packages come from the wheels, installed in the new venv (not from the checkout)
    where = _run([str(python), "-c", "import json, importlib; print(json.dumps({p: importlib.import_module(p).__file__ "
                  f"for p in {[p for _, p in PACKAGES.values()]!r}}}))"], timeout=120, env=env, cwd=tmp_path)
    for package, file in json.loads(where.stdout).items():
        assert Path(file).is_relative_to(_site_packages(venv)), (package, file)

    # ff --version: flowfactory, the CLI, each installed plugin package and library (only ours), torch and diffusers
    versions = _run([str(bindir / "ff"), "--version"], timeout=120, env=env, cwd=tmp_path).stdout
    rows = dict(line.split(None, 1) for line in versions.strip().splitlines())
    diffusers = _run([str(python), "-c", "import importlib.metadata as m; print(m.version('diffusers'))"],
                     timeout=60, env=env).stdout.strip()
    # flowfactory-diffusers has no entry point; it is listed as a package that depends on flowfactory
    expected = {name: _version(ROOT / folder / "pyproject.toml") for name, (folder, _) in PACKAGES.items()}
    assert rows == expected | {"torch": "2.13.0+cpu", "diffusers": diffusers}, versions

    listed = json.loads(_run([str(bindir / "ff"), "list", "--json"], timeout=120, env=env, cwd=tmp_path).stdout)
    components = {(c["kind"], c["name"]): c["package"] for c in listed}
    assert components[("policy", "flux")] == "flowfactory-flux"
    assert components[("optimizer", "grpo")] == "flowfactory-grpo"
    assert components[("reward", "colour-match")] == "flowfactory"
    assert set(components.values()) == {"flowfactory", "flowfactory-flux", "flowfactory-grpo"}

    out = tmp_path / "run"
    run_start = time.monotonic()
    _run([str(bindir / "ff"), "run", str(ROOT / "examples" / "quickstart.yaml"), "--output", str(out),
          "--set", "train.epochs=2", "--set", "train.eval_every=0", "--set", "train.sample_every=0",
          "--set", "train.checkpoint_every=0", "--set", "train.prompts_per_epoch=2", "--set", "train.group_size=2",
          "--set", "train.rollout_batch_size=4", "--set", "train.micro_batch_size=4"],
         timeout=600, env=env, cwd=tmp_path)
    rows_run = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows_run] == [1, 2]
    assert (out / "final").is_dir() and not (out / "checkpoints").exists() and not (out / "samples").exists()
    print(f"dependency layer {layer_s:.0f} s, venv + install + ff --version/list {run_start - start - layer_s:.0f} s, "
          f"2-epoch run {time.monotonic() - run_start:.0f} s")
