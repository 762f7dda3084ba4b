"""`QwenImageEditPolicy` and `QwenImageEditPlusPolicy`: Qwen-Image-Edit (diffusers `QwenImageEditPipeline`) and
Qwen-Image-Edit-2509 (`QwenImageEditPlusPipeline`, several input images) seen through flowfactory's `Policy`.

An edit reads its input images twice, as the pipelines do: Qwen2.5-VL sees them as vision tokens inside the
prompt template, and the VAE encodes them into latents that the transformer reads after the noisy latents in its
image stream (each image its own RoPE frame); the velocity is the output at the noisy latents' tokens. Both come
from the prompt record (`Prompt.load_images()`), per record, so each conditioning row depends on its own record
only. The noise, schedule, true CFG, decode, LoRA and saving are Qwen-Image's (`QwenImagePolicy`).

The pipelines resize each input image to a fixed pixel area whatever the output size (1024x1024 for the VAE;
384x384 for Qwen2.5-VL in the Plus pipeline), keeping its aspect ratio; `image_area` and `condition_image_area`
set those areas (null: the pipelines' own), so a small run need not encode megapixel inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)
from PIL import Image

from flowfactory.errors import FlowFactoryError
from flowfactory.prompts import Prompt, as_prompts
from flowfactory.registry import BuildContext
from flowfactory.types import Conditioning, select_rows
from flowfactory_diffusers.policy import _tokenizer_digest, load_or_build, training_kwargs
from flowfactory_qwen_image.policy import REAL_TRUE_CFG_SCALE, TINY_SIZE, QwenImagePolicy

REAL_IMAGE_AREA = VAE_IMAGE_SIZE  # 1024 * 1024: both pipelines' input-image area for the VAE
REAL_CONDITION_AREA = CONDITION_IMAGE_SIZE  # 384 * 384: QwenImageEditPlusPipeline's input-image area for Qwen2.5-VL
REAL_EDIT_MAX_SEQUENCE_LENGTH = 2048  # a 1024x1024 input is 1369 vision tokens in Qwen-Image-Edit's template
REAL_MAX_IMAGES = 3  # Qwen-Image-Edit-2509 is made for one to three input images
TINY_IMAGE_AREA = 32 * 32
TINY_EDIT_MAX_SEQUENCE_LENGTH = 128
MAX_ASPECT = 200  # Qwen2-VL's image processor refuses images more elongated than this
SIDE = 32  # the pipelines round an input image's sides to multiples of this


def input_size(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) the pipelines resize a `width` x `height` input image to for a pixel `area`: the aspect ratio
    kept, sides rounded to multiples of 32 (their own `calculate_dimensions`)."""
    w, h = calculate_dimensions(area, width / height)
    return int(w), int(h)


def max_image_tokens(area: int, unit: int) -> int:
    """The most packed latent tokens `input_size` can give at `area` over every aspect ratio up to `MAX_ASPECT`,
    `unit` pixels making one token side (2 x the VAE scale factor): the row length an input image's latents are
    padded to, so that records of any shape stack into one conditioning batch."""
    root, stretch = math.sqrt(area), math.sqrt(MAX_ASPECT)
    best = 0
    for k in range(1, math.ceil(root * stretch / SIDE) + 2):  # width = 32k for sqrt(area * ratio) in this interval
        lo, hi = max(SIDE * (k - 0.5), root / stretch), min(SIDE * (k + 0.5), root * stretch)
        if lo > hi:
            continue
        rows = math.floor(area / lo / SIDE + 0.5)  # the largest height this width comes with (rounding half up)
        best = max(best, (SIDE * k // unit) * (SIDE * rows // unit))
    return best


def vl_processor(image_processor: Any, tokenizer: Any, *, cls: type | None = None,
                 chat_template: str | None = None) -> Any:
    """A Qwen VL processor (`cls`: `Qwen2VLProcessor` by default, `Qwen3VLProcessor` for Qwen-Image 2.1) of an
    image processor and a tokenizer, without a video processor.

    The pipelines call their processor with text and images only. transformers builds a processor's video half
    only where torchvision is installed, and the processor's constructor refuses a missing part, so the constructor
    runs here with that one check skipped for the absent video processor (every other part is checked as usual).
    Its `save_pretrained` writes the tokenizer, the image processor and the chat template (what `load_processor`
    reads back)."""
    from transformers import Qwen2VLProcessor

    cls = cls or Qwen2VLProcessor
    proc = cls.__new__(cls)

    def check(name: str, arg: Any) -> Any:
        return None if arg is None else cls.check_argument_for_proper_class(proc, name, arg)

    proc.check_argument_for_proper_class = check  # the instance's own, for the constructor only
    try:
        cls.__init__(proc, image_processor, tokenizer, None, chat_template=chat_template)
    finally:
        del proc.check_argument_for_proper_class

    def save_pretrained(directory: str, **kwargs: Any) -> None:
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)
        if proc.chat_template:
            (Path(directory) / "chat_template.jinja").write_text(proc.chat_template)

    proc.save_pretrained = save_pretrained
    return proc


def load_processor(folder: Path, cls: type | None = None) -> Any:
    """The pipeline's `processor` component from its folder (tokenizer files, preprocessor_config.json, the chat
    template as chat_template.jinja or chat_template.json, else the tokenizer's), as `vl_processor` builds it: the
    image processor `AutoImageProcessor` picks for the installed packages, as the stock `from_pretrained` would,
    and no video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    template = getattr(tokenizer, "chat_template", None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template", template)
    return vl_processor(AutoImageProcessor.from_pretrained(str(folder)), tokenizer, cls=cls, chat_template=template)


@contextmanager
def pipeline_areas(image_area: int, condition_image_area: int | None = None) -> Iterator[None]:
    """Inside the block the stock editing pipelines resize their input images to these areas instead of their
    own (`QwenImageEditPipeline`'s 1024x1024 literal, `QwenImageEditPlusPipeline`'s VAE_IMAGE_SIZE and
    CONDITION_IMAGE_SIZE), so they can be compared with a policy run at a non-default `image_area`
    (`condition_image_area`), e.g. the tiny preset's. For tests and benchmarks; not thread-safe."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    dims = edit.calculate_dimensions
    saved = plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE
    edit.calculate_dimensions = lambda area, ratio: dims(image_area if area == 1024 * 1024 else area, ratio)
    plus.VAE_IMAGE_SIZE = image_area
    plus.CONDITION_IMAGE_SIZE = condition_image_area if condition_image_area is not None else saved[1]
    try:
        yield
    finally:
        edit.calculate_dimensions = dims
        plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE = saved


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float [3, H, W] image in [0, 1] from `Prompt.load_images()` back as the RGB PIL image of its file (the
    8-bit values come back exactly)."""
    arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


class QwenImageEditPolicy(QwenImagePolicy):
    """Implements `flowfactory.types.Policy` for `QwenImageEditPipeline` (one input image per record)."""

    name = "qwen-image-edit"
    pipeline_class: ClassVar[type] = QwenImageEditPipeline
    encode_options = ("max_sequence_length", "negative_prompt", "do_cfg", "image_area", "max_images")
    encode_components = ("vae",)  # encode runs the VAE on the input images
    plus: ClassVar[bool] = False

    def __init__(self, pipe: Any, *, image_area: int, max_images: int = 1, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self.image_area = image_area
        self.max_images = max_images
        unit = 2 * self.vae_scale_factor
        self.image_tokens: int = max_images * max_image_tokens(image_area, unit)  # the padded row length

    # -- encode ----------------------------------------------------------------------------------------------

    def _input_images(self, record: Prompt) -> list[Image.Image]:
        if not record.images:
            raise FlowFactoryError(
                f"{self.name} policy: prompt {record.text!r} has no input image, and an edit needs the image it "
                f"edits. Give its line of the prompt file an \"image\" field (a path relative to the file), or use "
                f"the qwen-image policy for text-to-image.")
        if len(record.images) > self.max_images:
            raise FlowFactoryError(
                f"{self.name} policy: prompt {record.text!r} has {len(record.images)} input images, more than "
                f"{'this policy reads (one)' if not self.plus else f'max_images={self.max_images}'}"
                f"{'; use qwen-image-edit-plus for several' if not self.plus else '; raise max_images'}.")
        return [to_pil(t) for t in record.load_images()]

    def _size(self, record: Prompt, image: Image.Image, area: int, option: str) -> tuple[int, int]:
        w, h = input_size(area, *image.size)
        unit = 2 * self.vae_scale_factor
        if w == 0 or h == 0 or (option == "image_area" and (w % unit or h % unit)):
            raise FlowFactoryError(
                f"{self.name} policy option {option}={area}: the input image of prompt {record.text!r} "
                f"({image.size[0]}x{image.size[1]} pixels) becomes {w}x{h}, which the pipeline cannot use; raise "
                f"{option} or give a less elongated image.")
        return w, h

    def _prepare(self, record: Prompt, images: list[Image.Image]) -> tuple[Any, list[torch.Tensor]]:
        """What `QwenImageEditPipeline.__call__` makes of the input image: the image Qwen2.5-VL sees (resized to
        `image_area`) and the VAE's input, [1, 3, 1, h, w] in [-1, 1], from that same resized image."""
        w, h = self._size(record, images[0], self.image_area, "image_area")
        proc = self.pipe.image_processor
        resized = proc.resize(images[0], h, w)
        return resized, [proc.preprocess(resized, h, w).unsqueeze(2)]

    def _encode_record(self, record: Prompt) -> Conditioning:
        """One record's conditioning row (inside `text_encoders()`)."""
        images = self._input_images(record)
        prompt_images, vae_inputs = self._prepare(record, images)
        embeds, mask = self._encode_text(record, record.text, prompt_images)
        cond = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if self.do_cfg:  # the pipeline encodes the negative prompt with the same input images
            neg, neg_mask = self._encode_text(record, self.negative_prompt, prompt_images)
            cond |= {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
        latents, shapes = [], []
        for image in vae_inputs:  # prepare_latents: VAE mode in the text encoder's dtype, normalised, packed
            z = self.pipe._encode_vae_image(image=image.to(self.device, embeds.dtype), generator=None)
            c, lh, lw = z.shape[1], z.shape[3], z.shape[4]
            latents.append(self.pipe._pack_latents(z, 1, c, lh, lw))
            shapes.append((lh // 2, lw // 2))
        packed = torch.cat(latents, dim=1)
        pad = self.image_tokens - packed.shape[1]
        cond["image_latents"] = torch.cat([packed, packed.new_zeros(1, pad, packed.shape[2])], dim=1)
        shapes += [(0, 0)] * (self.max_images - len(shapes))
        cond["image_shapes"] = torch.tensor([shapes], dtype=torch.long, device=packed.device)
        return cond

    def _encode_text(self, record: Prompt, text: str, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_prompt` of one prompt with its input image(s), zero-padded to max_sequence_length with a 0/1
        mask [1, L]. The pipeline keeps every token (vision tokens and instruction), so a longer one is an
        error, not a cut."""
        embeds, mask = self.pipe.encode_prompt(prompt=[text], image=images, device=self.device)
        n, d = embeds.shape[1], embeds.shape[2]
        if n > self.max_sequence_length:
            raise FlowFactoryError(
                f"{self.name} policy option max_sequence_length={self.max_sequence_length}: prompt {record.text!r} "
                f"with its input image{'s' if len(record.images) > 1 else ''} is {n} tokens after the template's "
                f"system prefix (vision tokens and text); raise max_sequence_length to at least {n}.")
        if mask is None:
            mask = torch.ones(1, n, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - n
        return (torch.cat([embeds, embeds.new_zeros(1, pad, d)], dim=1),
                torch.cat([mask.long(), mask.new_zeros(1, pad, dtype=torch.long)], dim=1))

    @torch.no_grad()
    def encode(self, prompts: list[Prompt]) -> Conditioning:
        """Per record, as the pipeline computes it for that record alone: the Qwen2.5-VL hidden states of the
        templated instruction with its input image(s) as vision tokens, system prefix dropped, zero-padded to
        max_sequence_length [B, L, D] with their mask [B, L] (with true CFG the negative prompt's too, with the
        same images); the input images' packed VAE latents, zero-padded to `image_tokens` [B, T, 4C]; and their
        token grids [B, max_images, 2] (rows, columns; 0, 0 where a record has fewer images)."""
        records = as_prompts(prompts)
        if not records:
            raise ValueError(f"{self.name} encode: no prompts")
        with self.text_encoders():
            rows = [self._encode_record(r) for r in records]
        return {k: torch.cat([row[k] for row in rows]) for k in rows[0]}

    def conditioning_fingerprint(self) -> str | None:
        """The base fingerprint (text encoder, VAE, options) and the processor that turns input images into vision
        tokens: its image processor's settings and its tokenizer."""
        base = super().conditioning_fingerprint()
        proc = self.pipe.processor
        extra = json.dumps({"image_processor": proc.image_processor.to_dict(),
                            "tokenizer": _tokenizer_digest(proc.tokenizer)}, sort_keys=True, default=str)
        return hashlib.sha256(f"{base}\n{extra}".encode()).hexdigest()

    # -- velocity --------------------------------------------------------------------------------------------

    def _image_stream(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, list[list[tuple[int, ...]]]]:
        """The noisy latents, then the input images' latents (rows of one input shape: see `velocity`), with the
        output's token grid first and each input image's after it, as the pipeline's `img_shapes`."""
        h, w = self.latent_hw
        grids = [(1, h // 2, w // 2)] + [(1, a, b) for a, b in cond["image_shapes"][0].tolist() if a]
        return torch.cat([x, cond["image_latents"].to(x.device, x.dtype)], dim=1), [grids] * x.shape[0]

    @staticmethod
    def _trim(cond: Conditioning) -> Conditioning:
        """Rows of one input shape without the padding every row of them has: text to the longest mask, image
        latents to the images' token count. Padded text is masked and padded image tokens are not there at all in
        the pipeline, so this changes nothing but the work."""
        out = dict(cond)
        for prefix in ("", "negative_"):
            if f"{prefix}prompt_embeds" in cond:
                n = max(int(cond[f"{prefix}prompt_embeds_mask"].sum(dim=1).max()), 1)
                out[f"{prefix}prompt_embeds"] = cond[f"{prefix}prompt_embeds"][:, :n]
                out[f"{prefix}prompt_embeds_mask"] = cond[f"{prefix}prompt_embeds_mask"][:, :n]
        tokens = int(cond["image_shapes"][0].prod(dim=-1).sum())
        out["image_latents"] = cond["image_latents"][:, :tokens]
        return out

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Qwen-Image's velocity with the input images' latents in the image stream. Rows whose input images
        differ in shape run in separate transformer calls (one per shape), so no row sees another's padding."""
        if "image_latents" not in cond:
            raise KeyError(f"{self.name} velocity: the conditioning has no input image latents; encode the prompt "
                           f"records with this policy")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(cond["image_shapes"].flatten(1).tolist()):
            groups.setdefault(tuple(key), []).append(i)
        if len(groups) == 1:
            return super().velocity(x, sigma, self._trim(cond))
        order = [i for rows in groups.values() for i in rows]
        outs = [super(QwenImageEditPolicy, self).velocity(
            x[rows], sigma[rows], self._trim(select_rows(cond, torch.tensor(rows, device=x.device))))
            for rows in groups.values()]
        inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
        inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
        return torch.cat(outs)[inverse]

    # -- saving ----------------------------------------------------------------------------------------------

    def _saved_settings(self) -> dict[str, Any]:
        return {**super()._saved_settings(), "image_area": self.image_area}

    def _call_example(self) -> tuple[str, str]:
        cfg = f"negative_prompt={self.negative_prompt!r}, true_cfg_scale={self.true_cfg_scale}, " if self.do_cfg else ""
        return "image=source, prompt=prompt", f"{cfg}height={self.height}, width={self.width}"


class QwenImageEditPlusPolicy(QwenImageEditPolicy):
    """Implements `flowfactory.types.Policy` for `QwenImageEditPlusPipeline`: up to `max_images` input images per
    record, "Picture 1: ...", "Picture 2: ..." in the prompt, each image resized to `condition_image_area` for
    Qwen2.5-VL and to `image_area` for the VAE."""

    name = "qwen-image-edit-plus"
    pipeline_class: ClassVar[type] = QwenImageEditPlusPipeline
    encode_options = (*QwenImageEditPolicy.encode_options, "condition_image_area")
    plus = True

    def __init__(self, pipe: Any, *, condition_image_area: int, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self.condition_image_area = condition_image_area

    def _prepare(self, record: Prompt, images: list[Image.Image]) -> tuple[Any, list[torch.Tensor]]:
        """What `QwenImageEditPlusPipeline.__call__` makes of the input images: each resized to
        `condition_image_area` for Qwen2.5-VL, and each resized to `image_area` for the VAE."""
        proc = self.pipe.image_processor
        seen, vae_inputs = [], []
        for image in images:
            cw, ch = self._size(record, image, self.condition_image_area, "condition_image_area")
            vw, vh = self._size(record, image, self.image_area, "image_area")
            seen.append(proc.resize(image, ch, cw))
            vae_inputs.append(proc.preprocess(image, vh, vw).unsqueeze(2))
        return seen, vae_inputs

    def _saved_settings(self) -> dict[str, Any]:
        return {**super()._saved_settings(), "condition_image_area": self.condition_image_area}

    def _call_example(self) -> tuple[str, str]:
        inputs, call_args = super()._call_example()
        return "image=[source, ...], prompt=prompt", call_args


def build_edit_policy(options: Any, ctx: BuildContext, *, plus: bool) -> QwenImageEditPolicy:
    """Load or build an editing pipeline and wrap it (dtypes as `flowfactory_qwen_image.policy.build_policy`). The
    processor is loaded with `load_processor` (no video processor, so no torchvision needed)."""
    from flowfactory_qwen_image.tiny import build_tiny_edit_pipeline

    cls = QwenImageEditPlusPolicy if plus else QwenImageEditPolicy
    pipe, tiny = load_or_build(options, ctx, cls.pipeline_class, lambda: build_tiny_edit_pipeline(ctx.seed, plus=plus),
                               policy=cls.name, example="Qwen/Qwen-Image-Edit-2509" if plus else "Qwen/Qwen-Image-Edit",
                               components={"processor": load_processor})
    if tiny:
        size, max_len, cfg = TINY_SIZE, TINY_EDIT_MAX_SEQUENCE_LENGTH, 1.0
        area = condition_area = TINY_IMAGE_AREA
    else:
        size = pipe.default_sample_size * pipe.vae_scale_factor
        max_len, cfg, area, condition_area = REAL_EDIT_MAX_SEQUENCE_LENGTH, REAL_TRUE_CFG_SCALE, REAL_IMAGE_AREA, \
            REAL_CONDITION_AREA
    height = options.height or size
    extra: dict[str, Any] = {}
    if plus:
        extra = {"condition_image_area": options.condition_image_area or condition_area,
                 "max_images": options.max_images}
    return cls(
        pipe, height=height, width=options.width or options.height or size,
        max_sequence_length=options.max_sequence_length or max_len,
        true_cfg_scale=options.true_cfg_scale if options.true_cfg_scale is not None else cfg,
        negative_prompt=options.negative_prompt, image_area=options.image_area or area, **extra,
        **training_kwargs(options, ctx))
