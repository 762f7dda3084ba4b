"""Loading a pipeline from disk prints nothing: diffusers' and transformers' progress bars and info logs
would interleave with `ff run`'s output."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog

from flowfactory_diffusers.policy import load_pipeline


def test_from_pretrained_prints_no_progress_bars(tiny_dir: Path, capfd) -> None:
    FluxPipeline.from_pretrained(tiny_dir)  # the loud baseline: diffusers draws its loading bar on stderr
    loud = capfd.readouterr()
    assert "Loading pipeline components" in loud.err
    before = (dlog.get_verbosity(), tlog.get_verbosity())
    pipe = load_pipeline(FluxPipeline, str(tiny_dir), None, {"default": torch.float32}, policy="flux",
                         example="black-forest-labs/FLUX.1-schnell")
    quiet = capfd.readouterr()
    assert (quiet.out, quiet.err) == ("", "")
    assert pipe.transformer.dtype == torch.float32
    # the libraries' own settings come back for whatever the user does next
    assert (dlog.get_verbosity(), tlog.get_verbosity()) == before
    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()
