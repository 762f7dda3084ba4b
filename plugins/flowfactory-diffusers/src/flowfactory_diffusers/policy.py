"""What every diffusers transformer policy shares, whatever the model: LoRA through peft under the run's seed,
full finetune with a frozen reference copy, the reference view, trainable parameters, saving in diffusers
format, FSDP block classes from `_no_split_modules`, dtype resolution and pipeline loading.

A model plugin subclasses `DiffusersPolicyBase` and adds only what is its own (encoders, packing, schedule,
velocity, decode). This module imports torch, diffusers and peft at its top: import it from build functions only.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from flowfactory.errors import FlowFactoryError
from flowfactory.registry import BuildContext

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TEXT_ENCODER = "text_encoder"  # diffusers names a pipeline's text encoders text_encoder, text_encoder_2, ...
SMALL_FILE = 16 << 20  # files up to this size (configs, tokenizers) are fingerprinted by content, not by stat


@dataclass
class PipelineSource:
    """Where a loaded pipeline came from: what the conditioning fingerprint names and what builds the text
    encoders that `load_pipeline` deferred (they load on the first encode, so a run whose every prompt is in
    the on-disk conditioning cache never loads them)."""

    model: str  # the `model` option: hub id or folder
    revision: str | None
    folder: Path  # the local folder holding model_index.json (a hub id's cached snapshot)
    text_encoder_dtype: torch.dtype
    policy: str = "diffusers"  # the policy name, for errors
    deferred: dict[str, tuple[str, str]] = field(default_factory=dict)  # component -> (library, class), unloaded

    def fingerprint(self, components: Sequence[str] = ()) -> dict[str, Any]:
        """The model, its revision, the text encoders' and tokenizers' classes and files (and those of the other
        `components` encode reads, e.g. the VAE of an editing model): small files (configs, vocabularies) by
        content hash, weights by size, mtime and the name a symlink points to (the hub's blob names are content
        hashes), so a re-saved or updated encoder gets a new fingerprint."""
        index = json.loads((self.folder / "model_index.json").read_text())
        parts = sorted(n for n in index if n.startswith((TEXT_ENCODER, "tokenizer")) or n in components)
        files = []
        for name in parts:
            for f in sorted((self.folder / name).rglob("*")) if (self.folder / name).is_dir() else []:
                if not f.is_file():
                    continue
                st = f.stat()
                files.append([f.relative_to(self.folder).as_posix(), st.st_size,
                              _file_digest(f) if st.st_size <= SMALL_FILE else
                              [st.st_mtime_ns, Path(os.path.realpath(f)).name]])
        return {"model": self.model, "revision": self.revision, "classes": {n: index[n] for n in parts},
                "files": files}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _module_digest(module: nn.Module) -> str:
    """sha256 of a module's parameter and buffer names, dtypes, shapes and bytes (for in-memory models only)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of a tokenizer's full serialisation (vocabulary, merges or scores, normalisers, special tokens), less
    its padding and truncation settings: those are the state of the last call (a padded call sets them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        text = json.dumps(serialised, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps({"class": type(tokenizer).__name__, "max": getattr(tokenizer, "model_max_length", None),
                        "special": getattr(tokenizer, "special_tokens_map", None)}, sort_keys=True, default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()


class LoraSettings(Protocol):
    """The LoRA fields a policy reads (`flowfactory_diffusers.options.LoraOptions` has them)."""

    rank: int
    alpha: float | None
    target_modules: list[str]
    dropout: float
    init: str


class DiffusersPolicyBase:
    """The model-independent half of a diffusers policy: training setup, reference view, parameters, saving.

    Subclasses set `name` (the registered policy name, used in errors) and `lora_target_hint` (the module
    names to suggest when a LoRA target matches nothing), and call this class's constructor with the pipeline
    and the names of the networks it trains (`trained`: one transformer, or Wan 2.2's two experts); it does the
    whole set-up in order (the pipeline attached, the subclass's `_validate`, LoRA or full finetune with its
    frozen copies, the move to the device). Their `sigmas` compute the model's own schedule through
    `_cached_sigmas`. `trained` maps each trained network's pipeline name to its raw diffusers model (config,
    adapters, saving); `transformer` is the first of them; `module` is what velocity calls (`_combine` of the
    trained networks: the transformer itself when there is one) and may be replaced by the training loop with
    its Accelerate wrapper.
    """

    name: ClassVar[str] = "diffusers"
    lora_target_hint: ClassVar[str] = ""
    # default LoRA targets that some models of this policy lack (Wan 2.2 I2V has no image cross-attention):
    # left out where no module matches, instead of refused
    lora_optional_targets: ClassVar[tuple[str, ...]] = ()
    # attributes whose values change what `encode` returns; they enter `conditioning_fingerprint`
    encode_options: ClassVar[tuple[str, ...]] = ("max_sequence_length",)
    # pipeline components besides the text encoders and tokenizers that `encode` runs (an editing model's VAE,
    # which encodes the input image); their weights enter `conditioning_fingerprint` too
    encode_components: ClassVar[tuple[str, ...]] = ()

    pipe: Any
    vae: nn.Module
    device: torch.device
    height: int
    width: int
    max_sequence_length: int
    compute_dtype: torch.dtype
    transformer: nn.Module
    trained: dict[str, nn.Module]
    lora: LoraSettings | None
    module: Any
    fsdp_block_classes: tuple[type, ...]

    def __init__(self, pipe: Any, *, height: int, width: int, max_sequence_length: int,
                 trained: Sequence[str] = ("transformer",), frozen: Sequence[nn.Module | None] | None = None,
                 scheduler: Any = None, lora: LoraSettings | None = None, gradient_checkpointing: bool = False,
                 reference: bool = True, device: torch.device | str | None = None, seed: int = 0,
                 offload_text_encoders: bool = False, vae_decode_chunk: int | None = None) -> None:
        """Attach `pipe` (`_attach`), let the subclass check its options against it (`_validate`), set up
        training on the pipeline components named in `trained` (`_setup_training`: LoRA on each, A drawn from
        seed + its index, or a full finetune with a frozen reference copy of each when `reference`), freeze
        `frozen` (default: every other torch component of the pipeline) and move everything to `device`.

        A subclass sets what its `to` or `_validate` reads before calling this, and what needs the attached
        pipeline (the scheduler, sizes) after it."""
        self._attach(pipe, height=height, width=width, max_sequence_length=max_sequence_length, device=device,
                     scheduler=scheduler, offload_text_encoders=offload_text_encoders,
                     vae_decode_chunk=vae_decode_chunk)
        self._validate(pipe)
        missing = [n for n in trained if getattr(pipe, n, None) is None]
        if not trained or missing:
            raise FlowFactoryError(f"{self.name} policy: the pipeline has no {missing or 'trained network'} to train")
        if frozen is None:
            frozen = [m for n, m in pipe.components.items() if n not in trained and isinstance(m, nn.Module)]
        self._setup_training({n: getattr(pipe, n) for n in trained}, frozen, lora=lora, seed=seed,
                             gradient_checkpointing=gradient_checkpointing, reference=reference)
        self.to(self.device)

    def _validate(self, pipe: Any) -> None:
        """Check the options against the attached pipeline before anything is set up (e.g. `_check_multiple`),
        and derive what depends on both (e.g. `latent_shape`). Nothing by default."""

    def _combine(self, networks: Mapping[str, nn.Module]) -> nn.Module:
        """The module velocity calls, from the trained networks (or their frozen copies), in `trained`'s order:
        the network itself when there is one; a model with several overrides this (Wan: its experts)."""
        if len(networks) != 1:
            raise TypeError(f"{type(self).__name__} trains {list(networks)}: it must override _combine to say how "
                            f"velocity calls them")
        return next(iter(networks.values()))

    def _attach(self, pipe: Any, *, height: int, width: int, max_sequence_length: int,
                device: torch.device | str | None, scheduler: Any = None, offload_text_encoders: bool = False,
                vae_decode_chunk: int | None = None) -> None:
        """What every policy keeps of its pipeline: the pipeline and its VAE, the sample size, the device (CPU
        when None), the transformer's dtype as the compute dtype, and a private scheduler (`scheduler`, else a
        copy of the pipeline's: `set_timesteps` mutates it) with an empty sigma cache; the memory options
        (text encoders on the CPU between encodes, VAE decode in chunks) and the pipeline's `PipelineSource`
        (set by `load_pipeline`; None for an in-memory pipeline)."""
        if vae_decode_chunk is not None and vae_decode_chunk < 1:
            raise FlowFactoryError(f"{self.name} policy option vae_decode_chunk={vae_decode_chunk}: must be >= 1, "
                                   f"or null to decode the whole batch at once")
        self.pipe = pipe
        self.offload_text_encoders = offload_text_encoders
        self.vae_decode_chunk = vae_decode_chunk
        self.source: PipelineSource | None = getattr(pipe, "_flowfactory_source", None)
        self.vae = pipe.vae
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.compute_dtype = pipe.transformer.dtype  # the base weights'; LoRA parameters are float32
        self._scheduler = scheduler if scheduler is not None else type(pipe.scheduler).from_config(
            pipe.scheduler.config)
        self._sigmas: dict[int, torch.Tensor] = {}

    def _check_multiple(self, factor: int, why: str) -> None:
        """Raise the options error naming height/width and the nearest valid sizes unless both are multiples of
        `factor`; `why` says where the factor comes from."""
        if self.height % factor or self.width % factor:
            raise FlowFactoryError(
                f"{self.name} policy options height={self.height}, width={self.width}: both must be multiples of "
                f"{factor} ({why}); try height: {max(factor, self.height // factor * factor)}, "
                f"width: {max(factor, self.width // factor * factor)}")

    def _cached_sigmas(self, steps: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()`'s schedule for `steps`, computed once per step count, as float32 on the CPU (a copy)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps not in self._sigmas:
            self._sigmas[steps] = compute().detach().to(torch.float32).cpu()
        return self._sigmas[steps].clone()

    def _dynamic_shift_mu(self, image_seq_len: int, max_shift: float = 1.15) -> float:
        """The resolution-dependent shift mu of the scheduler's config for `image_seq_len` image tokens (as the
        pipelines' `calculate_shift`); `max_shift` is the default when the config has none."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self._scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", max_shift))

    def _row_sigmas(self, x: torch.Tensor, sigma: torch.Tensor | float, what: str) -> torch.Tensor:
        """`sigma` as float32 [B] on x's device, after checking x's per-sample shape against `latent_shape`
        (`what` names the latents expected in the error, e.g. "latents of 512x512 images")."""
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name} velocity: x has per-sample shape {tuple(x.shape[1:])}, expected "
                             f"{self.latent_shape} ({what})")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma

    def to(self, device: torch.device | str) -> Any:
        """Move every part (and the reference copy) to `device`; with `offload_text_encoders` the text encoders
        stay on the CPU (they visit the device inside `text_encoders()`)."""
        self.device = torch.device(device)
        for name, part in self.pipe.components.items():
            if isinstance(part, nn.Module):
                part.to(self._text_encoder_home() if name.startswith(TEXT_ENCODER) else self.device)
        self._move_reference(self.device)
        return self

    # -- text encoders: deferred loading, CPU offload, the conditioning fingerprint -----------------------------

    def _text_encoder_home(self) -> torch.device:
        """Where the text encoders live between encodes: the CPU with `offload_text_encoders`, else the device."""
        return torch.device("cpu") if self.offload_text_encoders else self.device

    def text_encoder_modules(self) -> dict[str, nn.Module]:
        """The pipeline's loaded text encoders by component name (deferred ones are absent until the first encode)."""
        return {n: m for n, m in self.pipe.components.items() if n.startswith(TEXT_ENCODER) and isinstance(m, nn.Module)}

    @contextmanager
    def text_encoders(self) -> Iterator[None]:
        """Wrap every encode in this: the deferred text encoders load first (once), and with
        `offload_text_encoders` the encoders move to the device for the block and back to the CPU after it
        (emptying the CUDA cache), so between encodes they hold no device memory."""
        self._load_deferred_text_encoders()
        if not self.offload_text_encoders:
            yield
            return
        self._move_text_encoders(self.device)
        try:
            yield
        finally:
            self._move_text_encoders(torch.device("cpu"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _move_text_encoders(self, device: torch.device) -> None:
        for module in self.text_encoder_modules().values():
            module.to(device)

    def _load_deferred_text_encoders(self) -> None:
        """Build the text encoders `load_pipeline` left out, frozen, in their dtype, at their home device."""
        src = self.source
        if src is None or not src.deferred:
            return
        for name, (library, class_name) in list(src.deferred.items()):
            try:
                cls = getattr(importlib.import_module(library), class_name)
                with quiet_loading():
                    module = cls.from_pretrained(str(src.folder), subfolder=name, dtype=src.text_encoder_dtype)
            except (OSError, ImportError, AttributeError, ValueError) as exc:
                raise FlowFactoryError(
                    f"{self.name} policy option model={src.model!r}: its text encoder {name} ({library}."
                    f"{class_name}) could not be loaded from {src.folder}: {exc}") from exc
            module.requires_grad_(False).eval().to(self._text_encoder_home())
            self.pipe.register_modules(**{name: module})
            del src.deferred[name]

    def _text_encoder_dtype(self) -> torch.dtype | None:
        if self.source is not None:
            return self.source.text_encoder_dtype
        return next((m.dtype for m in self.text_encoder_modules().values()), None)

    def conditioning_fingerprint(self) -> str | None:
        """sha256 of everything that decides `encode`'s output: the policy class and the versions of its code,
        the text encoders and tokenizers and the `encode_components` (their files for a `model`, their weights and
        vocabularies for an in-memory pipeline such as the tiny preset), their dtype, the device type and every
        attribute named in `encode_options` (sequence length, negative prompt, CFG, an input image's size). A
        changed option gives new cache keys, so an on-disk conditioning cache is never read for the wrong model or
        settings. Deferred encoders stay unloaded."""
        import diffusers
        import transformers

        top = type(self).__module__.split(".")[0]
        ident: dict[str, Any] = {
            "policy": f"{type(self).__module__}.{type(self).__qualname__}",
            "versions": [getattr(importlib.import_module(top), "__version__", None), torch.__version__,
                         diffusers.__version__, transformers.__version__],
            "dtype": str(self._text_encoder_dtype()), "device": self.device.type,
            "options": {n: getattr(self, n) for n in self.encode_options},
        }
        if self.source is not None:
            ident["source"] = self.source.fingerprint(self.encode_components)
        else:  # built in memory (the tiny preset): the modules themselves
            ident["modules"] = {n: [type(m).__name__, _module_digest(m)] for n, m in self.text_encoder_modules().items()}
            ident["modules"].update({n: [type(m).__name__, _module_digest(m)]
                                     for n in self.encode_components if (m := self.pipe.components.get(n)) is not None})
            ident["tokenizers"] = {n: _tokenizer_digest(t) for n, t in self.pipe.components.items()
                                   if n.startswith("tokenizer") and t is not None}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    def _vae_decode(self, latents: torch.Tensor, post: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`post(vae.decode(latents))`, `vae_decode_chunk` samples at a time (all at once when None): the
        decoder's activations for one chunk at a time, each chunk post-processed before the next."""
        n = self.vae_decode_chunk or max(1, latents.shape[0])
        parts = [post(self.vae.decode(latents[i:i + n], return_dict=False)[0])
                 for i in range(0, latents.shape[0], n)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _setup_training(self, trained: nn.Module | Mapping[str, nn.Module], frozen: Sequence[nn.Module | None], *,
                        lora: LoraSettings | None, seed: int, gradient_checkpointing: bool,
                        reference: bool = True) -> None:
        """Freeze `frozen`; on each trained network (a module: the pipeline's `transformer`) add a LoRA adapter
        (A drawn from seed + its index) or, for a full finetune whose run uses the reference view, keep a frozen
        copy (`reference=False` saves the memory of a second copy of the weights); set `trained` and `module`.
        The constructor calls this; a subclass does not."""
        networks = {"transformer": trained} if isinstance(trained, nn.Module) else dict(trained)
        self.trained = networks
        self.transformer = next(iter(networks.values()))
        self.lora = lora
        self.keeps_reference = reference or lora is not None  # LoRA's reference (adapters off) costs nothing
        for part in frozen:
            if part is not None:  # None: a text encoder deferred until the first encode (frozen when it loads)
                part.requires_grad_(False).eval()
        self.fsdp_block_classes = block_classes(self.transformer)
        copies: dict[str, nn.Module] = {}
        for index, (name, net) in enumerate(networks.items()):
            if lora is not None:
                add_lora(net, lora, seed + index, policy=self.name, hint=self.lora_target_hint,
                         exclude=self._dead_modules(net), optional=self.lora_optional_targets)
            else:
                net.requires_grad_(True)
                for dead in self._dead_modules(net):  # would never get a gradient: not trainable
                    net.get_submodule(dead).requires_grad_(False)
                if reference:  # the pre-training policy for `reference()`; made before any Accelerate/FSDP wrapping
                    copies[name] = copy.deepcopy(net).requires_grad_(False).eval()
            if gradient_checkpointing:
                net.enable_gradient_checkpointing()
            net.train()  # only LoRA dropout depends on it; these transformers have no other train-time behaviour
        self._frozen_copy: nn.Module | None = self._combine(copies) if copies else None
        self.module = self._combine(networks)
        self._in_reference = False

    def _check_reference(self) -> None:
        if not self.keeps_reference:
            raise FlowFactoryError(
                f"{self.name} policy: reference() needs the frozen copy of the initial transformer, which this full "
                f"finetune did not keep because the run's algorithm declared it needs no reference (e.g. kl_beta: "
                f"0). Build the policy with BuildContext(reference=True), or use LoRA, whose reference is free.")

    def _dead_modules(self, transformer: nn.Module) -> list[str]:
        """Full names of modules whose output never reaches the velocity: no adapter (LoRA), frozen (full)."""
        return []

    def _network(self) -> nn.Module:
        """What velocity calls: the frozen copy inside a full finetune's `reference()`, else `module`."""
        if self._in_reference and self._frozen_copy is not None:
            return self._frozen_copy
        return self.module

    def _move_reference(self, device: torch.device) -> None:
        if self._frozen_copy is not None:
            self._frozen_copy.to(device)

    def frozen_copies(self) -> list[nn.Module]:
        """A full finetune's frozen reference copy (when kept), which the loop shards like `module` under FSDP."""
        return [self._frozen_copy] if self._frozen_copy is not None else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights (float32), or every parameter (but dead modules') for a full finetune, of each trained
        network in order.

        Looked up on each call, not cached: FSDP replaces parameters when it shards the module, and
        `reference()` switches the adapters' requires_grad off while it runs."""
        if self.lora is None:
            return [p for net in self.trained.values() for p in net.parameters() if p.requires_grad]
        return [p for net in self.trained.values() for name, p in net.named_parameters() if "lora_" in name]

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The pre-training policy under no grad: adapters disabled on every trained network (LoRA) or the
        frozen copies (full)."""
        if self._in_reference:
            raise RuntimeError(f"{type(self).__name__}.reference() is not re-entrant")
        self._check_reference()
        self._in_reference = True
        lora_off = self.lora is not None
        try:
            with torch.no_grad():
                if lora_off:
                    for net in self.trained.values():
                        net.disable_adapters()
                yield
        finally:
            if lora_off:
                for net in self.trained.values():
                    net.enable_adapters()
            self._in_reference = False

    def _save_with_notes(self, directory: str, pipeline_cls: type, transformer_cls: type, policy: str,
                         info: dict[str, Any], call_args: str = "", inputs: str = "prompt", *,
                         call: str | None = None) -> None:
        """Save the weights (`_save_weights`) and beside them `flowfactory.json` (`info` plus policy, kind and
        base) and a README with the diffusers code that loads them, every trained network included; the README
        calls `image = pipe(<inputs>, <call_args>).images[0]` (`inputs`: "prompt", or e.g. "image=source,
        prompt=prompt" for an editing pipeline), or the line `call` (e.g. a video pipeline's)."""
        out = Path(directory)
        kind = self._save_weights(out, pipeline_cls)
        pipe_name, tr_name = pipeline_cls.__name__, transformer_cls.__name__
        first, *rest = self.trained
        if kind == "lora":
            load = (f"pipe = {pipe_name}.from_pretrained(BASE, dtype=torch.bfloat16)\n"
                    f"pipe.load_lora_weights({str(out)!r})")
            load += "".join(f"\npipe.load_lora_weights({str(out / n)!r}, load_into_{n}=True)" for n in rest)
        else:
            load = "".join(f"{n} = {tr_name}.from_pretrained({str(out / n)!r}, dtype=torch.bfloat16)\n"
                           for n in self.trained)
            parts = ", ".join(f"{n}={n}" for n in self.trained)
            load += f"pipe = {pipe_name}.from_pretrained(BASE, {parts}, dtype=torch.bfloat16)"
        imports = ", ".join(sorted((pipe_name, tr_name)))
        call = call if call is not None else f"image = pipe({inputs}, {call_args}).images[0]"
        write_notes(out, {"policy": policy, "kind": kind, **info,
                          "base": self.pipe.config.get("_name_or_path") or None},
                    f"# flowfactory {policy} policy ({kind})\n\nTrained with flowfactory. Load with diffusers, BASE "
                    f"being the base {pipe_name} (hub id or folder):\n\n```python\nimport torch\n"
                    f"from diffusers import {imports}\n{load}\n{call}\n```\n")

    def _save_weights(self, out: Path, pipeline_cls: type) -> str:
        """LoRA: `pipeline_cls.save_lora_weights` of the first trained network into `out`, of each other one into
        `out/<its name>` (diffusers loads it with `load_into_<name>=True`); full: `out/<name>` model folders.
        Returns "lora" or "full"."""
        out.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            for index, (name, net) in enumerate(self.trained.items()):
                save_lora(pipeline_cls, net, out if index == 0 else out / name)
            return "lora"
        for name, net in self.trained.items():
            net.save_pretrained(out / name)
        return "full"


def add_lora(transformer: nn.Module, lora: LoraSettings, seed: int, *, policy: str, hint: str,
             exclude: Sequence[str] = (), optional: Sequence[str] = ()) -> None:
    """Inject a peft LoRA adapter (A drawn from `seed`, B zero), trainable in float32; freeze the rest.

    `exclude`: full module names left without an adapter even though they match a target. `optional`: targets
    dropped when they match no module (any other target that matches nothing is an error)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    names = [name for name, _ in transformer.named_modules()]
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown := [t for t in missing if t not in optional]:
        raise FlowFactoryError(
            f"{policy} policy option lora.target_modules: {unknown} match no module of the transformer; {hint}")
    targets = [t for t in lora.target_modules if t not in missing]
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
        target_modules=targets, lora_dropout=lora.dropout,
        init_lora_weights=True if lora.init == "default" else "gaussian",
        exclude_modules=list(exclude) or None,
    )
    with torch.random.fork_rng(devices=[]):  # A's init draws from the global RNG: make it the run's seed
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # adapters train in float32 whatever the base dtype
            p.requires_grad_(True)


def save_lora(pipeline_cls: type, transformer: nn.Module, out: Path) -> None:
    """The transformer's adapter as a diffusers LoRA file that `pipeline.load_lora_weights(out)` reads.

    The saved adapter config names the adapted modules in full instead of suffixes plus `exclude_modules`
    (dead modules): diffusers hands the config to peft, which targets the state dict's modules and would warn
    on every load that the exclusions excluded nothing."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}
    config = transformer.peft_config["default"].to_dict()
    if config.get("exclude_modules"):
        config["target_modules"] = sorted(n for n, m in transformer.named_modules() if isinstance(m, LoraLayer))
        config["exclude_modules"] = None
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=state, transformer_lora_adapter_metadata=config)


def write_notes(out: Path, info: dict[str, Any], readme: str) -> None:
    """`flowfactory.json` (what was trained, how) and a README.md with the diffusers loading code."""
    (out / "flowfactory.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(readme)


def block_classes(transformer: nn.Module) -> tuple[type, ...]:
    """The classes named by diffusers' `_no_split_modules`, found in the module tree."""
    names = list(getattr(transformer, "_no_split_modules", None) or [])
    found: dict[str, type] = {}
    for m in transformer.modules():
        if type(m).__name__ in names:
            found.setdefault(type(m).__name__, type(m))
    if not found:
        raise FlowFactoryError(f"{type(transformer).__name__} declares no block classes in _no_split_modules "
                               f"({names}); FSDP would not know what to wrap")
    return tuple(found[n] for n in names if n in found)


def resolve_dtype(option: str | None, ctx: BuildContext, *, tiny: bool) -> torch.dtype:
    """The frozen parts' dtype: the policy option, else the run's dtype, else float32 (tiny) / bfloat16 (real)."""
    if option is not None:
        return DTYPES[option]
    if ctx.dtype is not None:
        return DTYPES[ctx.dtype] if isinstance(ctx.dtype, str) else ctx.dtype
    return torch.float32 if tiny else torch.bfloat16


def cast_parts(parts: Iterable[tuple[nn.Module, torch.dtype]]) -> None:
    """Cast each module to its dtype in place (nn.Module.to: diffusers' own .to warns about fp32 modules)."""
    for part, want in parts:
        if part.dtype != want:
            nn.Module.to(part, want)


def dtype_keyword() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype`; use the name the installed one takes."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


TRANSFORMERS = ("transformer", "transformer_2")  # pipeline components that are trained (Wan 2.2 has two)


def load_or_build(options: Any, ctx: BuildContext, pipeline_cls: type, tiny: Callable[[], Any], *, policy: str,
                  example: str, gated: str = "",
                  components: Mapping[str, Callable[[Path], Any]] | None = None) -> tuple[Any, bool]:
    """The policy's pipeline and whether it is the tiny preset: `tiny()` for `preset: tiny`, else
    `pipeline_cls.from_pretrained(options.model)` (errors name the `model` option; `components`: parts the policy
    loads itself; see `load_pipeline`).

    Dtypes: frozen parts (text encoders, VAE) get `resolve_dtype`; the transformer(s) the same under LoRA (the
    base weights; adapters are float32), float32 for a full finetune (master weights; mixed precision is
    Accelerate's)."""
    is_tiny = options.preset == "tiny"
    dtype = resolve_dtype(options.dtype, ctx, tiny=is_tiny)
    transformer_dtype = dtype if options.lora is not None else torch.float32
    if is_tiny:
        pipe = tiny()  # float32
        cast_parts([(part, transformer_dtype if name in TRANSFORMERS else dtype)
                    for name, part in pipe.components.items() if isinstance(part, nn.Module)])
        return pipe, True
    assert options.model is not None  # the options validator guarantees one of model/preset
    dtypes = {**dict.fromkeys(TRANSFORMERS, transformer_dtype), "default": dtype}
    return load_pipeline(pipeline_cls, options.model, options.revision, dtypes, policy=policy, example=example,
                         gated=gated, defer_text_encoders=True, components=components), False


def training_kwargs(options: Any, ctx: BuildContext) -> dict[str, Any]:
    """The constructor arguments every diffusers policy takes from its options and the build context."""
    return dict(lora=options.lora, gradient_checkpointing=options.gradient_checkpointing, reference=ctx.reference,
                device=ctx.device, seed=ctx.seed, offload_text_encoders=options.offload_text_encoders,
                vae_decode_chunk=options.vae_decode_chunk)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars and no info/warning logs from diffusers and transformers while a pipeline loads
    ("Loading pipeline components...", "Loading checkpoint shards"): they would interleave with `ff run`'s
    own output. Errors still show; the previous settings come back afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def load_pipeline(pipeline_cls: type, model: str, revision: str | None, dtype: dict[str, torch.dtype], *,
                  policy: str, example: str, gated: str = "", defer_text_encoders: bool = False,
                  components: Mapping[str, Callable[[Path], Any]] | None = None) -> Any:
    """`pipeline_cls.from_pretrained` with errors that name the policy's `model` option and the fix.

    `example` is a hub id to suggest; `gated` an extra hint for access errors (e.g. "FLUX.1-dev is gated").
    A hub id is first fetched (or found in the cache) as a snapshot folder, which is then loaded. The pipeline
    carries a `PipelineSource` (`_flowfactory_source`); with `defer_text_encoders` its text encoders are left
    out (`text_encoder=None`, ...) and recorded there, for the policy to load on its first encode. `components`
    maps a component's name to a function of its folder that loads it, for parts the policy loads its own way
    (e.g. a processor whose stock loader needs a package for inputs the policy never gives it)."""
    cls_name = pipeline_cls.__name__
    path = Path(os.path.expanduser(model))
    is_local = path.exists() or not HUB_ID.match(model)
    if is_local:
        if not path.is_dir():
            raise FlowFactoryError(
                f"{policy} policy option model={model!r}: no such folder. Give a folder written by "
                f"{cls_name}.save_pretrained (it holds model_index.json) or a hub id such as {example}.")
        if not (path / "model_index.json").is_file():
            raise FlowFactoryError(
                f"{policy} policy option model={model!r}: the folder has no model_index.json, so it is not a "
                f"diffusers pipeline; point it at the folder {cls_name}.save_pretrained wrote.")
    try:
        with quiet_loading():
            folder = path if is_local else Path(pipeline_cls.download(model, revision=revision))
            index = json.loads((folder / "model_index.json").read_text())
            deferred = {name: (str(spec[0]), str(spec[1])) for name, spec in index.items()
                        if defer_text_encoders and name.startswith(TEXT_ENCODER) and isinstance(spec, list)
                        and len(spec) == 2 and spec[0] is not None and spec[1] is not None}
            own = {name: load(folder / name) for name, load in (components or {}).items()}
            pipe = pipeline_cls.from_pretrained(str(folder), **dict.fromkeys(deferred), **own,
                                                **{dtype_keyword(): dtype})
        if not is_local:
            pipe.register_to_config(_name_or_path=model)  # the hub id, not the cache folder, names the base
        pipe._flowfactory_source = PipelineSource(model, revision, folder.resolve(), dtype["default"], policy,
                                                  deferred)
        return pipe
    except OSError as exc:
        raise FlowFactoryError(
            f"{policy} policy option model={model!r}{f' (revision {revision!r})' if revision else ''} could not be "
            f"loaded: {exc}. Check the id, your network and Hugging Face login{f' ({gated})' if gated else ''}, or "
            f"give a local folder.") from exc
