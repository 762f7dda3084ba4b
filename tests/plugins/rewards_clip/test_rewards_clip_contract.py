"""flowfactory's reward contract suite on every CLIP reward, built on the tiny random CLIP files."""

from __future__ import annotations

from typing import Any

import pytest

from flowfactory.testing import RewardContract


class _TinyClip(RewardContract):
    @pytest.fixture(scope="class")
    @classmethod
    def reward(cls, registry: Any, tiny: Any) -> Any:
        return registry.get(cls.kind, cls.component).create(tiny.options(cls.component), cls.context())


class TestPickScoreContract(_TinyClip):
    component = "pickscore"


class TestPickScoreRankContract(_TinyClip):
    component = "pickscore-rank"


class TestClipScoreContract(_TinyClip):
    component = "clip-score"


class TestAestheticContract(_TinyClip):
    component = "aesthetic"


class TestHPSv2Contract(_TinyClip):
    component = "hpsv2"
