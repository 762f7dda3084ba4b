"""A tiny pure-torch policy for tests of core code (samplers, loop, optimizers) with no diffusers.

It works in pixel space: latents are images in [-1, 1], `decode` maps them to [0, 1]. The velocity is a
small conv net conditioned on sigma and a bag-of-characters prompt embedding (FiLM), big enough to learn
brightness or colour in a few epochs on a CPU.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flowfactory.prompts import Prompt, texts
from flowfactory.types import Conditioning


class ToyVelocityNet(nn.Module):
    def __init__(self, channels: int = 3, hidden: int = 32, cond_dim: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.film = nn.Linear(cond_dim + 1, 2 * hidden)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x))
        scale, shift = self.film(torch.cat([text, sigma[:, None]], dim=1)).chunk(2, dim=1)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h)


class ToyPolicy:
    """Implements `flowfactory.types.Policy` with a ~20k-parameter conv net."""

    fsdp_block_classes: tuple[type, ...] = (ToyVelocityNet,)

    def __init__(self, seed: int = 0, size: int = 8, channels: int = 3, hidden: int = 32, cond_dim: int = 16,
                 shift: float = 1.0, device: torch.device | str | None = None):
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module: nn.Module = ToyVelocityNet(channels, hidden, cond_dim)
        self.net = self.module  # the raw module; `module` may be replaced by an Accelerate wrapper
        self.char_table = torch.randn(128, cond_dim, generator=gen)
        self.latent_shape = (channels, size, size)
        self.shift = shift
        self.device = torch.device(device or "cpu")
        self.module.to(self.device)
        self._reference: nn.Module | None = None
        self._frozen = copy.deepcopy(self.net).requires_grad_(False)

    def encode(self, prompts: list[Prompt]) -> Conditioning:
        rows = []
        for p in texts(prompts):
            idx = torch.tensor([min(ord(c), 127) for c in p] or [0])
            rows.append(self.char_table[idx].mean(0))
        return {"text": torch.stack(rows).to(self.device)}

    def conditioning_fingerprint(self) -> str:
        """sha256 of what decides `encode`: the character table (so an on-disk conditioning cache can key it)."""
        import hashlib

        return hashlib.sha256(b"toy|" + self.char_table.numpy().tobytes()).hexdigest()

    def noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        from flowfactory.seeding import randn_per_sample

        return randn_per_sample(self.latent_shape, generators, device=self.device)

    def sigmas(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        s = self.shift * t / (1 + (self.shift - 1) * t)
        return s.to(torch.float32)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        net = self._reference if self._reference is not None else self.module
        return net(x.float(), sigma, cond["text"].float())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images to latents, the inverse of `decode`: fitted to size x size, then 2 * image - 1."""
        from flowfactory.prompts import fit_image

        _, h, w = self.latent_shape
        return torch.stack([fit_image(im[:self.latent_shape[0]], h, w) for im in images]).to(self.device) * 2 - 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def frozen_copies(self) -> list[nn.Module]:
        """The frozen reference net, which the loop shards like `module` under FSDP."""
        return [self._frozen]

    @contextmanager
    def reference(self) -> Iterator[None]:
        self._reference = self._frozen
        try:
            with torch.no_grad():
                yield
        finally:
            self._reference = None

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), d / "toy.pt")
        (d / "toy.json").write_text(json.dumps({"latent_shape": list(self.latent_shape)}))
