"""Score-distillation math as short pure functions (the paper's symbols, no randomness here).

Symbols (Hertz, Aberman, Cohen-Or 2023, "Delta Denoising Score"):

| code          | paper                                | meaning                                      |
| ------------- | ------------------------------------ | -------------------------------------------- |
| `z`           | z                                    | target latent being optimised                |
| `z_hat`       | \\hat z                              | source (reference) latent                    |
| `eps`         | epsilon                              | noise, shared by both branches               |
| `t`           | t                                    | integer timestep(s), shared by both branches |
| `alphas_cumprod` | \\bar alpha (the paper's alpha_t) | the schedule; alpha_t = sqrt, sigma_t = sqrt(1 - .) |
| `w`           | omega                                | classifier-free guidance scale               |

Random draws of `t` and `eps` happen only at the edges (the editor, the trainer); here they are
arguments, so every function is deterministic and testable against closed forms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# A noise predictor: (z_t (B,C,h,w), t (B,), text embeddings (B,L,D)) -> eps (B,C,h,w).
EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _per_sample(x: Tensor, ndim: int) -> Tensor:
    """Reshape a (B,) or scalar tensor to broadcast against a (B, ...) tensor of `ndim` dims."""
    return x.reshape(-1, *([1] * (ndim - 1))) if x.ndim > 0 else x


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]); t: (B,) int."""
    a_bar = alphas_cumprod.to(t.device)[t.long()]
    return a_bar.sqrt(), (1.0 - a_bar).sqrt()


def noise_input(z: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process z_t = alpha_t z + sigma_t eps (paper Sec. 3.1).  z, eps: (B,C,h,w)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    alpha, sigma = (_per_sample(s.to(z.dtype), z.ndim) for s in (alpha, sigma))
    return alpha * z + sigma * eps


def cfg(eps_uncond: Tensor, eps_cond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance eps_uncond + w (eps_cond - eps_uncond).

    This is the paper's (1 + omega) eps(y) - omega eps() with w = 1 + omega, the convention of
    Stable Diffusion and the reference code (w = 7.5).  The only CFG formula in the package.
    """
    return eps_uncond + w * (eps_cond - eps_uncond)


def v_to_eps(v: Tensor, z_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Convert a v-prediction to eps: eps = alpha_t v + sigma_t z_t (SD 2.x)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    alpha, sigma = (_per_sample(s.to(v.dtype), v.ndim) for s in (alpha, sigma))
    return alpha * v + sigma * z_t


def timestep_weight(alphas_cumprod: Tensor, t: Tensor, a: float = 0.0, b: float = 0.0) -> Tensor:
    """w(t) = alpha_t^a sigma_t^b; the reference uses a = b = 0, i.e. w(t) = 1.  Returns (B,)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
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
                 torch.cat([emb_uncond, *embs_cond])).split(n)
    return [cfg(eps[0], e, w) for e in eps[1:]]


def sds_grad(
    eps_fn: EpsFn,
    z: Tensor,
    emb_uncond: Tensor,
    emb_cond: Tensor,
    t: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    guidance: float,
) -> Tensor:
    """SDS gradient (Eq. 1): eps^w(z_t, y, t) - eps.  All tensors batched over B."""
    z_t = noise_input(z, eps, t, alphas_cumprod)
    return guided_eps(eps_fn, z_t, t, emb_uncond, emb_cond, guidance) - eps


def dds_grad(
    eps_fn: EpsFn,
    z: Tensor,
    z_hat: Tensor,
    emb_uncond: Tensor,
    emb_target: Tensor,
    emb_source: Tensor,
    t: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    guidance: float,
) -> Tensor:
    """DDS gradient (Eq. 3): eps^w(z_t, y, t) - eps^w(zhat_t, yhat, t), shared t and eps.

    The four evaluations (source, target) x (unconditional, conditional) go through the model
    in ONE batch, ordered [source-uncond, target-uncond, source-cond, target-cond].
    """
    n = z.shape[0]
    z_t = noise_input(z, eps, t, alphas_cumprod)  # (B,C,h,w)
    zhat_t = noise_input(z_hat, eps, t, alphas_cumprod)  # same eps, same t
    x = torch.cat([zhat_t, z_t, zhat_t, z_t])  # (4B,C,h,w)
    emb = torch.cat([emb_uncond, emb_uncond, emb_source, emb_target])  # (4B,L,D)
    e = eps_fn(x, t.repeat(4), emb)
    e_src_u, e_tgt_u, e_src_c, e_tgt_c = e.split(n)
    return cfg(e_tgt_u, e_tgt_c, guidance) - cfg(e_src_u, e_src_c, guidance)


def grad_to_loss(z: Tensor, grad: Tensor) -> Tensor:
    """Surrogate loss whose gradient with respect to z is exactly `grad` (scalar).

    <z, sg(grad)> has d/dz = grad bit for bit (the form 0.5 ||z - sg(z - grad)||^2 has the same
    gradient in exact arithmetic but loses bits to z - (z - grad) in floating point).
    """
    return (z * grad.detach()).sum()


def reference_step_scale(latent_hw: tuple[int, int], lr: float = 0.1, loss_scale: float = 2000.0):
    """Per-element step of the reference recipe: lr * loss_scale / (h * w) (0.0488 at 64x64)."""
    h, w = latent_hw
    return lr * loss_scale / (h * w)
