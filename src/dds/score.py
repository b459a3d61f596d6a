"""Score-distillation math as short pure functions (the paper's symbols, no randomness here).

Symbols (Hertz, Aberman, Cohen-Or 2023, "Delta Denoising Score"):

| code          | paper                                | meaning                                      |
| ------------- | ------------------------------------ | -------------------------------------------- |
| `z`           | z                                    | target latent being optimised                |
| `z_hat`       | \\hat z                              | source (reference) latent                    |
| `eps`         | epsilon                              | noise, shared by both branches               |
| `t`           | t                                    | integer timestep(s), shared by both branches |
| `schedule`    | alpha_t, sigma_t                     | the model's `NoiseSchedule` (or a bare alphas_cumprod (T,)) |
| `w`           | omega                                | classifier-free guidance scale               |

Random draws of `t` and `eps` happen only at the edges (the editor, the trainer); here they are
arguments, so every function is deterministic and testable against closed forms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dds.models.base import EpsFn, as_schedule, cat_cond

__all__ = ["EpsFn", "alpha_sigma", "cfg", "dds_combine", "dds_grad", "dds_inputs", "grad_to_loss",
           "guided_eps", "guided_eps_captions", "noise_input", "sds_combine", "sds_grad",
           "sds_inputs", "sgd_step", "timestep_weight", "v_to_eps"]


def _per_sample(x: Tensor, ndim: int) -> Tensor:
    """Reshape a (B,) or scalar tensor to broadcast against a (B, ...) tensor of `ndim` dims."""
    return x.reshape(-1, *([1] * (ndim - 1))) if x.ndim > 0 else x


def alpha_sigma(schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of the schedule at t: (B,) or () integer."""
    return as_schedule(schedule).alpha_sigma(t)


def noise_input(z: Tensor, eps: Tensor, t: Tensor, schedule) -> Tensor:
    """Forward process z_t = alpha_t z + sigma_t eps (paper Sec. 3.1).  z, eps: (B,C,h,w)."""
    alpha, sigma = alpha_sigma(schedule, t)
    alpha, sigma = (_per_sample(s.to(z.dtype), z.ndim) for s in (alpha, sigma))
    return alpha * z + sigma * eps


def cfg(eps_uncond: Tensor, eps_cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance eps_uncond + w (eps_cond - eps_uncond).

    This is the paper's (1 + omega) eps(y) - omega eps() with w = 1 + omega, the convention of
    Stable Diffusion and the reference code (w = 7.5).  The only CFG formula in the package.
    """
    return eps_uncond + w * (eps_cond - eps_uncond)


def v_to_eps(v: Tensor, z_t: Tensor, t: Tensor, schedule) -> Tensor:
    """Convert a v-prediction to eps: eps = alpha_t v + sigma_t z_t (SD 2.x)."""
    alpha, sigma = alpha_sigma(schedule, t)
    alpha, sigma = (_per_sample(s.to(v.dtype), v.ndim) for s in (alpha, sigma))
    return alpha * v + sigma * z_t


def timestep_weight(schedule, t: Tensor, a: float = 0.0, b: float = 0.0) -> Tensor:
    """w(t) = alpha_t^a sigma_t^b; the reference uses a = b = 0, i.e. w(t) = 1.  Returns (B,)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return alpha.pow(a) * sigma.pow(b)


def guided_eps(
    eps_fn: EpsFn, z_t: Tensor, t: Tensor, emb_uncond: Tensor, emb_cond: Tensor, w: float
) -> Tensor:
    """eps^w(z_t, y, t) with both halves in one batched model call.  z_t: (B,C,h,w)."""
    return guided_eps_captions(eps_fn, z_t, t, emb_uncond, [emb_cond], w)[0]


def guided_eps_captions(
    eps_fn: EpsFn, z_t: Tensor, t: Tensor, emb_uncond: Tensor, embs_cond: list[Tensor], w: float
) -> list[Tensor]:
    """eps^w(z_t, y_k, t) for several captions y_k of the same z_t, in one batched model call.

    The unconditional half does not depend on the caption, so it is evaluated once: 1 + K
    batches of B rows instead of 2K.  z_t: (B,C,h,w); each embs_cond[k]: (B,L,D).
    """
    n, k = z_t.shape[0], len(embs_cond)
    eps = eps_fn(torch.cat([z_t] * (k + 1)), torch.cat([t] * (k + 1)),
                 cat_cond([emb_uncond, *embs_cond])).split(n)
    return [cfg(eps[0], e, w) for e in eps[1:]]


# Each score is three pieces, so that a loop that batches, traces or compiles the model call
# (dds.fast) reuses the same arithmetic: the model's inputs, its conditioning (built once per
# edit), and the combination of its outputs into the gradient.
def sds_inputs(z: Tensor, eps: Tensor, t: Tensor, schedule) -> tuple[Tensor, Tensor]:
    """SDS's model batch [uncond, cond] of z_t, and its timesteps.  -> (2B,C,h,w), (2B,)."""
    z_t = noise_input(z, eps, t, schedule)
    return torch.cat([z_t, z_t]), t.repeat(2)


def sds_combine(e: Tensor, eps: Tensor, guidance: float) -> Tensor:
    """SDS gradient from the model's output on `sds_inputs`: eps^w(z_t, y, t) - eps."""
    n = eps.shape[0]
    return cfg(e[:n], e[n:], guidance) - eps


def sds_grad(
    eps_fn: EpsFn,
    z: Tensor,
    emb_uncond,
    emb_cond,
    t: Tensor,
    eps: Tensor,
    schedule,
    guidance: float,
) -> Tensor:
    """SDS gradient (Eq. 1): eps^w(z_t, y, t) - eps.  All tensors batched over B."""
    t = t.expand(z.shape[0]) if t.ndim == 0 else t
    x, tt = sds_inputs(z, eps, t, schedule)
    return sds_combine(eps_fn(x, tt, cat_cond([emb_uncond, emb_cond])), eps, guidance)


def dds_inputs(z: Tensor, z_hat: Tensor, eps: Tensor, t: Tensor, schedule):
    """DDS's model batch [source-uncond, target-uncond, source-cond, target-cond]: the target
    z_t and the source zhat_t under the same t and eps.  -> (4B,C,h,w), (4B,)."""
    z_t = noise_input(z, eps, t, schedule)  # (B,C,h,w)
    zhat_t = noise_input(z_hat, eps, t, schedule)  # same eps, same t
    return torch.cat([zhat_t, z_t, zhat_t, z_t]), t.repeat(4)


def dds_combine(e: Tensor, guidance: float) -> Tensor:
    """DDS gradient from the model's output on `dds_inputs`: eps^w(z_t, y) - eps^w(zhat_t, yhat)."""
    e_src_u, e_tgt_u, e_src_c, e_tgt_c = e.split(e.shape[0] // 4)
    return cfg(e_tgt_u, e_tgt_c, guidance) - cfg(e_src_u, e_src_c, guidance)


def dds_grad(
    eps_fn: EpsFn,
    z: Tensor,
    z_hat: Tensor,
    emb_uncond,
    emb_target,
    emb_source,
    t: Tensor,
    eps: Tensor,
    schedule,
    guidance: float,
) -> Tensor:
    """DDS gradient (Eq. 3): eps^w(z_t, y, t) - eps^w(zhat_t, yhat, t), shared t and eps.

    The four evaluations (source, target) x (unconditional, conditional) go through the model
    in ONE batch, ordered [source-uncond, target-uncond, source-cond, target-cond].
    """
    t = t.expand(z.shape[0]) if t.ndim == 0 else t
    x, tt = dds_inputs(z, z_hat, eps, t, schedule)  # (4B,C,h,w)
    cond = cat_cond([emb_uncond, emb_uncond, emb_source, emb_target])  # 4B rows
    return dds_combine(eps_fn(x, tt, cond), guidance)


def grad_to_loss(z: Tensor, grad: Tensor) -> Tensor:
    """Surrogate loss whose gradient with respect to z is exactly `grad` (scalar).

    <z, sg(grad)> has d/dz = grad bit for bit (the form 0.5 ||z - sg(z - grad)||^2 has the same
    gradient in exact arithmetic but loses bits to z - (z - grad) in floating point).
    """
    return (z * grad.detach()).sum()


def sgd_step(z: Tensor, grad: Tensor, lr: float, scale: float) -> Tensor:
    """One SGD step on the surrogate `scale * <z, sg(grad)>` (whose gradient is scale * grad):
    z - lr * scale * grad, in the same float operations as `torch.optim.SGD` on that loss."""
    return torch.add(z, scale * grad, alpha=-lr)


def reference_step_scale(latent_hw: tuple[int, int], lr: float = 0.1, loss_scale: float = 2000.0):
    """Per-element step of the reference recipe: lr * loss_scale / (h * w) (0.0488 at 64x64)."""
    h, w = latent_hw
    return lr * loss_scale / (h * w)
