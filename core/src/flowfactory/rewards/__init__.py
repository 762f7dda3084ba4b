"""Built-in weight-free rewards, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from flowfactory.hookspecs import hookimpl


class JPEGOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    quality: int = Field(95, ge=1, le=100, description="JPEG quality used to encode each image (DDPO: 95).")


class BrightnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ColourMatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    tolerance: float = Field(
        0.35, gt=0, description="RGB distance (in [0,1] units) at which a pixel counts half as that colour.")
    default: str | None = Field(
        None, description="Colour used when a prompt names none; null makes that an error.")


class EditColourOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    tolerance: float = Field(
        0.35, gt=0, description="RGB distance (in [0,1] units) between the region's mean colour and the target at "
                                "which the colour term is 1/2.")
    keep_weight: float = Field(
        1.0, ge=0, description="Weight of the penalty for changing the image outside the region: the mean absolute "
                               "difference (in [0,1] units) from the source, resized to the sample's size.")


def _jpeg(sign: float):
    def build(options: JPEGOptions, ctx):
        from flowfactory.rewards.builtin import JPEGSize

        return JPEGSize(quality=options.quality, sign=sign)

    return build


def _brightness(options, ctx):
    from flowfactory.rewards.builtin import Brightness

    return Brightness()


def _colour_match(options: ColourMatchOptions, ctx):
    from flowfactory.rewards.builtin import ColourMatch

    return ColourMatch(tolerance=options.tolerance, default=options.default)


def _edit_colour(options: EditColourOptions, ctx):
    from flowfactory.rewards.builtin import EditColour

    return EditColour(tolerance=options.tolerance, keep_weight=options.keep_weight)


@hookimpl
def register_rewards(register):
    register("jpeg-compressibility", _jpeg(-1.0), options=JPEGOptions,
             summary="Negative JPEG size in kB (DDPO): rewards simple, compressible images.")
    register("jpeg-incompressibility", _jpeg(+1.0), options=JPEGOptions,
             summary="JPEG size in kB (DDPO): rewards detailed, hard-to-compress images.")
    register("brightness", _brightness, options=BrightnessOptions,
             summary="Mean luma of the image in [0, 1].")
    register("colour-match", _colour_match, options=ColourMatchOptions,
             summary="Share of the image in the colour the prompt names ('a red square'), in [0, 1].")
    register("edit-colour", _edit_colour, options=EditColourOptions,
             summary="Edits: a region (metadata) turned to a target colour, the rest kept as the input image.")
