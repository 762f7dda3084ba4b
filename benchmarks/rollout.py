"""A policy's ODE rollout + decode against its stock diffusers pipeline's __call__, in the same process.

Policies (`--policy NAME`): flux (FluxPipeline), flux-kontext (FluxKontextPipeline: each prompt is a record
with a source image, which both sides encode), sd3 (StableDiffusion3Pipeline), qwen-image (QwenImagePipeline,
true CFG), wan (WanPipeline, videos: the image difference is over every frame) and z-image (ZImagePipeline).

qwen-image-edit and qwen-image-edit-plus (QwenImageEditPipeline, QwenImageEditPlusPipeline) edit records with
source PNGs too; their stock pipelines run at the policy's input-image areas (`pipeline_areas`), the Plus one a
record at a time (it takes one prompt per call). wan-i2v (WanImageToVideoPipeline, the tiny Wan 2.1 I2V with its CLIP
image encoder) takes each record's source as the first frame; the stock pipeline runs a record at a time, since it
takes one image for its whole batch. qwen-image-2.1 (QwenImage21Pipeline, use_kv_cache=False) runs a prompt at a
time on the pipeline's side, whose batches pad prompts to the longest, which changes their images; its images are
RGBA, compared on RGB. flux2 and flux2-klein (Flux2Pipeline, Flux2KleinPipeline; klein with CFG
when its guidance_scale > 1) take their initial latents as the patchified grid, which `policy.unpack` gives.

Both sides start from the same prompts and packed latents, use the same weights (the tiny preset's seed,
built once for the policy and once, independently, for a stock pipeline; or the same `--model` folder),
the same steps and size, and include prompt encoding and VAE decoding. Repeats alternate between the two
sides after one warm-up each, so drift in machine load hits both.

    python benchmarks/rollout.py                          # tiny preset, 10 steps, batch 16, 5 repeats
    python benchmarks/rollout.py --steps 4 --batch 4 --repeats 3
    python benchmarks/rollout.py --model /path/to/FluxPipeline-folder --height 512 --width 512
    python benchmarks/rollout.py --policy wan --batch 8     # tiny Wan, 5 frames of 16x16
    python benchmarks/rollout.py --policy wan-i2v --batch 4 # tiny Wan 2.1 I2V, 5 frames of 16x16

Prints the median seconds of each side, the ratio ours / pipeline (target <= 1.0), the largest absolute
difference between the two sides' images, and the time of one velocity call at the batch size.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowfactory.plugins import load
from flowfactory.prompts import Prompt, texts
from flowfactory.registry import BuildContext
from flowfactory.samplers.flow import ODESampler
from flowfactory_diffusers import quiet_transformers

with quiet_transformers():  # no torchvision warnings for image processors these pipelines never use
    from diffusers import (
        Flux2KleinPipeline,
        Flux2Pipeline,
        FluxKontextPipeline,
        FluxPipeline,
        QwenImage21Pipeline,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        WanImageToVideoPipeline,
        WanPipeline,
        ZImagePipeline,
    )

PROMPTS = ["a red square", "a blue circle", "a green car", "a yellow star"]


def _cfg_negative(pol: Any) -> str | None:
    """The policy's negative prompt when it runs CFG, else None (so the pipeline runs one pass too)."""
    return pol.negative_prompt if pol.do_cfg else None


@dataclass(frozen=True)
class Stock:
    """How to run a policy's stock pipeline on the policy's settings."""

    pipeline: type
    tiny_module: str  # the plugin module with build_tiny_pipeline(seed)
    call: Callable[[Any], dict[str, Any]]  # extra __call__ arguments taken from the policy
    output: str = "images"  # the pipeline output's field: images [B, C, H, W] or frames [B, T, C, H, W]
    prepare: Callable[[Any, Any], None] = lambda pipe, pol: None  # adjust the loaded pipeline to the policy
    builder: str = "build_tiny_pipeline"  # the tiny module's builder of this pipeline
    # (policy, records) -> __call__ arguments carrying the records' input images; None: text prompts only
    inputs: Callable[[Any, list[Prompt]], dict[str, Any]] | None = None
    # (pipe, policy, records, __call__ arguments) -> the output tensor, for a pipeline called its own way; None:
    # one batched pipe(prompt=..., **arguments)
    invoke: Callable[[Any, Any, list[Any], dict[str, Any]], torch.Tensor] | None = None
    # model folder -> extra from_pretrained arguments (components the stock loader cannot load here)
    load: Callable[[str], dict[str, Any]] | None = None
    # (policy, our initial latents) -> the pipeline's `latents=` (FLUX.2's pipelines take the patchified grid)
    latents: Callable[[Any, torch.Tensor], torch.Tensor] = lambda pol, z: z.clone()


def _qwen_prefix(pipe: Any, pol: Any) -> None:
    # the prompt-template prefix length the policy counted from its tokenizer (the pipeline hard-codes 34)
    pipe.prompt_template_encode_start_idx = pol.pipe.prompt_template_encode_start_idx


def _qwen_call(pol: Any) -> dict[str, Any]:
    return {"true_cfg_scale": pol.true_cfg_scale, "negative_prompt": _cfg_negative(pol)}


def _wan_call(pol: Any) -> dict[str, Any]:
    extra = {"guidance_scale": pol.guidance_scale, "negative_prompt": _cfg_negative(pol),
             "num_frames": pol.num_frames}
    if pol.transformer_2 is not None:
        extra["guidance_scale_2"] = pol.guidance_scale_2
    return extra


def _zimage_call(pol: Any) -> dict[str, Any]:
    # CFG on when guidance_scale > 0 (ZImagePipeline's rule); its negative prompt, a list as long as the batch,
    # defaults to empty prompts, which is the policy's default too
    if pol.negative_prompt:
        raise ValueError("benchmarks/rollout.py runs z-image with its default empty negative prompt only")
    return {"guidance_scale": pol.guidance_scale, "cfg_normalization": pol.cfg_normalization,
            "cfg_truncation": pol.cfg_truncation}


def _kontext_inputs(pol: Any, records: list[Prompt]) -> dict[str, Any]:
    # each source resized to the policy's size as the policy does (PIL Lanczos), no further resizing
    from PIL import Image

    images = []
    for r in records:
        with Image.open(r.images[0]) as im:
            images.append(im.convert("RGB").resize((pol.width, pol.height), Image.LANCZOS))
    return {"image": images, "max_area": pol.height * pol.width, "_auto_resize": False}


def edit_records(texts_: list[str], folder: Path, size: int = 32) -> list[Prompt]:
    """One record per text, each with its own source PNG (a square of the text's index colour on noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, text in enumerate(texts_):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = ((i * 67) % 256, (i * 131) % 256, 200)
        Image.fromarray(pixels).save(folder / f"source-{i}.png")
        out.append(Prompt(text, images=[folder / f"source-{i}.png"]))
    return out


def _qwen_edit_load(model: str) -> dict[str, Any]:
    # the processor without its video half (the stock loader wants torchvision for that)
    from flowfactory_qwen_image.edit import load_processor

    return {"processor": load_processor(Path(model) / "processor")}


def _qwen21_load(model: str) -> dict[str, Any]:
    from flowfactory_qwen_image.qwen21 import load_qwen21_processor

    return {"processor": load_qwen21_processor(Path(model) / "processor")}


def _qwen21_invoke(pipe: Any, pol: Any, prompts: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    # a prompt a call (a batch would pad the shorter prompts, which moves their images), without the key/value
    # cache the policy does not keep, no max_sequence_length (the pipeline has none); RGB of the RGBA images
    kwargs = {k: v for k, v in kwargs.items() if k != "max_sequence_length"}
    latents = kwargs.pop("latents")
    return torch.cat([pipe(prompt=t, latents=latents[i:i + 1], use_kv_cache=False, **kwargs).images[:, :3]
                      for i, t in enumerate(texts(prompts))])


def _qwen_edit_invoke(pipe: Any, pol: Any, records: list[Prompt], kwargs: dict[str, Any]) -> torch.Tensor:
    # at the policy's input-image areas; the editing pipelines keep every token (max_sequence_length is only
    # checked against 1024), take the negative prompt once per record, and the Plus one takes one prompt a call
    from PIL import Image

    from flowfactory_qwen_image.edit import pipeline_areas

    kwargs = {k: v for k, v in kwargs.items() if k != "max_sequence_length"}
    images = [[Image.open(p).convert("RGB") for p in r.images] for r in records]
    with pipeline_areas(pol.image_area, getattr(pol, "condition_image_area", None)):
        if isinstance(pipe, QwenImageEditPlusPipeline):
            latents = kwargs.pop("latents")
            return torch.cat([pipe(prompt=r.text, image=imgs, latents=latents[i:i + 1], **kwargs).images
                              for i, (r, imgs) in enumerate(zip(records, images, strict=True))])
        neg = kwargs.pop("negative_prompt")
        return pipe(prompt=texts(records), image=[imgs[0] for imgs in images],
                    negative_prompt=None if neg is None else [neg] * len(records), **kwargs).images


def _wan_i2v_invoke(pipe: Any, pol: Any, records: list[Prompt], kwargs: dict[str, Any]) -> torch.Tensor:
    # a record a call: the pipeline takes one image (and last_image) for its whole batch
    from PIL import Image

    latents = kwargs.pop("latents")
    out = []
    for i, r in enumerate(records):
        images = [Image.open(p).convert("RGB") for p in r.images]
        last = {"last_image": images[1]} if len(images) > 1 else {}
        out.append(pipe(prompt=r.text, image=images[0], latents=latents[i:i + 1], **last, **kwargs).frames)
    return torch.cat(out)


PIPELINES: dict[str, Stock] = {
    "flux": Stock(FluxPipeline, "flowfactory_flux.tiny", lambda pol: {"guidance_scale": pol.guidance_scale}),
    "flux-kontext": Stock(FluxKontextPipeline, "flowfactory_flux.tiny",
                          lambda pol: {"guidance_scale": pol.guidance_scale}, builder="build_tiny_kontext_pipeline",
                          inputs=_kontext_inputs),
    "flux2": Stock(Flux2Pipeline, "flowfactory_flux2.tiny", lambda pol: {"guidance_scale": pol.guidance_scale},
                   latents=lambda pol, z: pol.unpack(z)),
    "flux2-klein": Stock(Flux2KleinPipeline, "flowfactory_flux2.tiny",
                         lambda pol: {"guidance_scale": pol.guidance_scale},
                         builder="build_tiny_klein_pipeline", latents=lambda pol, z: pol.unpack(z)),
    "sd3": Stock(StableDiffusion3Pipeline, "flowfactory_sd3.tiny",
                 lambda pol: {"guidance_scale": pol.guidance_scale, "negative_prompt": _cfg_negative(pol)}),
    "qwen-image": Stock(QwenImagePipeline, "flowfactory_qwen_image.tiny", _qwen_call,
                        prepare=_qwen_prefix),
    "qwen-image-2.1": Stock(QwenImage21Pipeline, "flowfactory_qwen_image.tiny", _qwen_call,
                            builder="build_tiny_qwen21_pipeline", invoke=_qwen21_invoke, load=_qwen21_load),
    "qwen-image-edit": Stock(QwenImageEditPipeline, "flowfactory_qwen_image.tiny", _qwen_call, prepare=_qwen_prefix,
                             builder="build_tiny_edit_pipeline", inputs=lambda pol, records: {},
                             invoke=_qwen_edit_invoke, load=_qwen_edit_load),
    "qwen-image-edit-plus": Stock(QwenImageEditPlusPipeline, "flowfactory_qwen_image.tiny", _qwen_call,
                                  prepare=_qwen_prefix, builder="build_tiny_edit_plus_pipeline",
                                  inputs=lambda pol, records: {}, invoke=_qwen_edit_invoke, load=_qwen_edit_load),
    "wan": Stock(WanPipeline, "flowfactory_wan.tiny", _wan_call, output="frames"),
    "wan-i2v": Stock(WanImageToVideoPipeline, "flowfactory_wan.tiny", _wan_call, output="frames",
                     builder="build_tiny_i2v_pipeline", inputs=lambda pol, records: {}, invoke=_wan_i2v_invoke),
    "z-image": Stock(ZImagePipeline, "flowfactory_zimage.tiny", _zimage_call),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="flux", choices=sorted(PIPELINES), help="which policy to benchmark")
    p.add_argument("--steps", type=int, default=10, help="ODE / inference steps")
    p.add_argument("--batch", type=int, default=16, help="images per rollout")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="tiny preset seed, and noise seeds")
    p.add_argument("--model", default=None, help="a pipeline folder or hub id instead of the tiny preset")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the policy's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the policy's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lora", type=int, default=0,
                   help="LoRA rank of the policy (0: full finetune); adds the adapter's cost to our side only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options: dict = {"model": args.model} if args.model else {"preset": "tiny"}
    options["dtype"] = args.dtype
    if args.lora:  # B starts at zero, so the pipeline side (no adapter) computes the same function
        options["lora"] = {"rank": args.lora}
    if args.height:
        options["height"] = args.height
    if args.width:
        options["width"] = args.width
    spec = load(strict=True).registry.get("policy", args.policy)
    stock = PIPELINES[args.policy]
    policy = spec.create(options, BuildContext(seed=args.seed, device=device))

    # the stock pipeline in the policy's dtypes (a full finetune keeps its transformer in float32)
    dtypes = {"transformer": policy.compute_dtype, "default": getattr(torch, args.dtype)}
    if args.policy in ("wan", "wan-i2v"):
        dtypes["transformer_2"] = policy.compute_dtype
    if args.model:
        pipe = stock.pipeline.from_pretrained(args.model, dtype=dtypes, **(stock.load(args.model) if stock.load else {}))
    else:
        pipe = getattr(importlib.import_module(stock.tiny_module), stock.builder)(args.seed)
        for name, part in pipe.components.items():
            want = dtypes.get(name, dtypes["default"])
            if isinstance(part, torch.nn.Module) and part.dtype != want:
                torch.nn.Module.to(part, want)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    stock.prepare(pipe, policy)

    prompts: list[Any] = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    extra: dict[str, Any] = {}
    if stock.inputs is not None:  # an editing policy: records with source images, which both sides encode
        sources = tempfile.TemporaryDirectory(prefix="ff-rollout-")  # removed when main returns
        prompts = edit_records(prompts, Path(sources.name))
        extra = stock.inputs(policy, prompts)
    gens = [torch.Generator().manual_seed(args.seed * 100_000 + i) for i in range(args.batch)]
    z = policy.noise(gens)
    sampler = ODESampler(args.steps)

    def ours() -> torch.Tensor:
        cond = policy.encode(prompts)
        traj = sampler.rollout(policy, cond, z, gens, keep="final", deterministic=True)
        return policy.decode(traj.final)

    def theirs() -> torch.Tensor:
        kwargs = dict(height=policy.height, width=policy.width, num_inference_steps=args.steps,
                      max_sequence_length=policy.max_sequence_length, latents=stock.latents(policy, z),
                      output_type="pt",
                      **stock.call(policy), **extra)
        if stock.invoke is not None:
            return stock.invoke(pipe, policy, prompts, kwargs)
        return getattr(pipe(prompt=texts(prompts), **kwargs), stock.output)

    times: dict[str, list[float]] = {"ours": [], "pipeline": []}
    images: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, fn in (("ours", ours), ("pipeline", theirs)):
            images[name] = fn().float().cpu()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("pipeline", theirs)):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)

        cond = policy.encode(prompts)
        sigma = torch.full((args.batch,), 0.5, device=device)
        policy.velocity(z, sigma, cond)
        calls = []
        for _ in range(max(3, args.repeats)):
            sync(device)
            t0 = time.perf_counter()
            policy.velocity(z, sigma, cond)
            sync(device)
            calls.append(time.perf_counter() - t0)

    base = sum(p.numel() for n, p in policy.transformer.named_parameters() if "lora_" not in n)
    ours_s, pipe_s = statistics.median(times["ours"]), statistics.median(times["pipeline"])
    diff = float((images["ours"] - images["pipeline"]).abs().max())
    print(f"{args.policy} rollout benchmark: {'tiny preset' if not args.model else args.model}, "
          f"{policy.height}x{policy.width}, steps={args.steps}, batch={args.batch}, dtype={args.dtype}, "
          f"device={device}, torch threads={torch.get_num_threads()}, repeats={args.repeats} (alternating)")
    print(f"transformer parameters (without LoRA): {base:,}; policy: "
          f"{f'LoRA rank {args.lora}' if args.lora else 'full finetune'}")
    print(f"ours     (encode + ODESampler rollout + decode): median {ours_s:.3f} s  "
          f"[{', '.join(f'{t:.3f}' for t in times['ours'])}]")
    print(f"pipeline ({stock.pipeline.__name__}.__call__, output_type=pt): median {pipe_s:.3f} s  "
          f"[{', '.join(f'{t:.3f}' for t in times['pipeline'])}]")
    print(f"ratio ours / pipeline: {ours_s / pipe_s:.3f}  (target <= 1.0)")
    print(f"max abs image difference: {diff:.2e}")
    print(f"one velocity call at batch {args.batch}: median {statistics.median(calls) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
