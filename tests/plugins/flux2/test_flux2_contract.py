"""flowfactory's Policy contract suite, run on flux2 (LoRA, full finetune) and flux2-klein (LoRA with CFG), at 16x16
pixels (the preset's default is 32x32) to keep it fast."""

from __future__ import annotations

from flowfactory.testing import PolicyContract


class TestFlux2LoraContract(PolicyContract):
    component = "flux2"
    options = {"preset": "tiny", "height": 16, "lora": {"rank": 4}}


class TestFlux2FullContract(PolicyContract):
    component = "flux2"
    options = {"preset": "tiny", "height": 16}


class TestFlux2KleinCfgLoraContract(PolicyContract):
    component = "flux2-klein"
    options = {"preset": "tiny", "height": 16, "guidance_scale": 4.0, "lora": {"rank": 4}}
