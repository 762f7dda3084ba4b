"""Test components the end-to-end runners (run_toy.py, ff_toy.py) register beside the toy policy: a reward that
fails on one process, a groupwise reward that records what each call receives, and an algorithm whose loss goes
NaN, each on demand through an environment variable."""

import json
import os

from flowfactory import hookimpl
from flowfactory.types import OptimizerHooks


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


class GroupRecorder:
    """A groupwise reward (each image's brightness minus its group's mean brightness) that appends every call's
    process and group ids to the JSON-lines file FLOWFACTORY_TEST_RECORD, if set."""

    groupwise = True
    handles_video = False

    def score(self, samples):
        import torch

        record = os.environ.get("FLOWFACTORY_TEST_RECORD")
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "groups": samples.group_ids}) + "\n")
        b = samples.images.mean(dim=(1, 2, 3))
        ids = torch.tensor(samples.group_ids)
        means = torch.stack([b[ids == g].mean() for g in samples.group_ids])
        return (b - means).float()


class NanPG(OptimizerHooks):
    """REINFORCE on the stored log-probs whose loss is NaN in one epoch (and on one process) when
    FLOWFACTORY_TEST_NAN="EPOCH" or "EPOCH:RANK" is set: a loss that blows up, as a bad batch does."""

    def __init__(self) -> None:
        from flowfactory.types import Requirements

        self.requirements = Requirements(keep="steps", stochastic=True, reference=False)
        spec = os.environ.get("FLOWFACTORY_TEST_NAN", "")
        epoch, _, rank = spec.partition(":")
        self.epoch, self.rank = (int(epoch) if epoch else -1), (int(rank) if rank else None)

    def setup(self, policy, sampler):
        return None

    def units(self, batch):
        return batch.trajectory.stochastic_steps()

    def loss(self, policy, sampler, batch, unit):
        from flowfactory.types import LossOutput

        lp = sampler.log_prob(policy, batch.trajectory, unit, batch.cond).log_prob
        loss = -batch.advantages * lp
        here = self.rank is None or int(os.environ.get("RANK", "0")) == self.rank
        if here and batch.row_keys()[0][0] == self.epoch:
            loss = loss * float("nan")
        return LossOutput(loss=loss)


class TestComponents:
    """The inline plugin that registers them."""

    @hookimpl
    def register_rewards(self, register):
        register("flaky-on-one-process", lambda options, ctx: FlakyOnOneProcess(),
                 summary="Test reward: brightness that fails on one process.")
        register("group-recorder", lambda options, ctx: GroupRecorder(),
                 summary="Test reward: groupwise, records the group ids of every call.")

    @hookimpl
    def register_optimizers(self, register):
        register("nan-pg", lambda options, ctx: NanPG(), summary="Test: REINFORCE whose loss goes NaN on demand.")
