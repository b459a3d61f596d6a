"""The one contract every model family is adapted to.  Nothing outside `dds.models` knows a model.

Three objects cross the boundary:

* `NoiseSchedule`: the model's forward process, `z_t = alpha_t z + sigma_t eps`.  The math
  asks it for (alpha_t, sigma_t) at integer timesteps; it never sees a bare `alphas_cumprod`.
* `Conditioning`: everything a denoiser takes besides z_t and t (token embeddings for cross
  attention today; pooled embeddings for SDXL, SD3 and FLUX), batched along dim 0, so that
  guidance methods can concatenate and slice it without knowing what is inside.
* `Model`: encode/decode images, encode prompts, predict eps, and the named parts that the fast
  path and the trainers need (the denoiser module, a private copy of it, the eps function of
  any copy), so that no caller reaches into a model's attributes or its folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance-preserving discrete schedule (DDPM/SD): alpha_t^2 = alphas_cumprod[t].

    alphas_cumprod: (T,) float32.  `alpha_sigma(t)` is the only thing the editing math asks.
    """

    alphas_cumprod: Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(a_bar[t]), sigma_t = sqrt(1 - a_bar[t]); t: (B,) or () integer."""
        a_bar = self.alphas_cumprod.to(t.device)[t.long()]
        return a_bar.sqrt(), (1.0 - a_bar).sqrt()

    def a_bar(self, t: int | Tensor) -> Tensor:
        """alphas_cumprod at t (the DDIM sampler's closed-form steps use it directly)."""
        return self.alphas_cumprod[t]

    def to(self, device) -> NoiseSchedule:
        return NoiseSchedule(self.alphas_cumprod.to(device))


def as_schedule(schedule) -> NoiseSchedule:
    """A schedule, or a bare alphas_cumprod tensor (T,) wrapped as one."""
    return schedule if hasattr(schedule, "alpha_sigma") else NoiseSchedule(schedule)


@dataclass(frozen=True, eq=False)
class Conditioning:
    """A batch of text conditioning; every tensor field is batched along dim 0.

    embeds: (B,L,D) token embeddings (cross-attention).  pooled: (B,P) pooled text embedding,
    for families that take one (SDXL, SD3, FLUX); None for SD 1/2.  A family with more inputs
    subclasses this and adds tensor fields; the operations below carry them along.
    """

    embeds: Tensor
    pooled: Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def __getitem__(self, index) -> Conditioning:
        """Rows of the batch: an int keeps a batch of one."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda x: x[index])

    def expand(self, b: int) -> Conditioning:
        """A batch of one broadcast to b rows (a view, no copy)."""
        return self._map(lambda x: x.expand(b, *x.shape[1:]))

    def repeat(self, k: int) -> Conditioning:
        return self._map(lambda x: x.repeat(k, *([1] * (x.ndim - 1))))

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda x: x.to(device=device, dtype=dtype))

    def float(self) -> Conditioning:
        return self._map(lambda x: x.float())

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all parts must have the same fields set."""
        first = conds[0]
        out = {}
        for f in fields(first):
            vals = [getattr(c, f.name) for c in conds]
            out[f.name] = torch.cat(vals) if isinstance(vals[0], Tensor) else vals[0]
        return replace(first, **out)


def cat_cond(parts: Sequence) -> Any:
    """Concatenate conditionings (or plain (B,L,D) tensors, for analytic test denoisers)."""
    return torch.cat(list(parts)) if isinstance(parts[0], Tensor) else Conditioning.cat(parts)


def expand_cond(c, b: int):
    """A batch of one broadcast to b rows; works on a Conditioning or a plain tensor."""
    return c.expand(b, *c.shape[1:]) if isinstance(c, Tensor) else c.expand(b)


# A noise predictor: (z_t (B,C,h,w), t (B,), conditioning of B rows) -> eps (B,C,h,w).
EpsFn = Callable[[Tensor, Tensor, Any], Tensor]
# How a denoiser module is called: (module, z_t, t, conditioning) -> its raw output.
DenoiserCall = Callable[[torch.nn.Module, Tensor, Tensor, Conditioning], Tensor]


@runtime_checkable
class Model(Protocol):
    """A latent text-to-image diffusion model, as every part of dds sees it.

    schedule                    NoiseSchedule             the forward process
    encode(images)              (B,3,H,W) in [-1,1] -> (B,C,h,w) scaled latents
    decode(latents)             (B,C,h,w) -> (B,3,H,W) in [-1,1]
    encode_prompt(prompts)      list[str] -> Conditioning (B rows); the only place that tokenises
    uncond()                    Conditioning (1 row) of the empty prompt, cached
    prompt_length(prompt)       (tokens, tokens the text encoder reads)
    predict_eps(z_t, t, cond)   -> (B,C,h,w) float32, whatever the model predicts natively
    denoiser                    the frozen denoiser module (read-only: copy it to change it)
    copy_denoiser(...)          a private copy (another dtype, or trainable for a trainer)
    eps_fn(module, call)        predict_eps through another copy of the denoiser
    fast_denoiser(dtype, private)  the frozen denoiser for no-grad calls (shared or a copy)
    attention_kernels(module)   attention implementations a copy runs
    """

    family: str
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int  # image pixels per latent pixel
    native_size: int  # the image side the model was trained at (512 for SD1.x)
    latent_channels: int
    edit_defaults: dict  # editing settings the model recommends (may be empty)
    label: str  # a short human name ("built-in model", a folder name)
    denoiser: torch.nn.Module

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def encode_prompt(self, prompts: list[str]) -> Conditioning: ...

    def uncond(self) -> Conditioning: ...

    def prompt_length(self, prompt: str) -> tuple[int, int]:
        """(tokens in the prompt, tokens the text encoder reads): longer prompts are cut."""
        ...

    def predict_eps(self, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor: ...

    def copy_denoiser(self, dtype: torch.dtype | None = None,
                      trainable: bool = False) -> torch.nn.Module: ...

    def eps_fn(self, module: torch.nn.Module, call: DenoiserCall | None = None) -> EpsFn: ...

    def fast_denoiser(self, dtype: torch.dtype | None = None,
                      private: bool = False) -> torch.nn.Module:
        """The denoiser for frozen, no-grad calls in `dtype` (None: the model's own), with the
        family's fastest exact kernels on (SD: torch's fused attention): the model's own module
        when it already is that and `private` is False (shared: never change it), else a frozen
        private copy."""
        ...

    def attention_kernels(self, module: torch.nn.Module) -> list[str]:
        """Names of the attention implementations `module` (the denoiser or a copy) runs."""
        ...

    def identity(self) -> dict: ...

    def save_autoencoder(self, folder: Path) -> list[Path]: ...
