"""Editing methods: what turns a model's noise predictions into the next edited latent.

A method is a small class behind one interface, used by every loop in dds: the zero-shot editor
(`dds.loop`), the fast path (`dds.fast`, which only batches, traces and compiles the model call),
the translation trainer and the evaluations.  Its arithmetic is the pure functions of
`dds.score`.  Every loop runs it the same way:

    cond = method.conditioning(uncond, source, target, cfg, embedded)  # once per edit
    state = optimizer_state(cfg, z)                                    # optimiser buffers
    for i in range(method.num_steps(cfg)):
        draw = method.draw(i, generators, shape, cfg, schedule)        # t, noise, step size
        z, g = method.step(eps_fn, z, z_hat, cond, draw, schedule, cfg, embedded, state)

`embedded` is True for a guidance-distilled model (FLUX.1-dev) run without true classifier-free
guidance: the guidance scale is then an input of the model, not a second branch.

* `DDS` and `SDS` are score-distillation methods: each step draws a random t and noise and
  takes an optimiser step (SGD in the reference; `OPTIMIZERS`) on the latent along the score
  (`grad`); the trainer uses `grad` alone.
* `FlowEdit` (Kulikov et al. 2025) integrates an ODE from the source over a descending schedule
  with noise coupled between source and target; no optimiser, no inversion.  It runs on flow
  models (SD3, FLUX) as published and on any other model written as a flow
  (`dds.score.eps_to_velocity`).

A new method (masked DDS, CDS, PDS) is one more class here and one line in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dds.errors import DDSError
from dds.models.base import Conditioning, EpsFn
from dds.score import (
    adam_step,
    dds_combine,
    dds_inputs,
    eps_to_velocity,
    flowedit_inputs,
    flowedit_velocity,
    guided_conditioning,
    guided_inputs,
    guided_outputs,
    momentum_step,
    sds_combine,
    sds_inputs,
    sgd_step,
    timestep_weight,
)


@dataclass(frozen=True)
class Draw:
    """One step's draws for B edits, made on the CPU from each edit's own generator.

    t: (B,) model timesteps.  eps: (B,C,h,w) noise ((n_avg,B,C,h,w) for FlowEdit).
    weight: (B,) float32: w(t) for score distillation (times the step rule's `step_factor`);
    the Euler step s_next - s for FlowEdit.
    phase: 0 for an editing step; FlowEdit's last n_min steps sample the target (1: the first).
    """

    t: Tensor
    eps: Tensor
    weight: Tensor
    phase: int = 0


def draw_t_eps(gens: list[torch.Generator], shape: tuple[int, ...], cfg):
    """One noise-level index and one eps per edit, each from that edit's own generator (so a
    batch of edits equals the same edits run one by one).  Drawn on the CPU: identical on
    every device.  -> (B,) long indices in [t_min, t_max - 1), (B,C,h,w)."""
    t = uniform_levels(0, cfg.steps, gens, cfg)
    eps = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return t, eps


# ---- score distillation's timestep schedules ----------------------------------------------
# Each gives step i's training-noise-level index per edit (B,) long in [t_min, t_max - 1), from
# that edit's own generator; the noise eps is drawn after it from the same generator.
def uniform_levels(i: int, steps: int, gens: list[torch.Generator], cfg) -> Tensor:
    """The reference recipe: t uniform in the integers of [t_min, t_max - 1), every step."""
    return torch.stack([torch.randint(cfg.t_min, cfg.t_max - 1, (), generator=g) for g in gens])


def stratum_levels(i, steps: int, gens: list[torch.Generator], cfg) -> Tensor:
    """A uniform draw inside stratum i (an int, or (B,) one per generator) of `steps` equal
    strata of [t_min, t_max - 1), where stratum 0 is the noisiest."""
    lo, hi = cfg.t_min, cfg.t_max - 1
    u = torch.stack([torch.rand((), generator=g) for g in gens])
    pos = (steps - 1 - i + u) / steps  # in [0, 1), high first
    return (lo + (pos * (hi - lo)).floor().long()).clamp(lo, hi - 1)


def descending_levels(i, steps, gens, cfg) -> Tensor:
    """Noise levels that fall from t_max to t_min over the edit, one random level inside each
    of `steps` equal strata (DreamTime, HiFA, DreamCatalyst: coarse structure first, detail
    last; the stratum keeps the reference's spread)."""
    return stratum_levels(i, steps, gens, cfg)


def stratified_levels(i, steps, gens, cfg) -> Tensor:
    """The same strata visited in a fixed shuffled order (one per step count, the same for
    every edit and seed): less variance than i.i.d. draws, no annealing, which separates the
    strata's effect from the descending order's."""
    order = torch.randperm(steps, generator=torch.Generator().manual_seed(steps))
    return stratum_levels(int(order[i]), steps, gens, cfg)


TIMESTEP_SCHEDULES = {"reference": uniform_levels, "descending": descending_levels,
                      "stratified": stratified_levels}
# The step size over an edit: "constant" is the reference's lr at every step; "budget" scales
# it by reference_steps / steps, so an edit of fewer steps travels as far in total; "decay"
# travels as far as "budget" in steps that fall linearly to near zero (`step_factor`), so that
# the last, noisiest draws move the latent least (SGD's annealed step size).
STEP_RULES = ("constant", "budget", "decay")
REFERENCE_STEPS = 200


class TailMean:
    """The edit's result under `cfg.average_tail` (Polyak-Ruppert suffix averaging): the mean
    of the latents after each of the last round(average_tail x steps) steps (at least one), so
    that the noise of the last draws averages out; with 0 (the reference) or before the tail
    begins, the latest latent itself."""

    def __init__(self, cfg, total: int):
        k = max(1, round(cfg.average_tail * total)) if cfg.average_tail > 0 else 0
        self.first, self.sum, self.n = total - k, None, 0

    def add(self, step: int, z: Tensor) -> None:
        """Record the latent after step `step` (0-based)."""
        if step >= self.first:
            self.sum = z.clone() if self.sum is None else self.sum.add_(z)
            self.n += 1

    def result(self, z: Tensor) -> Tensor:
        """The edit's result, z being the latest latent."""
        return z if self.n == 0 else self.sum / self.n


# The optimiser that applies the score to the latent: "sgd", the reference; "momentum",
# heavy-ball SGD (0.9); "adam", Adam (0.9, 0.999), whose lr is a per-element step.
OPTIMIZERS = ("sgd", "momentum", "adam")
MOMENTUM = 0.9


def optimizer_state(cfg, z: Tensor) -> dict:
    """The buffers `cfg.optimizer` keeps across an edit's steps, for latents like z."""
    if cfg.optimizer == "momentum":
        return {"buf": torch.zeros_like(z)}
    if cfg.optimizer == "adam":
        return {"m": torch.zeros_like(z), "v": torch.zeros_like(z),
                "k": torch.zeros((), device=z.device)}
    return {}


def optimizer_step(z: Tensor, g: Tensor, cfg, state: dict) -> Tensor:
    """One step of `cfg.optimizer` on the surrogate loss scale * <z, g> (`dds.score`);
    updates `state` (from `optimizer_state`) in place."""
    lr, scale = step_lr(cfg), cfg.loss_scale / cfg.reference_area
    if cfg.optimizer == "momentum":
        z, state["buf"] = momentum_step(z, g, state["buf"], lr, scale, MOMENTUM)
        return z
    if cfg.optimizer == "adam":
        state["k"] = state["k"] + 1
        z, state["m"], state["v"] = adam_step(z, g, state["m"], state["v"], state["k"], lr,
                                              scale)
        return z
    return sgd_step(z, g, lr, scale)


def step_lr(cfg) -> float:
    """The SGD learning rate an edit of cfg.steps steps runs with (`cfg.step_rule`; with
    "decay", its mean over the steps)."""
    if cfg.step_rule in ("budget", "decay"):
        return cfg.lr * REFERENCE_STEPS / cfg.steps
    return cfg.lr


def step_factor(i: int, cfg) -> float:
    """Step i's multiple of `step_lr` (1 but for "decay": 2 (S - i) / (S + 1) for S steps,
    from about 2 down to 2 / (S + 1), summing to S).  It scales the step's gradient weight
    (`Draw.weight`), which for SGD and momentum is the step size; Adam would normalise it
    away, so EditConfig refuses the pair."""
    if cfg.step_rule != "decay":
        return 1.0
    return 2.0 * (cfg.steps - i) / (cfg.steps + 1)


def guidances(cfg) -> list[float]:
    """[source, target] guidance scales: the source's is the target's unless set apart."""
    w_src = cfg.guidance if cfg.source_guidance is None else cfg.source_guidance
    return [w_src, cfg.guidance]


class Method(Protocol):
    name: str
    uses_source: bool  # does the edit read the source image and caption?
    gradient: bool  # a score-distillation gradient (usable by the translation trainer)?
    rows: int  # model rows per edit in one step, with classifier-free guidance
    defaults: dict  # EditConfig settings this method needs other than the reference recipe's

    def num_steps(self, cfg) -> int: ...

    def conditioning(self, uncond, source, target, cfg=None, embedded: bool = False): ...

    def draw(self, i: int, gens: list[torch.Generator], shape: tuple[int, ...], cfg,
             schedule) -> Draw: ...

    def step(self, eps_fn: EpsFn, z: Tensor, z_hat: Tensor, cond, d: Draw, schedule, cfg,
             embedded: bool = False, state: dict | None = None) -> tuple[Tensor, Tensor]: ...


class _ScoreDistillation:
    """SGD on the latent along a score: each step draws t and eps at random."""

    name = ""
    uses_source = False
    gradient = True
    rows = 0
    defaults: dict = {}

    def num_steps(self, cfg) -> int:
        return cfg.steps

    def draw(self, i, gens, shape, cfg, schedule) -> Draw:
        """Step i's noise level (`cfg.schedule`) and noise, per edit; with n_avg > 1, eps is
        (n_avg, B, C, h, w): the step averages the gradient over those draws."""
        if cfg.schedule == "reference" and cfg.n_avg == 1:
            index, eps = draw_t_eps(gens, shape, cfg)  # the reference's order of draws
        else:
            index = TIMESTEP_SCHEDULES[cfg.schedule](i, cfg.steps, gens, cfg)
            eps = torch.stack([torch.stack([torch.randn(shape, generator=g) for g in gens])
                               for _ in range(cfg.n_avg)])
            eps = eps[0] if cfg.n_avg == 1 else eps
        t = schedule.timestep(index)
        w = timestep_weight(schedule, t, cfg.weight_a, cfg.weight_b).float() * step_factor(i, cfg)
        return Draw(t, eps, w)

    def step(self, eps_fn, z, z_hat, cond, d: Draw, schedule, cfg, embedded=False,
             state: dict | None = None):
        """One optimiser step along w(t) grad (`optimizer_step`; the reference: z - lr * scale
        * w(t) grad, `dds.score.sgd_step`); returns (z, w(t) grad).  `state`: the optimiser's
        buffers (`optimizer_state`), needed for all but SGD."""
        args = (schedule, cfg.guidance, cfg.source_guidance, embedded)
        if d.eps.ndim == z.ndim:
            g = self.grad(eps_fn, z, z_hat, cond, d.t, d.eps, *args)
        else:  # noise averaging: the mean gradient over n_avg draws at the same t
            g = sum(self.grad(eps_fn, z, z_hat, cond, d.t, e, *args) for e in d.eps) / len(d.eps)
        g = d.weight.view(-1, *([1] * (g.ndim - 1))) * g
        return optimizer_step(z, g, cfg, {} if state is None else state), g

    def grad(self, eps_fn: EpsFn, z: Tensor, z_hat: Tensor, cond, t: Tensor, eps: Tensor,
             schedule, guidance: float, source_guidance: float | None = None,
             embedded: bool = False) -> Tensor:
        """The gradient on z (B,C,h,w); `cond` is `self.conditioning(...)` for these B edits."""
        t = t.expand(z.shape[0]) if t.ndim == 0 else t
        x, tt = self.inputs(z, z_hat, eps, t, schedule, embedded)
        return self.combine(eps_fn(x, tt, cond), eps, guidance, source_guidance, embedded)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SDS(_ScoreDistillation):
    """Score Distillation Sampling (DreamFusion; the paper's Eq. 1): eps^w(z_t, y, t) - eps."""

    name = "sds"
    rows = 2

    def conditioning(self, uncond, source, target, cfg=None, embedded=False):
        return guided_conditioning(uncond, [target], [cfg.guidance if cfg else None], embedded)

    def inputs(self, z, z_hat, eps, t, schedule, embedded=False):
        return sds_inputs(z, eps, t, schedule, embedded)

    def combine(self, e, eps, guidance, source_guidance=None, embedded=False):
        return sds_combine(e, eps, guidance, embedded)


class DDS(_ScoreDistillation):
    """Delta Denoising Score (Eq. 3): eps^w(z_t, y, t) - eps^w(zhat_t, yhat, t), shared t, eps.

    On a flow model (eps = z_t + (1 - s) v from the model) this is the flow-matching DDS,
    (1 - s) [(v_tgt - v_src) + (z - zhat)] (`dds.score.flow_dds_grad`)."""

    name = "dds"
    uses_source = True
    rows = 4

    def conditioning(self, uncond, source, target, cfg=None, embedded=False):
        ws = guidances(cfg) if cfg is not None else [None, None]
        return guided_conditioning(uncond, [source, target], ws, embedded)

    def inputs(self, z, z_hat, eps, t, schedule, embedded=False):
        return dds_inputs(z, z_hat, eps, t, schedule, embedded)

    def combine(self, e, eps, guidance, source_guidance=None, embedded=False):
        return dds_combine(e, guidance, source_guidance, embedded)


def _target_rows(cond, b: int, embedded: bool):
    """The target half of a [source, target] guided conditioning of B edits."""
    if embedded:
        return cond[b:2 * b]
    return Conditioning.cat([cond[b:2 * b], cond[3 * b:4 * b]]) if isinstance(
        cond, Conditioning) else torch.cat([cond[b:2 * b], cond[3 * b:4 * b]])


class FlowEdit:
    """FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas, Michaeli 2025): from z = the source,

        for the last n_max of T descending timesteps t_i (noise level s_i):
            V = mean over n_avg noises eps of  v(z + zt_src - x_src, y_tgt) - v(zt_src, y_src),
                zt_src = (1 - s_i) x_src + s_i eps
            z = z + (s_{i+1} - s_i) V

    with source and target guidance apart (`source_guidance`, `guidance`); the last n_min steps
    instead noise the edit once and sample the target alone.  `steps` is T; `n_max` (default T)
    how many of them run.  The published settings per family are the models' defaults."""

    name = "flowedit"
    uses_source = True
    gradient = False
    rows = 4
    # SD3's published settings (T=50, n_max=33, cfg_src 3.5, cfg_tgt 13.5): for families with
    # none of their own, whose classifier-free guidance works on the same scale.
    defaults = {"steps": 50, "n_max": 33, "guidance": 13.5, "source_guidance": 3.5}

    def num_steps(self, cfg) -> int:
        return cfg.n_max if cfg.n_max is not None else cfg.steps

    def conditioning(self, uncond, source, target, cfg=None, embedded=False):
        return guided_conditioning(uncond, [source, target], guidances(cfg), embedded)

    def draw(self, i, gens, shape, cfg, schedule) -> Draw:
        big_t, n_min = cfg.steps, cfg.n_min
        j = big_t - self.num_steps(cfg) + i  # index into the T-step schedule
        ts = schedule.sampling_timesteps(big_t)
        s = schedule.flow_time(ts[j])
        s_next = schedule.flow_time(ts[j + 1]) if j + 1 < big_t else torch.zeros_like(s)
        eps = torch.stack([torch.stack([torch.randn(shape, generator=g) for g in gens])
                           for _ in range(cfg.n_avg)])  # (n_avg, B, C, h, w)
        phase = 0 if big_t - j > n_min else (1 if j == big_t - n_min else 2)
        b = len(gens)
        return Draw(ts[j].expand(b), eps, (s_next - s).float().expand(b), phase)

    def step(self, eps_fn, z, z_hat, cond, d: Draw, schedule, cfg, embedded=False, state=None):
        """One Euler step; returns (z, the direction V).  No optimiser: `state` is unused."""
        if d.phase:
            return self._sample(eps_fn, z, z_hat, cond, d, schedule, cfg, embedded)
        ws = guidances(cfg)
        rows = 2 if embedded else 4
        v = 0
        for eps in d.eps:
            zt_src, zt_tgt = flowedit_inputs(z, z_hat, eps, d.t, schedule)
            e = eps_fn(guided_inputs([zt_src, zt_tgt], embedded), d.t.repeat(rows), cond)
            e_src, e_tgt = guided_outputs(e, ws, embedded)
            v = v + (1 / len(d.eps)) * flowedit_velocity(e_src, e_tgt, zt_src, zt_tgt, d.t,
                                                         schedule)
        return z + _per_edit(d.weight, z) * v, v

    def _sample(self, eps_fn, z, z_hat, cond, d: Draw, schedule, cfg, embedded):
        """The last n_min steps: the target alone, from the edit noised once (phase 1)."""
        b = z.shape[0]
        c = _per_edit(schedule.flow_scale(d.t).to(z.dtype), z)
        if d.phase == 1:  # z is the edit: carry it to noise level s with the source's noise
            z = flowedit_inputs(z, z_hat, d.eps[0], d.t, schedule)[1] / c
        x = c * z  # the model's input; z is kept as a flow, (1 - s) z0 + s eps
        e = eps_fn(guided_inputs([x], embedded), d.t.repeat(1 if embedded else 2),
                   _target_rows(cond, b, embedded))
        (e_tgt,) = guided_outputs(e, [cfg.guidance], embedded)
        v = eps_to_velocity(e_tgt, x, d.t, schedule)
        return z + _per_edit(d.weight, z) * v, v


def _per_edit(x: Tensor, like: Tensor) -> Tensor:
    return x.view(-1, *([1] * (like.ndim - 1)))


METHODS: dict[str, Method] = {m.name: m for m in (DDS(), SDS(), FlowEdit())}
# The methods that give a gradient on an image (what the translation network trains with).
SCORES = {name: m for name, m in METHODS.items() if m.gradient}


def get_method(method) -> Method:
    """A method by name ('dds', 'sds', 'flowedit'), or the method itself."""
    if not isinstance(method, str):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise DDSError(f"method '{method}' is not one of {', '.join(METHODS)}") from None
