"""The CLIP rewards. Imported only by the build functions in `flowfactory_rewards_clip` (torch, transformers).

Every reward embeds images and prompts with a transformers CLIPModel on the run's device, in its `dtype`
option, `batch_size` images or distinct prompts per forward pass. Prompts are embedded under torch.no_grad; images
too, unless they require grad and grad mode is on: then the image embedding keeps the graph, so pickscore,
clip-score, aesthetic and hpsv2 are differentiable (`differentiable = True`, for reward back-propagation); the
CLIP weights stay frozen. pickscore-rank (a rank) is not. Images are preprocessed
on the device (`ImageTransform`, from the loaded processor's settings); each distinct prompt of a call is
embedded once. Embeddings are L2-normalised in float32 and scores are float32 [B] on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from flowfactory.config import HUB_ID
from flowfactory.errors import FlowFactoryError, RewardError
from flowfactory.types import Samples
from flowfactory_rewards_clip.preprocess import ImageTransform
from flowfactory_rewards_clip.weights import AestheticMLP, load_tensors, open_clip_to_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers progress bars or info/warning logs (e.g. "torchvision is missing, using the PIL image
    processor") while a model loads; errors still show, and the settings come back afterwards."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_source(source: str, where: str, what: str, example: str) -> None:
    """A value that is not hub-id shaped, or names something that exists, must be a folder."""
    path = Path(source).expanduser()
    if (path.exists() or not HUB_ID.match(source)) and not path.is_dir():
        raise FlowFactoryError(f"{where}: no such folder. Give a folder written by {what}.save_pretrained or a "
                               f"hub id such as {example}.")


def load_model(source: str, where: str, example: str) -> Any:
    """CLIPModel.from_pretrained(source), with errors that name the option (`where`) and the fix."""
    from transformers import CLIPModel

    _check_source(source, where, "CLIPModel", example)
    try:
        with quiet_loading():
            return CLIPModel.from_pretrained(source)
    except Exception as exc:
        raise FlowFactoryError(
            f"{where}: could not load a CLIPModel ({_first_line(exc)}). Give a folder written by "
            f"CLIPModel.save_pretrained, or a hub id such as {example} (downloaded once, then read from the "
            "Hugging Face cache).") from exc


def load_processor(source: str, where: str, example: str) -> tuple[ImageTransform, Any]:
    """The device image transform and the tokenizer of the CLIPProcessor at `source`."""
    from transformers import CLIPProcessor

    _check_source(source, where, "CLIPProcessor", example)
    try:
        with quiet_loading():
            processor = CLIPProcessor.from_pretrained(source)
    except Exception as exc:
        raise FlowFactoryError(
            f"{where}: could not load a CLIPProcessor ({_first_line(exc)}). Give a folder written by "
            f"CLIPProcessor.save_pretrained (tokenizer and preprocessor config), or a hub id such as {example}.") from exc
    return ImageTransform.from_processor(processor.image_processor, where), processor.tokenizer


def device_of(ctx: Any) -> torch.device:
    device = getattr(ctx, "device", None)
    return torch.device("cpu") if device is None else torch.device(device)


def images_of(samples: Samples, name: str) -> torch.Tensor:
    if samples.images is None:
        raise RewardError(f"{name} scores images; got samples without images")
    x = samples.images
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise RewardError(f"{name}: images must be [B, C, H, W] with C = 1, 3 or 4; got shape {tuple(x.shape)}")
    return x


class ClipEmbedder:
    """A CLIPModel with its device preprocessing and tokenizer: normalised float32 image and text embeddings."""

    def __init__(self, model: Any, transform: ImageTransform, tokenizer: Any, *, device: torch.device,
                 dtype: torch.dtype, batch_size: int):
        self.logit_scale = float(model.logit_scale.detach().float().exp())  # before a cast to half precision
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.transform, self.tokenizer = transform, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> [B, D] unit vectors, float32 on the device; with the graph to `images` when
        they require grad (and grad mode is on), else under no_grad."""
        out = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad):
            for chunk in images.split(self.batch_size):
                pixels = self.transform(chunk.to(self.device)).to(self.dtype)
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                out.append(self.model.visual_projection(pooled).float())
            return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """[B, D] unit vectors, float32 on the device; each distinct prompt is embedded once."""
        distinct = list(dict.fromkeys(prompts))
        out = []
        for start in range(0, len(distinct), self.batch_size):
            tokens = self.tokenizer(distinct[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float())
        table = torch.nn.functional.normalize(torch.cat(out), dim=-1)
        index = {p: i for i, p in enumerate(distinct)}
        return table[torch.tensor([index[p] for p in prompts], device=table.device)]

    def cosine(self, samples: Samples, name: str) -> torch.Tensor:
        """[B] cosine of each image with its prompt, float32 on the device."""
        images = images_of(samples, name)
        if len(samples.prompts) != images.shape[0]:
            raise RewardError(f"{name}: {images.shape[0]} images but {len(samples.prompts)} prompts")
        return (self.images(images) * self.texts(list(samples.prompts))).sum(-1)


def _embedder(model: Any, processor: tuple[ImageTransform, Any], options: Any, ctx: Any) -> ClipEmbedder:
    transform, tokenizer = processor
    return ClipEmbedder(model, transform, tokenizer, device=device_of(ctx), dtype=DTYPES[options.dtype],
                        batch_size=options.batch_size)


# --- PickScore ---------------------------------------------------------------------------------------------------

class PickScore:
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cosine(image, prompt) in the PickScore CLIP-H."""

    groupwise = False
    handles_video = False
    differentiable = True
    name = "pickscore"

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder
        self.logit_scale = embedder.logit_scale

    @classmethod
    def load(cls, options: Any, ctx: Any) -> PickScore:
        model = load_model(options.model, f"{cls.name} option model={options.model!r}", "yuvalkirstain/PickScore_v1")
        processor = load_processor(options.processor, f"{cls.name} option processor={options.processor!r}",
                                   "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        return cls(_embedder(model, processor, options, ctx))

    def pickscore(self, samples: Samples) -> torch.Tensor:
        return self.logit_scale * self.embedder.cosine(samples, self.name)

    def score(self, samples: Samples) -> torch.Tensor:
        return self.pickscore(samples).float().cpu()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of `values` (ascending), ties sharing the mean of the ranks they span."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    for v in torch.unique(values):
        tied = values == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class PickScoreRank(PickScore):
    """PickScore's rank within each group (Samples.group_ids), normalised to [0, 1]: (rank - 1) / (n - 1) with
    rank 1 the lowest of the group's n samples; tied scores share their average rank; a group of one gets 0.5.
    A video's PickScore is the mean over its frames, then ranked."""

    groupwise = True
    handles_video = True
    differentiable = False  # a rank within the group
    name = "pickscore-rank"

    def score(self, samples: Samples) -> torch.Tensor:
        n = len(samples.prompts)
        if len(samples.group_ids) != n:
            raise RewardError(f"{self.name} ranks within groups: needs one group id per sample "
                              f"(got {len(samples.group_ids)} for {n} samples)")
        if samples.videos is not None:
            v = samples.videos
            frames = replace(samples, videos=None, images=v.flatten(0, 1),
                             prompts=[p for p in samples.prompts for _ in range(v.shape[1])])
            raw = self.pickscore(frames).float().cpu().view(n, v.shape[1]).mean(1)
        else:
            raw = self.pickscore(samples).float().cpu()
        groups = torch.tensor(list(samples.group_ids))
        out = torch.empty(n, dtype=torch.float64)
        for g in torch.unique(groups):
            rows = groups == g
            k = int(rows.sum())
            out[rows] = 0.5 if k == 1 else (average_ranks(raw[rows]) - 1) / (k - 1)
        return out.float()


# --- CLIP score --------------------------------------------------------------------------------------------------

class ClipScore:
    """`scale` * cosine(image, prompt) in a CLIP model (no clipping at 0)."""

    groupwise = False
    handles_video = False
    differentiable = True

    def __init__(self, embedder: ClipEmbedder, scale: float = 1.0):
        self.embedder, self.scale = embedder, scale

    @classmethod
    def load(cls, options: Any, ctx: Any) -> ClipScore:
        example = "openai/clip-vit-large-patch14"
        model = load_model(options.model, f"clip-score option model={options.model!r}", example)
        if options.processor is None:
            processor = load_processor(options.model, f"clip-score option model={options.model!r} (its processor; "
                                       "or set the `processor` option)", example)
        else:
            processor = load_processor(options.processor, f"clip-score option processor={options.processor!r}",
                                       example)
        return cls(_embedder(model, processor, options, ctx), options.scale)

    def score(self, samples: Samples) -> torch.Tensor:
        return (self.scale * self.embedder.cosine(samples, "clip-score")).float().cpu()


# --- LAION aesthetic ---------------------------------------------------------------------------------------------

class Aesthetic:
    """The LAION improved aesthetic predictor: its MLP over the L2-normalised CLIP ViT-L/14 image embedding
    (about 1-10; the prompt is not used). The MLP runs in float32."""

    groupwise = False
    handles_video = False
    differentiable = True

    def __init__(self, embedder: ClipEmbedder, mlp: AestheticMLP):
        self.embedder = embedder
        self.mlp = mlp.eval().requires_grad_(False).to(device=embedder.device, dtype=torch.float32)

    @classmethod
    def load(cls, options: Any, ctx: Any) -> Aesthetic:
        where = f"aesthetic option weights={options.weights!r}"
        mlp = AestheticMLP.from_state_dict(
            load_tensors(options.weights, where, "the aesthetic MLP's weights (sac+logos+ava1-l14-linearMSE.pth "
                                                 "from christophschuhmann/improved-aesthetic-predictor)"), where)
        example = "openai/clip-vit-large-patch14"
        clip_where = f"aesthetic option clip_model={options.clip_model!r}"
        model = load_model(options.clip_model, clip_where, example)
        dim = int(model.config.projection_dim)
        if mlp.layers[0].in_features != dim:
            raise FlowFactoryError(
                f"{where}: the MLP takes {mlp.layers[0].in_features}-d embeddings but clip_model="
                f"{options.clip_model!r} gives {dim}-d ones; use the CLIP the MLP was trained on "
                f"({example} for the published weights).")
        processor = load_processor(options.clip_model, clip_where + " (its processor)", example)
        return cls(_embedder(model, processor, options, ctx), mlp)

    def score(self, samples: Samples) -> torch.Tensor:
        embeds = self.embedder.images(images_of(samples, "aesthetic"))
        return self.mlp(embeds).squeeze(-1).float().cpu()


# --- HPS v2.1 ----------------------------------------------------------------------------------------------------

def clip_from_open_clip(state_dict: dict[str, torch.Tensor], architecture: str, where: str, arch_where: str) -> Any:
    """A transformers CLIPModel with the config at `architecture` and an open_clip state dict's weights."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    example = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    _check_source(architecture, arch_where, "CLIPModel", example)
    folder = Path(architecture).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FlowFactoryError(f"{arch_where}: the folder has no config.json; give a folder written by "
                               f"CLIPModel.save_pretrained (or CLIPConfig.save_pretrained) or a hub id such as {example}.")
    try:
        with quiet_loading():
            config = CLIPConfig.from_pretrained(architecture)
    except Exception as exc:
        raise FlowFactoryError(f"{arch_where}: could not read a CLIP config ({_first_line(exc)}); give a hub id "
                               f"such as {example} or a folder holding its config.json.") from exc
    converted = open_clip_to_transformers(state_dict, where)
    with quiet_loading(), init_empty_weights():
        model = CLIPModel(config)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4] if line.strip())
        raise FlowFactoryError(f"{where}: the checkpoint does not fit the CLIP of {arch_where} "
                               f"({detail or _first_line(exc)}); give the matching architecture.") from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FlowFactoryError(f"{where}: the checkpoint does not fit the CLIP of {arch_where}: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}; give the matching architecture.")
    return model


class HPSv2:
    """HPS v2.1 (Wu et al. 2023): cosine(image, prompt) in the HPS-finetuned CLIP ViT-H-14, HPSv2's score."""

    groupwise = False
    handles_video = False
    differentiable = True

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder

    @classmethod
    def load(cls, options: Any, ctx: Any) -> HPSv2:
        where = f"hpsv2 option checkpoint={options.checkpoint!r}"
        arch_where = f"hpsv2 option architecture={options.architecture!r}"
        sd = load_tensors(options.checkpoint, where, "the HPS v2.1 checkpoint (HPS_v2.1_compressed.pt from the "
                                                     "hub repo xswu/HPSv2)")
        model = clip_from_open_clip(sd, options.architecture, where, arch_where)
        processor = load_processor(options.architecture, arch_where, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        return cls(_embedder(model, processor, options, ctx))

    def score(self, samples: Samples) -> torch.Tensor:
        return self.embedder.cosine(samples, "hpsv2").float().cpu()
