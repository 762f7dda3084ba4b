"""flowfactory's Policy contract suite on the wan policy: LoRA, full finetune, CFG, and two experts."""

from __future__ import annotations

import torch

from flowfactory.testing import PolicyContract, override_contract
from flowfactory.types import Conditioning, Policy


class TestWanLoraContract(PolicyContract):
    component = "wan"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestWanFullContract(PolicyContract):
    component = "wan"
    options = {"preset": "tiny"}


class TestWanCfgTwoExpertLoraContract(PolicyContract):
    component = "wan"
    options = {"preset": "tiny", "tiny_experts": 2, "guidance_scale": 4.0, "lora": {"rank": 4}}

    @override_contract("two experts: each trains on its own sigma range, so the rows straddle the boundary")
    def test_gradient_reaches_trainable_and_only_trainable(self, policy: Policy, x: torch.Tensor,
                                                           cond: Conditioning) -> None:
        """Only the acting expert is trained at a sigma, so the check runs with row 0 above the boundary
        (first expert) and row 1 below it (second expert): together they reach every trainable parameter."""
        self.sigma = lambda policy, x: torch.tensor([0.95, 0.3], device=x.device)  # type: ignore[method-assign]
        super().test_gradient_reaches_trainable_and_only_trainable(policy, x, cond)
