"""`DiffusersPolicyOptions.resolved`: the one place a model says what its null options mean, for the tiny preset
and for a real `model`, read alike by its build function and its `ff plan`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from flowfactory_diffusers.options import DiffusersPolicyOptions


class SizeOptions(DiffusersPolicyOptions):
    tiny_defaults: ClassVar[Mapping[str, Any]] = {"height": 32, "width": 32, "guidance_scale": 1.0}
    model_defaults: ClassVar[Mapping[str, Any]] = {"guidance_scale": 4.5}
    width_follows_height: ClassVar[bool] = True

    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)


def test_null_options_take_the_tiny_or_model_table_and_given_ones_stay():
    tiny = SizeOptions(preset="tiny").resolved(True)
    assert (tiny.height, tiny.width, tiny.guidance_scale) == (32, 32, 1.0)
    real = SizeOptions(model="some/model", guidance_scale=0.0).resolved(False, height=1024, width=1024)
    assert (real.height, real.width, real.guidance_scale) == (1024, 1024, 0.0)  # 0.0 is given, not null


def test_width_follows_a_given_height_unless_given_itself():
    assert SizeOptions(preset="tiny", height=64).resolved(True).width == 64
    assert SizeOptions(model="m", height=64).resolved(False, height=512, width=512).width == 64
    assert SizeOptions(preset="tiny", height=64, width=48).resolved(True).width == 48


def test_resolving_leaves_the_options_themselves_unchanged():
    options = SizeOptions(preset="tiny")
    options.resolved(True)
    assert options.height is None and options.width is None


def test_without_tables_nothing_changes():
    assert DiffusersPolicyOptions(preset="tiny").resolved(True) == DiffusersPolicyOptions(preset="tiny")
