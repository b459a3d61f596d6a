"""The one contract every model is adapted to.  Nothing outside `dds.backends` knows a model."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    """A latent text-to-image diffusion model seen through five members.

    alphas_cumprod            (T,)                     the noise schedule, nothing else
    encode(images)            (B,3,H,W) in [-1,1] -> (B,C,h,w) scaled latents
    decode(latents)           (B,C,h,w) -> (B,3,H,W) in [-1,1]
    encode_prompt(prompts)    list[str] -> (B,L,D)     the only place that tokenises
    predict_eps(z_t, t, emb)  -> (B,C,h,w) float32    v-prediction already converted to eps
    """

    alphas_cumprod: Tensor
    device: torch.device
    vae_scale_factor: int  # image pixels per latent pixel
    native_size: int  # the image side the model was trained at (512 for SD1.x)

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def encode_prompt(self, prompts: list[str]) -> Tensor: ...

    def predict_eps(self, z_t: Tensor, t: Tensor, emb: Tensor) -> Tensor: ...
