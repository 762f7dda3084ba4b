"""The `remote` reward against live `ff reward serve` servers: equal to the local reward (exactly on the uint8 grid,
within the quantisation bound elsewhere), whole groups per request for a groupwise reward, and every failure a
message naming the URL, at build or when scoring."""

from __future__ import annotations

import math
import time

import pytest
import torch
from ff_remote_extra import GroupCentred
from remote_constants import TOKEN_ENV
from test_reward_server import PROMPTS, grid_images

from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.registry import BuildContext
from flowfactory.rewards.builtin import Brightness, ColourMatch
from flowfactory.testing import RewardContract
from flowfactory.types import Samples
from flowfactory_rewards_remote.remote import plan_requests


def build(registry, **options):
    return registry.get("reward", "remote").create(options, BuildContext())


def samples(images: torch.Tensor, group: int = 1) -> Samples:
    n = images.shape[0]
    return Samples(prompts=[PROMPTS[(i // group) % len(PROMPTS)] for i in range(n)], images=images,
                   group_ids=[i // group for i in range(n)])


def test_scores_through_the_server_equal_the_local_reward(registry, colour_server, token_env):
    remote = build(registry, url=colour_server.url, reward="colour-match", token_env=token_env, batch_size=4,
                   max_concurrency=3)
    assert (type(remote).groupwise, type(remote).handles_video) == (False, False)
    batch = samples(grid_images(22, seed=11))  # 6 requests of up to 4 images, 3 in flight
    scores = remote.score(batch)
    expected = ColourMatch(tolerance=0.5).score(batch)
    assert scores.dtype == torch.float32 and scores.shape == (22,)
    print(f"colour-match via remote, uint8-grid images: max diff {float((scores - expected).abs().max()):.3g}")
    assert torch.equal(scores, expected)


def test_off_grid_images_differ_only_by_uint8_quantisation(registry, brightness_server, colour_server, token_env):
    """Images not on the uint8 grid move by at most 0.5/255 per channel on the wire. Brightness is a weighted
    mean with weights summing to 1, so its scores move by at most 0.5/255; colour-match's per-pixel term
    exp(-ln2 d^2 / t^2) has slope at most sqrt(2 ln2) exp(-1/2) / t in d, and d moves by at most sqrt(3) 0.5/255."""
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    batch = samples(images)
    bright = build(registry, url=brightness_server.url, reward="brightness").score(batch)
    gap_b = float((bright - Brightness().score(batch)).abs().max())
    colour = build(registry, url=colour_server.url, reward="colour-match", token_env=token_env).score(batch)
    gap_c = float((colour - ColourMatch(tolerance=0.5).score(batch)).abs().max())
    bound_b = 0.5 / 255
    bound_c = math.sqrt(2 * math.log(2)) * math.exp(-0.5) / 0.5 * math.sqrt(3) * 0.5 / 255
    print(f"off-grid max diff: brightness {gap_b:.3g} (bound {bound_b:.3g}), colour-match {gap_c:.3g} "
          f"(bound {bound_c:.3g})")
    assert 0 < gap_b <= bound_b + 1e-7 and gap_c <= bound_c + 1e-7


def test_a_groupwise_reward_gets_whole_groups_in_each_request(registry, group_server):
    remote = build(registry, url=group_server.url, reward="group-centred", batch_size=3, max_concurrency=4)
    assert type(remote).groupwise is True
    batch = samples(grid_images(12, seed=2), group=4)  # groups of 4 > batch_size 3: each group alone, whole
    expected = GroupCentred().score(batch)
    assert torch.allclose(remote.score(batch), expected, atol=1e-7)
    # Shuffled rows: a group's rows are gathered from wherever they are, and scores go back to their rows.
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = Samples(prompts=[batch.prompts[i] for i in perm], images=batch.images[perm],
                       group_ids=[batch.group_ids[i] for i in perm])
    assert torch.allclose(remote.score(shuffled), expected[perm], atol=1e-7)


def test_plan_requests_keeps_groups_whole():
    assert plan_requests(5, [], 2, groupwise=False) == [[0, 1], [2, 3], [4]]
    assert plan_requests(6, [0, 0, 1, 1, 2, 2], 4, groupwise=True) == [[0, 1, 2, 3], [4, 5]]
    assert plan_requests(6, [0, 1, 0, 1, 2, 2], 3, groupwise=True) == [[0, 2], [1, 3], [4, 5]]
    assert plan_requests(5, [7, 7, 7, 7, 8], 2, groupwise=True) == [[0, 1, 2, 3], [4]]  # a big group alone


def test_a_wrong_reward_name_fails_at_build_naming_both(registry, brightness_server):
    with pytest.raises(FlowFactoryError, match=rf"the server at {brightness_server.url} serves 'brightness', not "
                                               r"'colour-match' \(option reward\)"):
        build(registry, url=brightness_server.url, reward="colour-match")


def test_token_problems_fail_at_build(registry, colour_server, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(FlowFactoryError, match=rf"option token_env names the environment variable {TOKEN_ENV}"):
        build(registry, url=colour_server.url, reward="colour-match", token_env=TOKEN_ENV)
    with pytest.raises(RewardError, match=rf"GET {colour_server.url}/rewards failed: HTTP 401"):
        build(registry, url=colour_server.url, reward="colour-match")  # no token sent


def test_an_unreachable_server_fails_after_its_retries_naming_the_url(registry, brightness_server):
    from remote_serving import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"GET {dead}/rewards failed after 3 attempts: ConnectionError"):
        build(registry, url=dead, reward="brightness", retries=2, backoff=0.1)
    assert 0.3 <= time.perf_counter() - t0 < 10  # waited 0.1 + 0.2 s between attempts
    remote = build(registry, url=brightness_server.url, reward="brightness", retries=1, backoff=0.05)
    remote.url = f"{dead}/score"  # the server went away after the run started
    with pytest.raises(RewardError, match=rf"POST {dead}/score failed after 2 attempts: .*no weights were changed"):
        remote.score(samples(grid_images(2)))


def test_the_servers_error_is_quoted_after_the_retries(registry, colour_server, token_env):
    remote = build(registry, url=colour_server.url, reward="colour-match", token_env=token_env, retries=1, backoff=0)
    batch = Samples(prompts=["a square"], images=grid_images(1))
    with pytest.raises(RewardError, match=r"failed after 2 attempts: HTTP 500: RewardError: colour-match: the prompt "
                                          r"'a square' names no colour"):
        remote.score(batch)


class TestRemoteContract(RewardContract):
    """The RewardContract suite for `remote`, against a live brightness server."""

    component = "remote"

    @pytest.fixture(scope="class")
    @classmethod
    def reward(cls, registry, brightness_server):
        return registry.get("reward", "remote").create({"url": brightness_server.url, "reward": "brightness"},
                                                       cls.context())
