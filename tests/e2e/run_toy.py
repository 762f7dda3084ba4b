"""Run a config with the toy test policy registered: `python run_toy.py CONFIG OUT [--resume] [k=v ...]`.

Used by the end-to-end tests as a subprocess (kill -9, torchrun with 2 processes)."""

import os
import sys

from components import TestComponents  # tests/e2e/components.py, beside this script

import flowfactory.plugins as plugins
from flowfactory.testing import plugin as toy_plugin

plugins._STATE = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0"),
                                             (TestComponents(), "tests", "0")], strict=True)

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
