"""flowfactory's Policy contract suite, run on the qwen-image policy as LoRA, as full finetune, and with true CFG."""

from __future__ import annotations

from flowfactory.testing import PolicyContract


class TestQwenImageLoraContract(PolicyContract):
    component = "qwen-image"
    options = {"preset": "tiny", "lora": {"rank": 4}}


class TestQwenImageFullContract(PolicyContract):
    component = "qwen-image"
    options = {"preset": "tiny"}


class TestQwenImageCfgLoraContract(PolicyContract):
    component = "qwen-image"
    options = {"preset": "tiny", "true_cfg_scale": 4.0, "lora": {"rank": 4}}
