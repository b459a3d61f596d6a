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

__all__ = ["EpsFn", "alpha_sigma", "cfg", "dds_combine", "dds_grad", "dds_inputs", "eps_to_velocity",
           "flow_dds_grad", "flow_v_to_eps", "flowedit_inputs", "flowedit_velocity",
           "grad_to_loss", "guided_conditioning", "guided_eps", "guided_eps_captions",
           "guided_inputs", "guided_outputs", "noise_input", "sds_combine", "sds_grad",
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


def x0_from_eps(z_t: Tensor, eps: Tensor, t: Tensor, schedule) -> Tensor:
    """The clean latent a noise prediction implies, x0 = (z_t - sigma_t eps) / alpha_t: the
    inverse of `noise_input` for the same eps.  z_t, eps: (B,C,h,w); t: (B,) or () integer."""
    alpha, sigma = alpha_sigma(schedule, t)
    alpha, sigma = (_per_sample(s.to(z_t.dtype), z_t.ndim) for s in (alpha, sigma))
    return (z_t - sigma * eps) / alpha


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


def flow_v_to_eps(v: Tensor, z_t: Tensor, t: Tensor, schedule) -> Tensor:
    """A rectified flow's velocity v = eps - z as eps: eps = z_t + (1 - s) v (SD3, FLUX).

    With z_t = (1 - s) z + s eps, z_t + (1 - s)(eps - z) = eps; here 1 - s is alpha_t.
    """
    alpha, _ = alpha_sigma(schedule, t)
    return z_t + _per_sample(alpha.to(v.dtype), v.ndim) * v


def eps_to_velocity(eps: Tensor, z_t: Tensor, t: Tensor, schedule) -> Tensor:
    """The rectified-flow velocity of an eps prediction at z_t, for any schedule.

    Written as a flow (x_s = z_t / c, c = alpha_t + sigma_t, s = sigma_t / c), the model's
    velocity is v = eps - z0_hat = (c eps - z_t) / alpha_t; for a flow schedule (c = 1) that
    is (eps - z_t) / (1 - s), the inverse of `flow_v_to_eps`.
    """
    sched = as_schedule(schedule)
    alpha, _ = sched.alpha_sigma(t)
    c = _per_sample(sched.flow_scale(t).to(eps.dtype), eps.ndim)
    return (c * eps - z_t) / _per_sample(alpha.to(eps.dtype), eps.ndim)


def flow_dds_grad(v_tgt: Tensor, v_src: Tensor, z: Tensor, z_hat: Tensor, s: Tensor) -> Tensor:
    """DDS on a velocity model, in velocities: (1 - s) [(v_tgt - v_src) + (z - z_hat)].

    This is eps_hat(z_t, y) - eps_hat(zhat_t, yhat) for z_t, zhat_t noised with the same s and
    eps (`../docs/models.md`); the (z - z_hat) term is what a port that treats v as eps drops.
    """
    return _per_sample(1 - s, z.ndim) * ((v_tgt - v_src) + (z - z_hat))


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


# Guidance over several predictions at once.  A method asks for k guided predictions (DDS:
# target at z_t and source at zhat_t; FlowEdit: the same at its own inputs).  With classifier-
# free guidance the model batch is [uncond x k, cond_1..cond_k] on [x_1..x_k, x_1..x_k] (so DDS
# is [src-uncond, tgt-uncond, src-cond, tgt-cond], as the reference batches it); a guidance-
# distilled model (FLUX.1-dev) takes each scale as an input instead: [cond_i(w_i)] on [x_i].
def guided_conditioning(uncond, conds: list, ws: list[float], embedded: bool = False):
    """The model batch's conditioning for k guided predictions (built once per edit)."""
    if embedded:
        return cat_cond([c.with_guidance(w) for c, w in zip(conds, ws, strict=True)])
    return cat_cond([uncond] * len(conds) + list(conds))


def guided_inputs(xs: list[Tensor], embedded: bool = False) -> Tensor:
    """The model batch's latents for k guided predictions at xs[i]."""
    return torch.cat(xs if embedded else xs + xs)


def guided_outputs(e: Tensor, ws: list[float], embedded: bool = False) -> list[Tensor]:
    """The k guided predictions from the model's output on `guided_inputs`."""
    k = len(ws)
    parts = e.split(e.shape[0] // (k if embedded else 2 * k))
    if embedded:
        return list(parts)
    return [cfg(parts[i], parts[k + i], w) for i, w in enumerate(ws)]


# Each score is three pieces, so that a loop that batches, traces or compiles the model call
# (dds.fast) reuses the same arithmetic: the model's inputs, its conditioning (built once per
# edit), and the combination of its outputs into the gradient.
def sds_inputs(z: Tensor, eps: Tensor, t: Tensor, schedule,
               embedded: bool = False) -> tuple[Tensor, Tensor]:
    """SDS's model batch [uncond, cond] of z_t, and its timesteps.  -> (2B,C,h,w), (2B,)
    (one row per edit, (B,...), for a guidance-distilled model)."""
    z_t = noise_input(z, eps, t, schedule)
    return guided_inputs([z_t], embedded), t.repeat(1 if embedded else 2)


def sds_combine(e: Tensor, eps: Tensor, guidance: float, embedded: bool = False) -> Tensor:
    """SDS gradient from the model's output on `sds_inputs`: eps^w(z_t, y, t) - eps."""
    (tgt,) = guided_outputs(e, [guidance], embedded)
    return tgt - eps


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


def dds_inputs(z: Tensor, z_hat: Tensor, eps: Tensor, t: Tensor, schedule,
               embedded: bool = False):
    """DDS's model batch [source-uncond, target-uncond, source-cond, target-cond]: the target
    z_t and the source zhat_t under the same t and eps.  -> (4B,C,h,w), (4B,)  ([source,
    target], (2B,...), for a guidance-distilled model)."""
    z_t = noise_input(z, eps, t, schedule)  # (B,C,h,w)
    zhat_t = noise_input(z_hat, eps, t, schedule)  # same eps, same t
    return guided_inputs([zhat_t, z_t], embedded), t.repeat(2 if embedded else 4)


def dds_combine(e: Tensor, guidance: float, source_guidance: float | None = None,
                embedded: bool = False) -> Tensor:
    """DDS gradient from the model's output on `dds_inputs`: eps^w(z_t, y) - eps^w(zhat_t, yhat)
    (the source branch at `source_guidance` when given; the paper uses one w for both)."""
    w_src = guidance if source_guidance is None else source_guidance
    src, tgt = guided_outputs(e, [w_src, guidance], embedded)
    return tgt - src


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


def flowedit_inputs(z: Tensor, x_src: Tensor, eps: Tensor, t: Tensor, schedule):
    """FlowEdit's two model inputs at t (Kulikov et al. 2025): the source noised with eps,
    zt_src = (1 - s) x_src + s eps, and the edit carried by the same noise, zt_tgt = z + zt_src
    - x_src (in the flow coordinate z_t / (alpha_t + sigma_t) for a non-flow schedule)."""
    zt_src = noise_input(x_src, eps, t, schedule)
    c = _per_sample(as_schedule(schedule).flow_scale(t).to(z.dtype), z.ndim)
    return zt_src, c * z + zt_src - c * x_src


def flowedit_velocity(e_src: Tensor, e_tgt: Tensor, zt_src: Tensor, zt_tgt: Tensor, t: Tensor,
                      schedule) -> Tensor:
    """FlowEdit's direction V = v(zt_tgt, y_tgt) - v(zt_src, y_src) from guided eps predictions."""
    return (eps_to_velocity(e_tgt, zt_tgt, t, schedule)
            - eps_to_velocity(e_src, zt_src, t, schedule))


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


def momentum_step(z: Tensor, grad: Tensor, buf: Tensor, lr: float, scale: float,
                  beta: float = 0.9) -> tuple[Tensor, Tensor]:
    """Heavy-ball SGD on the same surrogate (`torch.optim.SGD(momentum=beta)`, no dampening,
    buf starting at 0): buf <- beta buf + scale grad; z - lr buf.  -> (z, buf)."""
    buf = buf * beta + scale * grad
    return z - lr * buf, buf


def adam_step(z: Tensor, grad: Tensor, m: Tensor, v: Tensor, k, lr: float, scale: float,
              betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """Adam on the same surrogate (`torch.optim.Adam`'s update), k-th step (1-based; a number
    or a 0-dim tensor): a per-element step of about lr whatever the gradient's scale.
    -> (z, m, v)."""
    b1, b2 = betas
    g = scale * grad
    m = m + (1 - b1) * (g - m)
    v = v * b2 + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2 ** k) ** 0.5 + eps
    return z - lr / (1 - b1 ** k) * m / denom, m, v


def reference_step_scale(latent_hw: tuple[int, int], lr: float = 0.1, loss_scale: float = 2000.0):
    """Per-element step of the reference recipe: lr * loss_scale / (h * w) (0.0488 at 64x64)."""
    h, w = latent_hw
    return lr * loss_scale / (h * w)
