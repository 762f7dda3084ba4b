"""The real `ff` command line with one more reward installed, `group-centred` (groupwise: each image's brightness
minus its group's mean brightness, so a group split across requests would change its scores). Run as
`python ff_remote_extra.py reward serve --reward group-centred ...`; it registers the reward beside every
installed plugin, then runs `flowfactory_cli.main.main`, exactly what the `ff` console script runs."""

import sys

import flowfactory.plugins as plugins
from flowfactory import hookimpl


class GroupCentred:
    groupwise = True
    handles_video = False

    def score(self, samples):
        import torch

        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        bright = (samples.images[:, :3] * luma).sum(1).mean(dim=(1, 2))
        ids = torch.tensor(samples.group_ids)
        out = torch.empty_like(bright)
        for g in ids.unique():
            rows = ids == g
            out[rows] = bright[rows] - bright[rows].mean()
        return out.float()


class ExtraRewards:
    @hookimpl
    def register_rewards(self, register):
        register("group-centred", lambda options, ctx: GroupCentred(), summary="Brightness minus its group's mean.")


if __name__ == "__main__":
    plugins._STATE = plugins.load(extra_plugins=[(ExtraRewards(), "tests", "0")], strict=True)

    from flowfactory_cli.main import main

    main(sys.argv[1:])
