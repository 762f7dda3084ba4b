"""flowfactory's Policy contract suite, run on the z-image policy as LoRA, as full finetune, and with CFG."""

from __future__ import annotations

from flowfactory.testing import PolicyContract


class TestZImageLoraContract(PolicyContract):
    component = "z-image"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestZImageFullContract(PolicyContract):
    component = "z-image"
    options = {"preset": "tiny"}


class TestZImageCfgLoraContract(PolicyContract):
    component = "z-image"
    options = {"preset": "tiny", "guidance_scale": 3.0, "lora": {"rank": 4}}
