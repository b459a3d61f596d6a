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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


def spaced_timesteps(steps: int, t_start: int = 999, n_train: int = 1000) -> list[int]:
    """`steps` descending integer timesteps, evenly spaced, starting at most at `t_start`
    (DDIM's spacing)."""
    stride = n_train / steps
    ts = sorted({min(int(round(i * stride)) + 1, n_train - 1) for i in range(steps)}, reverse=True)
    return [t for t in ts if t <= t_start] or [max(1, min(t_start, n_train - 1))]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A variance-preserving discrete schedule (DDPM/SD): alpha_t^2 = alphas_cumprod[t].

    alphas_cumprod: (T,) float32.  Timesteps are the integers 0..T-1, which are also the
    indices the editors draw (`timestep(index)` is the identity).
    """

    alphas_cumprod: Tensor
    kind = "vp"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(a_bar[t]), sigma_t = sqrt(1 - a_bar[t]); t: (B,) or () integer."""
        a_bar = self.alphas_cumprod.to(t.device)[t.long()]
        return a_bar.sqrt(), (1.0 - a_bar).sqrt()

    def timestep(self, index: Tensor) -> Tensor:
        """The model timestep of a training-noise-level index in [0, T): the index itself."""
        return index

    def flow_scale(self, t: Tensor) -> Tensor:
        """alpha_t + sigma_t: z_t / (alpha_t + sigma_t) = (1 - s) z + s eps is the same process
        written as a rectified flow, at flow time s = sigma_t / (alpha_t + sigma_t)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha + sigma

    def flow_time(self, t: Tensor) -> Tensor:
        """s = sigma_t / (alpha_t + sigma_t): the noise level of t as a rectified flow's."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / (alpha + sigma)

    def sampling_timesteps(self, n: int) -> Tensor:
        """n descending timesteps for an n-step sampler (DDIM spacing), long."""
        return torch.tensor(spaced_timesteps(n, n_train=self.num_timesteps), dtype=torch.long)

    def a_bar(self, t: int | Tensor) -> Tensor:
        """alphas_cumprod at t (the DDIM sampler's closed-form steps use it directly)."""
        return self.alphas_cumprod[t]

    def to(self, device) -> NoiseSchedule:
        return NoiseSchedule(self.alphas_cumprod.to(device))


@dataclass(frozen=True, eq=False)
class FlowSchedule:
    """A rectified-flow forward process (SD3, FLUX): z_t = (1 - s) z + s eps, s = t / N.

    sigmas: (N,) float32, the noise levels s the model was trained at, ascending (after the
    family's shift), as diffusers' `FlowMatchEulerDiscreteScheduler` builds them; timestep
    t = s * N is what the denoiser is called with (N = 1000).  `sampler(n)`: the (n,)
    descending noise levels of the family's n-step sampler (its pipeline's own schedule).
    """

    sigmas: Tensor
    sampler: Callable[[int], Tensor] | None = None
    num_train_timesteps: int = 1000
    kind = "flow"

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """alpha = 1 - s, sigma = s with s = t / N; t: (B,) or () float."""
        s = t.float() / self.num_train_timesteps
        return 1.0 - s, s

    def timestep(self, index: Tensor) -> Tensor:
        """The model timestep of a training-noise-level index in [0, N): N * sigmas[index]."""
        return self.sigmas.to(index.device)[index.long()] * self.num_train_timesteps

    def flow_scale(self, t: Tensor) -> Tensor:
        """alpha_t + sigma_t = 1 (exactly, not 1 - s + s in floating point)."""
        return torch.ones_like(t, dtype=torch.float32)

    def flow_time(self, t: Tensor) -> Tensor:
        """s = t / N."""
        return t.float() / self.num_train_timesteps

    def sampling_timesteps(self, n: int) -> Tensor:
        """n descending timesteps of the family's n-step sampler, float32."""
        if self.sampler is None:
            s = torch.linspace(1.0, 1.0 / n, n)
        else:
            s = self.sampler(n).float().cpu()
        return s * self.num_train_timesteps

    def to(self, device) -> FlowSchedule:
        return replace(self, sigmas=self.sigmas.to(device))


def shift_sigmas(s: Tensor, shift: float = 1.0, mu: float | None = None) -> Tensor:
    """The flow families' noise-level shift: static `shift * s / (1 + (shift - 1) s)` (SD3), or
    with `mu` the resolution-dependent exponential one `e^mu / (e^mu + 1/s - 1)` (FLUX)."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return shift * s / (1 + (shift - 1) * s)


def as_schedule(schedule) -> NoiseSchedule | FlowSchedule:
    """A schedule, or a bare alphas_cumprod tensor (T,) wrapped as one."""
    return schedule if hasattr(schedule, "alpha_sigma") else NoiseSchedule(schedule)


@dataclass(frozen=True, eq=False)
class Conditioning:
    """A batch of text conditioning; every tensor field is batched along dim 0.

    embeds: (B,L,D) token embeddings (cross-attention).  pooled: (B,P) pooled text embedding,
    for families that take one (SDXL, SD3, FLUX); None for SD 1/2.  guidance: (B,) guidance
    scale for guidance-distilled models that take it as an input (FLUX.1-dev); None elsewhere.
    A family with more inputs subclasses this and adds tensor fields; the operations below
    carry them along.
    """

    embeds: Tensor
    pooled: Tensor | None = None
    guidance: Tensor | None = None

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

    def with_guidance(self, w: float) -> Conditioning:
        """The same rows with the guidance input set to `w` (guidance-distilled models)."""
        return replace(self, guidance=torch.full((len(self),), float(w), device=self.device))

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


# The DDS schedule the Stable Diffusion UNet families (SD 1.x/2.x, SDXL) recommend
# (`edit_defaults["dds"]`; `--schedule reference` sets it aside; its keys are
# `dds.pipeline.SCHEDULE_KEYS`): t in 50 strata visited in a shuffled order, each step the
# reference lr x 200 / 50, the result the mean of the last fifth of the latents.  On the built-in
# model's held-out edits it matched the 200-step reference recipe on two edit sets with the
# widest margin (docs/evidence.md, "Fewer steps"); the built-in model itself runs the 12-step
# winner, whose steps are four times as long, which these measurements do not cover at SD's lr.
FEWER_STEPS = {"schedule": "stratified", "steps": 50, "step_rule": "budget", "n_avg": 1,
               "optimizer": "sgd", "average_tail": 0.2}


@runtime_checkable
class Model(Protocol):
    """A latent text-to-image diffusion model, as every part of dds sees it.

    schedule                    NoiseSchedule | FlowSchedule   the forward process
    schedule_for(shape)         the schedule for latents of that shape (FLUX shifts by size)
    encode(images)              (B,3,H,W) in [-1,1] -> (B,C,h,w) scaled latents
    decode(latents)             (B,C,h,w) -> (B,3,H,W) in [-1,1]
    encode_prompt(prompts)      list[str] -> Conditioning (B rows); the only place that tokenises
    uncond()                    Conditioning (1 row) of the empty prompt, cached
    prompt_length(prompt)       (tokens, tokens the text encoder reads)
    predict_eps(z_t, t, cond)   -> (B,C,h,w) float32 eps, whatever the model predicts natively
                                (a velocity v becomes eps = z_t + (1 - s) v)
    guidance_embedded           True when guidance is an input of the model (FLUX.1-dev)
                                rather than two branches combined (classifier-free guidance)
    denoiser                    the frozen denoiser module (read-only: copy it to change it)
    copy_denoiser(...)          a private copy (another dtype, or trainable for a trainer)
    eps_fn(module, call)        predict_eps through another copy of the denoiser
    fast_denoiser(dtype, private)  the frozen denoiser for no-grad calls (shared or a copy)
    attention_kernels(module)   attention implementations a copy runs
    """

    family: str
    schedule: NoiseSchedule | FlowSchedule
    guidance_embedded: bool
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int  # image pixels per latent pixel
    native_size: int  # the image side the model was trained at (512 for SD1.x)
    latent_channels: int
    # Editing settings the model recommends (may be empty); a key named after a method
    # ("flowedit") holds a dict of settings for that method alone.
    edit_defaults: dict
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

    def schedule_for(self, shape: Sequence[int]) -> NoiseSchedule | FlowSchedule:
        """The forward process for latents of `shape` (B,C,h,w): `schedule` for every family
        but those whose shift depends on the image size (FLUX)."""
        ...

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
