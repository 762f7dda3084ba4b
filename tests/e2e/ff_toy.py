"""The real `ff` command line with the toy test policy installed: `python ff_toy.py run CONFIG --output DIR ...`.

`ff` only knows installed plugins; this registers the toy policy as the process-wide plugin state and then
runs `flowfactory_cli.main.main`, exactly what the `ff` console script runs, so tests see its exit codes and
messages. Under `torch.distributed.run` each process runs it, as each runs `ff` under a multi-process launch.

FLOWFACTORY_TEST_DISK_FULL_FROM=N makes the disk "full" for checkpoints from the N-th checkpoint written by
this process on: each tensor file gets half of its first write, then the write fails with ENOSPC, as on a
full disk. With N:fsync, flushing the written files to disk fails with ENOSPC instead (as it can on network
and delayed-allocation file systems); the main process alone does that step. Writing anything else works.
"""

import errno
import os
import sys
from contextlib import contextmanager

from components import TestComponents  # tests/e2e/components.py, beside this script

import flowfactory.plugins as plugins
from flowfactory.testing import plugin as toy_plugin

plugins._STATE = plugins.load(extra_plugins=[(toy_plugin, "flowfactory-testing", "0"),
                                             (TestComponents(), "tests", "0")], strict=True)


class _FullDisk:
    """A binary stream that takes half of the first write, then reports a full disk."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        view = memoryview(data).cast("B")
        self._stream.write(view[: len(view) // 2])
        self._stream.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _fill_the_disk_from(first: int, at: str) -> None:
    from torch.distributed.checkpoint import filesystem

    from flowfactory.train import checkpoint

    real_save, real_stream, real_fsync = checkpoint.save, filesystem.FileSystem.create_stream, checkpoint._fsync
    saves = [0]

    @contextmanager
    def create_stream(self, path, mode):
        with real_stream(self, path, mode) as stream:
            yield _FullDisk(stream) if "w" in mode and saves[0] >= first else stream

    def fsync(path):
        if saves[0] >= first:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_fsync(path)

    def save(*args, **kwargs):
        saves[0] += 1
        return real_save(*args, **kwargs)

    checkpoint.save = save
    if at == "fsync":
        checkpoint._fsync = fsync
    else:
        filesystem.FileSystem.create_stream = create_stream


if os.environ.get("FLOWFACTORY_TEST_DISK_FULL_FROM"):
    first, _, at = os.environ["FLOWFACTORY_TEST_DISK_FULL_FROM"].partition(":")
    _fill_the_disk_from(int(first), at or "write")

from flowfactory_cli.main import main  # noqa: E402

try:
    main(sys.argv[1:])
finally:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
