"""Zero-shot editing (paper Section 3): optimise the target latent with DDS or SDS, or run
FlowEdit (`dds.methods`), from one loop.

Step size.  The reference surrogate is `2000 * sum(z * grad) / (h * w)` with SGD at lr 0.1, so
each latent element moves by lr * 2000 / (h * w) * grad: 0.0488 * grad for SD's 64x64 latent
(512x512 images), but four times less at 1024x1024 and sixteen times more at 128x128.  We keep
the reference's numbers (lr 0.1, loss scale 2000) and divide by a fixed `reference_area`
(64 * 64) instead of the actual h * w: identical to the reference at 512x512, and the same
per-element step at every other size.  `EditConfig.step_per_element` reports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Protocol

import torch
from torch import Tensor

from dds.errors import DivergedError, SettingError
from dds.methods import (  # noqa: F401  (draw_t_eps: re-export)
    METHODS,
    OPTIMIZERS,
    STEP_RULES,
    TIMESTEP_SCHEDULES,
    Draw,
    TailMean,
    draw_t_eps,
    get_method,
    optimizer_state,
    step_lr,
)
from dds.models.base import expand_cond


@dataclass(frozen=True)
class StepInfo:
    """What the loop reports after each step: the step number (1-based), the latents after it
    (B,C,h,w) and the norm of each edit's gradient (B,)."""

    step: int
    total: int
    z: Tensor
    grad_norm: Tensor


# on_step(info) -> None: progress, previews, logging.  It cannot stop the loop; `stop` does.
StepHook = Callable[[StepInfo], None]


class StopSignal(Protocol):
    """Anything with `is_set()`, e.g. a `threading.Event`: the loop stops after the step in
    which it becomes set."""

    def is_set(self) -> bool: ...


# The range of each user-facing setting (inclusive), shared by the library, the CLI and the web
# app so that all refuse the same values with the same sentence.  Wide enough for any real use
# (the reference recipe is 200 steps, guidance 7.5, lr 0.1), narrow enough that one request
# cannot hold a shared server for days or overflow a generator.
LIMITS = {
    "steps": (1, 5000),
    "guidance": (0.0, 100.0),
    "lr": (1e-6, 10.0),
    "seed": (0, 2**32 - 1),
    "source_guidance": (0.0, 100.0),
    "n_max": (1, 5000),
    "n_min": (0, 5000),
    "n_avg": (1, 64),
    "average_tail": (0.0, 1.0),
}
# Latents of every supported model stay within a few units; far beyond this the edit diverged.
DIVERGED_ABS = 1e4
# Steps between checks: a check reads one value back from the device, which on a GPU waits for
# the queued work; on the CPU it costs nothing measurable, so every step is checked there.
DIVERGENCE_CHECK_EVERY = {"cpu": 1, "default": 10}


def check_range(name: str, value, integer: bool = False):
    """`value` as a number within LIMITS[name]; SettingError (naming the field) otherwise."""
    lo, hi = LIMITS[name]
    kind = "a whole number" if integer else "a number"
    span = f"{lo} to {hi}" if integer else f"{lo:g} to {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)) or (
            integer and not float(value).is_integer()):
        raise SettingError(name, value, f"it must be {kind} from {span}")
    if not lo <= value <= hi:
        raise SettingError(name, value, f"it must be {kind} from {span}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class EditConfig:
    """Zero-shot editing settings; the defaults are the reference recipe."""

    method: str = "dds"
    steps: int = 200
    guidance: float = 7.5
    lr: float = 0.1
    loss_scale: float = 2000.0
    reference_area: int = 64 * 64  # latent h*w at which lr and loss_scale are the reference's
    t_min: int = 50
    t_max: int = 950  # t is drawn from the integers in [t_min, t_max - 1), as the reference
    weight_a: float = 0.0  # w(t) = alpha_t^a sigma_t^b
    weight_b: float = 0.0
    seed: int = 0
    # Score distillation: how step i's noise level is drawn ("reference": uniform every step;
    # "descending": falling through `steps` strata; "stratified": the strata in random order)
    # and the step size over the edit ("constant"; "budget": lr x 200 / steps; "decay": as far
    # as "budget" in linearly falling steps, `dds.methods.step_factor`).
    schedule: str = "reference"
    step_rule: str = "constant"
    # The optimiser of the latent (score distillation): "sgd" (the reference), "momentum"
    # (heavy ball, 0.9) or "adam" (lr is then a per-element step, e.g. 0.01).
    optimizer: str = "sgd"
    # The result: the latest latent (0, the reference) or the mean of the latents after the
    # last fraction `average_tail` of the steps (suffix averaging, `dds.methods.TailMean`).
    average_tail: float = 0.0
    # Guidance of the source branch (DDS, FlowEdit); None: the same as `guidance`.
    source_guidance: float | None = None
    # FlowEdit: of `steps` descending timesteps run the last n_max (None: all), the last n_min
    # of those sampling the target alone.  n_avg: noise draws averaged per step (FlowEdit, and
    # DDS/SDS at the same t).
    n_max: int | None = None
    n_min: int = 0
    n_avg: int = 1
    # Guidance-distilled models (FLUX.1-dev): classifier-free guidance with an unconditional
    # branch (twice the model calls) instead of the model's guidance input.
    true_cfg: bool = False

    def __post_init__(self):
        def bad(name, why):
            raise SettingError(name, getattr(self, name), why)

        if self.method not in METHODS:
            bad("method", f"use one of {', '.join(repr(m) for m in METHODS)}")
        check_range("steps", self.steps, integer=True)
        if not isinstance(self.steps, int):
            bad("steps", "it must be a whole number (an int)")
        check_range("guidance", self.guidance)
        check_range("lr", self.lr)
        for name in ("seed", "n_min", "n_avg") + (("n_max",) if self.n_max is not None else ()):
            check_range(name, getattr(self, name), integer=True)
            if not isinstance(getattr(self, name), int):
                bad(name, "it must be a whole number (an int)")
        if self.source_guidance is not None:
            check_range("source_guidance", self.source_guidance)
        if self.n_max is not None and self.n_max > self.steps:
            bad("n_max", f"it must be at most steps ({self.steps})")
        if self.n_min > (self.steps if self.n_max is None else self.n_max):
            bad("n_min", "it must be at most n_max (or steps)")
        if self.schedule not in TIMESTEP_SCHEDULES:
            bad("schedule", f"use one of {', '.join(repr(k) for k in TIMESTEP_SCHEDULES)}")
        if self.step_rule not in STEP_RULES:
            bad("step_rule", f"use one of {', '.join(repr(k) for k in STEP_RULES)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"use one of {', '.join(repr(k) for k in OPTIMIZERS)}")
        if self.step_rule == "decay" and self.optimizer == "adam":
            bad("step_rule", "'decay' scales each step's gradient, which Adam normalises away; "
                "use it with 'sgd' or 'momentum', or give Adam the 'constant' rule")
        check_range("average_tail", self.average_tail)
        if self.average_tail > 0 and not get_method(self.method).gradient:
            bad("average_tail", f"{self.method} follows an ODE whose iterates are not estimates "
                "of one edit; use 0 (the default) or the dds or sds method")
        if self.optimizer != "sgd" and not get_method(self.method).gradient:
            bad("optimizer", f"{self.method} follows an ODE and has no optimiser; use 'sgd' "
                "(the default) or the dds or sds method")
        if not isinstance(self.true_cfg, bool):
            bad("true_cfg", "it must be true or false")
        for name in ("loss_scale", "weight_a", "weight_b"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "it must be a finite number")
        if self.loss_scale <= 0:
            bad("loss_scale", "it must be > 0")
        if not isinstance(self.reference_area, int) or self.reference_area <= 0:
            bad("reference_area", "it must be a whole number > 0")
        if not (0 <= self.t_min < self.t_max - 1 <= 1000):
            bad("t_min", "need 0 <= t_min < t_max - 1 <= 1000")

    @property
    def step_per_element(self) -> float:
        """How far one SGD step moves a latent element per unit of gradient (with the step
        rule's learning rate)."""
        return step_lr(self) * self.loss_scale / self.reference_area

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> EditConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **changes) -> EditConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_diverged(z: Tensor, step: int) -> None:
    """DivergedError when z holds a NaN, an infinity or an exploding value (one device read)."""
    if not bool(torch.isfinite(z).all() & (z.abs().amax() < DIVERGED_ABS)):
        raise DivergedError(
            f"the edit diverged by step {step} (the latents became infinite or exploded); "
            "lower the guidance or the learning rate (lr) and try again"
        )


def edit_latents(
    model,
    z_hat: Tensor,
    cond_source,
    cond_target,
    cfg: EditConfig = EditConfig(),
    on_step: StepHook | None = None,
    stop: StopSignal | None = None,
    seeds: list[int] | None = None,
) -> Tensor:
    """Edit z (initialised at z_hat) with the configured method; returns the edited latents.

    z_hat: (B,C,h,w); cond_source, cond_target: conditionings of B rows (or 1, broadcast).
    Edit i uses generator seed `seeds[i]` (default cfg.seed + i).  For DDS and SDS the loop
    mirrors the reference: SGD on z with loss = loss_scale * <z, w(t) grad> / area
    (`dds.score.sgd_step`).  `on_step` sees every step; `stop.is_set()` ends the loop after
    the current step.  With `cfg.average_tail`, the result is the mean of the last steps'
    latents (`dds.methods.TailMean`; `on_step` sees each step's own).
    """
    device = model.device
    b = z_hat.shape[0]
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(b)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    method = get_method(cfg.method)
    z = z_hat.detach().float().to(device)
    schedule, shape = model.schedule_for(z.shape), tuple(z.shape[1:])
    z_hat = z.clone()
    embedded = uses_embedded_guidance(model, cfg)
    cond = method.conditioning(expand_cond(model.uncond(), b), expand_cond(cond_source, b),
                               expand_cond(cond_target, b), cfg, embedded)
    every = DIVERGENCE_CHECK_EVERY.get(z.device.type, DIVERGENCE_CHECK_EVERY["default"])
    total, state = method.num_steps(cfg), optimizer_state(cfg, z)
    mean = TailMean(cfg, total)
    with torch.no_grad():
        for step in range(total):
            d = to_device(method.draw(step, gens, shape, cfg, schedule), device)
            z, g = method.step(model.predict_eps, z, z_hat, cond, d, schedule, cfg, embedded,
                               state)
            mean.add(step, z)
            if (step + 1) % every == 0 or step + 1 == total:
                check_diverged(z, step + 1)
            if on_step is not None:
                on_step(StepInfo(step + 1, total, z, g.flatten(1).norm(dim=1)))
            if stop is not None and stop.is_set():
                break
    return mean.result(z)


def uses_embedded_guidance(model, cfg: EditConfig) -> bool:
    """Guidance as the model's input (FLUX.1-dev), unless true classifier-free guidance is
    asked for."""
    return bool(getattr(model, "guidance_embedded", False)) and not cfg.true_cfg


def to_device(d: Draw, device) -> Draw:
    return replace(d, t=d.t.to(device), eps=d.eps.to(device), weight=d.weight.to(device))
