"""Learned image rewards on transformers' CLIPModel: `pickscore`, `pickscore-rank`, `clip-score`, `aesthetic`,
`hpsv2`.

This module is the entry point: it imports only flowfactory and pydantic, so `ff list` stays fast. torch and
transformers are imported by the build functions, from `flowfactory_rewards_clip.rewards`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowfactory import hookimpl
from flowfactory.config import PATH_OR_HUB_ID

DType = Literal["float32", "bfloat16", "float16"]

_DTYPE = "Dtype the CLIP model runs in (weights and pixels); scores are float32 whatever it is."
_BATCH = "Images (and distinct prompts) per forward pass."


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class PickScoreOptions(_Options):
    model: str = Field("yuvalkirstain/PickScore_v1", json_schema_extra=PATH_OR_HUB_ID, description=(
        "PickScore CLIPModel: a hub id or a folder written by CLIPModel.save_pretrained."))
    processor: str = Field("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", json_schema_extra=PATH_OR_HUB_ID, description=(
        "CLIPProcessor (tokenizer and image size, mean, std): a hub id or a folder written by "
        "CLIPProcessor.save_pretrained."))
    dtype: DType = Field("float32", description=_DTYPE)
    batch_size: int = Field(16, ge=1, description=_BATCH)


class PickScoreRankOptions(PickScoreOptions):
    pass


class ClipScoreOptions(_Options):
    model: str = Field("openai/clip-vit-large-patch14", json_schema_extra=PATH_OR_HUB_ID, description=(
        "CLIPModel: a hub id or a folder written by CLIPModel.save_pretrained."))
    processor: str | None = Field(None, json_schema_extra=PATH_OR_HUB_ID, description=(
        "CLIPProcessor: a hub id or folder; null loads it from `model`."))
    scale: float = Field(1.0, gt=0, description=(
        "Multiplies the cosine: 1 gives the cosine in [-1, 1]; 100 the scale of torchmetrics' CLIPScore, 2.5 "
        "Hessel et al.'s w (without their clipping at 0)."))
    dtype: DType = Field("float32", description=_DTYPE)
    batch_size: int = Field(16, ge=1, description=_BATCH)


class AestheticOptions(_Options):
    weights: str = Field(json_schema_extra=PATH_OR_HUB_ID, description=(
        "The improved-aesthetic-predictor MLP's weights file (sac+logos+ava1-l14-linearMSE.pth, or the same "
        "tensors as .safetensors); a .pth is read only with torch.load(weights_only=True)."))
    clip_model: str = Field("openai/clip-vit-large-patch14", json_schema_extra=PATH_OR_HUB_ID, description=(
        "CLIP the MLP was trained on (ViT-L/14, 768-d embeddings): a hub id or a folder holding the model "
        "and its processor."))
    dtype: DType = Field("float32", description=_DTYPE + " The MLP always runs in float32.")
    batch_size: int = Field(16, ge=1, description=_BATCH)


class HPSv2Options(_Options):
    checkpoint: str = Field(json_schema_extra=PATH_OR_HUB_ID, description=(
        "HPS v2.1 checkpoint: HPS_v2.1_compressed.pt (an open_clip ViT-H-14 state dict, read only with "
        "torch.load(weights_only=True)) or the same tensors as .safetensors."))
    architecture: str = Field("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", json_schema_extra=PATH_OR_HUB_ID,
                              description=(
        "Where the CLIP config (ViT-H-14) and the processor come from: a hub id or folder; its weights are "
        "not loaded."))
    dtype: DType = Field("float32", description=_DTYPE)
    batch_size: int = Field(16, ge=1, description=_BATCH)


def _pickscore(options: PickScoreOptions, ctx: Any) -> Any:
    from flowfactory_rewards_clip.rewards import PickScore

    return PickScore.load(options, ctx)


def _pickscore_rank(options: PickScoreRankOptions, ctx: Any) -> Any:
    from flowfactory_rewards_clip.rewards import PickScoreRank

    return PickScoreRank.load(options, ctx)


def _clip_score(options: ClipScoreOptions, ctx: Any) -> Any:
    from flowfactory_rewards_clip.rewards import ClipScore

    return ClipScore.load(options, ctx)


def _aesthetic(options: AestheticOptions, ctx: Any) -> Any:
    from flowfactory_rewards_clip.rewards import Aesthetic

    return Aesthetic.load(options, ctx)


def _hpsv2(options: HPSv2Options, ctx: Any) -> Any:
    from flowfactory_rewards_clip.rewards import HPSv2

    return HPSv2.load(options, ctx)


@hookimpl
def register_rewards(register):
    register("pickscore", _pickscore, options=PickScoreOptions,
             summary="PickScore (Kirstain et al. 2023): logit scale times the CLIP-H cosine of prompt and image.")
    register("pickscore-rank", _pickscore_rank, options=PickScoreRankOptions,
             summary="PickScore's rank within each group, in [0, 1] (ties share their average rank).")
    register("clip-score", _clip_score, options=ClipScoreOptions,
             summary="CLIP cosine similarity of prompt and image (times `scale`).")
    register("aesthetic", _aesthetic, options=AestheticOptions,
             summary="LAION improved aesthetic predictor: an MLP over CLIP ViT-L/14 image embeddings (1-10).")
    register("hpsv2", _hpsv2, options=HPSv2Options,
             summary="HPS v2.1 human preference score: cosine of prompt and image in a finetuned CLIP-H.")
