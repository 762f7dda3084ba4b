"""Run a config with the toy test policy registered: `python run_toy.py CONFIG OUT [--resume] [k=v ...]`.

Used by the end-to-end tests as a subprocess (kill -9, torchrun with 2 processes)."""

import os
import sys

import flowfactory.plugins as plugins
from flowfactory import hookimpl
from flowfactory.testing import plugin as toy_plugin


class FlakyOnOneProcess:
    """Brightness, but raises on process R at its Nth call when FLOWFACTORY_TEST_FAIL="R:N" is set."""

    groupwise = False
    handles_video = False

    def __init__(self) -> None:
        self.calls = 0
        spec = os.environ.get("FLOWFACTORY_TEST_FAIL")
        self.rank, self.at = (int(v) for v in spec.split(":")) if spec else (-1, 0)

    def score(self, samples):
        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.rank and self.calls >= self.at:
            raise ConnectionError("judge unreachable from this process")
        return samples.images.mean(dim=(1, 2, 3))


class TestRewards:
    @hookimpl
    def register_rewards(self, register):
        register("flaky-on-one-process", lambda options, ctx: FlakyOnOneProcess(),
                 summary="Test reward: brightness that fails on one process.")


plugins._STATE = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0"),
                                             (TestRewards(), "tests", "0")], strict=True)

from flowfactory.config import load  # noqa: E402
from flowfactory.train import run  # noqa: E402

args = sys.argv[1:]
cfg, options = load(args[0], [a for a in args[2:] if a != "--resume"])
run(cfg, options, output_dir=args[1], resume="--resume" in args, show_progress=False)
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
