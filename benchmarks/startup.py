"""Start-up time of `ff` with every installed plugin: wall clock of `ff --help` and `ff list`, each run as a
fresh process, as a user's shell would.

    python benchmarks/startup.py              # 5 runs each (after one warm-up run), medians
    python benchmarks/startup.py --runs 9

Prints the plugin packages found (their entry points are all loaded by both commands), then per command the
median and the spread of the runs, in seconds, and whether the process imported a heavy package (torch,
diffusers, transformers, accelerate), which would dominate the time. A plain `python -c pass` is measured too,
as the floor no command can beat.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# Runs `ff` in-process (as the console script does), then reports which heavy packages got imported.
FF = """
import sys
from flowfactory_cli.main import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = [m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules]
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - start


def heavy_imports(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-c", FF.format(args=args)], capture_output=True, text=True, check=True)
    return next((line[6:] for line in proc.stderr.splitlines() if line.startswith("HEAVY=")), "") or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    packages = sorted({ep.dist.metadata["Name"] for ep in metadata.entry_points(group="flowfactory") if ep.dist})
    print(f"plugin packages ({len(packages)}): {', '.join(packages)}")
    print(f"python {sys.version.split()[0]}, {args.runs} runs each after one warm-up, wall clock in seconds")
    ff = shutil.which("ff", path=str(Path(sys.executable).parent)) or shutil.which("ff")
    if ff is None:
        raise SystemExit("no `ff` console script next to this python: pip install -e cli")
    cases = [("python -c pass", [sys.executable, "-c", "pass"], None), ("ff --help", [ff, "--help"], ["--help"]),
             ("ff list", [ff, "list"], ["list"])]
    print(f"{'command':<16} {'median':>7} {'min':>7} {'max':>7}  heavy imports")
    for label, command, ff_args in cases:
        timed(command)  # warm-up: file system caches, .pyc files
        times = [timed(command) for _ in range(args.runs)]
        heavy = heavy_imports(ff_args) if ff_args else "none"
        print(f"{label:<16} {statistics.median(times):7.3f} {min(times):7.3f} {max(times):7.3f}  {heavy}")


if __name__ == "__main__":
    main()
