"""flowfactory's Policy contract suite, run on the sd3 policy as LoRA, as full finetune, and with CFG."""

from __future__ import annotations

from flowfactory.testing import PolicyContract


class TestSD3LoraContract(PolicyContract):
    component = "sd3"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestSD3FullContract(PolicyContract):
    component = "sd3"
    options = {"preset": "tiny"}


class TestSD3CfgLoraContract(PolicyContract):
    component = "sd3"
    options = {"preset": "tiny", "guidance_scale": 4.5, "lora": {"rank": 4}}
