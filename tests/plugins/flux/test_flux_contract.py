"""flowfactory's Policy contract suite, run on the flux policy as LoRA and as full finetune."""

from __future__ import annotations

from flowfactory.testing import PolicyContract


class TestFluxLoraContract(PolicyContract):
    component = "flux"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestFluxFullContract(PolicyContract):
    component = "flux"
    options = {"preset": "tiny"}
