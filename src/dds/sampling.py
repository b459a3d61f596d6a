"""Deterministic DDIM sampling, DDIM inversion and SDEdit over any model.

These are the baselines the paper compares DDS with, written as free functions on the model
protocol (`dds.models.base.Model`; no scheduler state): sampling from noise, image-to-image at a strength (SDEdit,
Meng et al. 2022), and DDIM inversion with the source prompt followed by regeneration with the
target prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dds.models.base import expand_cond, spaced_timesteps
from dds.score import guided_eps, x0_from_eps


def ddim_timesteps(steps: int, t_start: int = 999, n_train: int = 1000) -> list[int]:
    """`steps` descending integer timesteps, evenly spaced, starting at most at `t_start`."""
    return spaced_timesteps(steps, t_start, n_train)


def _x0_and_eps(model, z_t, t, cond_u, cond, w):
    b = z_t.shape[0]
    tt = torch.full((b,), t, dtype=torch.long, device=model.device)
    eps = guided_eps(model.predict_eps, z_t, tt, cond_u, cond, w)
    return x0_from_eps(z_t, eps, torch.as_tensor(t, device=model.device), model.schedule), eps


@torch.no_grad()
def ddim_sample(model, z_t: Tensor, cond, guidance: float, timesteps: list[int],
                on_step=None) -> Tensor:
    """Run DDIM (eta = 0) from z_t at timesteps[0] down to a clean latent.  (B,C,h,w).
    cond: a conditioning of B rows; on_step(i, z) sees each step (its return is ignored)."""
    cond_u = expand_cond(model.uncond(), z_t.shape[0])
    z = z_t.float().to(model.device)
    for i, t in enumerate(timesteps):
        x0, eps = _x0_and_eps(model, z, t, cond_u, cond, guidance)
        a_prev = model.schedule.a_bar(timesteps[i + 1]) if i + 1 < len(timesteps) else None
        z = x0 if a_prev is None else a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if on_step is not None:
            on_step(i + 1, z)
    return z


@torch.no_grad()
def ddim_invert(model, z0: Tensor, cond, timesteps: list[int],
                guidance: float = 1.0) -> Tensor:
    """Map a clean latent to z at timesteps[0] by running DDIM backwards (ascending in t)."""
    cond_u = expand_cond(model.uncond(), z0.shape[0])
    up = sorted(timesteps)
    z = z0.float().to(model.device)
    a_prev = torch.tensor(1.0, device=model.device)
    t_prev = None
    for t in up:
        # eps is evaluated at the current (less noisy) point: the usual inversion approximation.
        t_eval = t_prev if t_prev is not None else up[0]
        tt = torch.full((z.shape[0],), t_eval, dtype=torch.long, device=model.device)
        eps = guided_eps(model.predict_eps, z, tt, cond_u, cond, guidance)
        x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        a = model.schedule.a_bar(t)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        a_prev, t_prev = a, t
    return z


@torch.no_grad()
def sdedit(model, z_hat: Tensor, cond_target, strength: float, guidance: float = 7.5,
           steps: int = 50, seed: int = 0) -> Tensor:
    """SDEdit: noise the source latent to t = strength * 1000, then denoise with the target."""
    ts = ddim_timesteps(steps, t_start=int(strength * 999))
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(z_hat.shape, generator=g).to(model.device)
    a = model.schedule.a_bar(ts[0])
    z_t = a.sqrt() * z_hat.to(model.device) + (1 - a).sqrt() * eps
    return ddim_sample(model, z_t, cond_target, guidance, ts)


@torch.no_grad()
def ddim_inversion_edit(model, z_hat: Tensor, cond_source, cond_target,
                        guidance: float = 7.5, steps: int = 50) -> Tensor:
    """Invert with the source prompt (no guidance), regenerate with the target prompt."""
    ts = ddim_timesteps(steps)
    z_T = ddim_invert(model, z_hat, cond_source, ts)
    return ddim_sample(model, z_T, cond_target, guidance, ts)


@torch.no_grad()
def generate(model, cond, guidance: float = 7.5, steps: int = 50, seed: int = 0,
             latent_hw: tuple[int, int] | None = None, channels: int = 4) -> Tensor:
    """Text-to-image latents from pure noise (one generator per batch, seeded); cond: a
    conditioning of B rows, one image each."""
    b = len(cond)
    hw = latent_hw or (model.native_size // model.vae_scale_factor,) * 2
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((b, channels, *hw), generator=g).to(model.device)
    return ddim_sample(model, z, cond, guidance, ddim_timesteps(steps))
