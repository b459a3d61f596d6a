"""Guidance methods: what turns a model's noise predictions into a gradient on the latent.

A method is a small class behind one interface, used by every loop in dds: the zero-shot editor
(`dds.loop`), the fast path (`dds.fast`, which only batches, traces and compiles the model call),
the translation trainer and the evaluations.  Its arithmetic is the pure functions of
`dds.score`, in three pieces:

    cond = method.conditioning(uncond, source, target)   # the model batch's conditioning, once
    x, tt = method.inputs(z, z_hat, eps, t, schedule)    # the model batch at this step
    grad = method.combine(eps_fn(x, tt, cond), eps, guidance)

`method.grad(...)` chains the three.  A new method (FlowEdit, masked DDS, CDS, PDS) is one more
class here and one line in `METHODS`.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from dds.errors import DDSError
from dds.models.base import EpsFn, cat_cond
from dds.score import dds_combine, dds_inputs, sds_combine, sds_inputs


class Method(Protocol):
    name: str
    uses_source: bool  # does the gradient read the source image and caption?
    rows: int  # model rows per edit in one step

    def conditioning(self, uncond, source, target): ...

    def inputs(self, z: Tensor, z_hat: Tensor, eps: Tensor, t: Tensor,
               schedule) -> tuple[Tensor, Tensor]: ...

    def combine(self, e: Tensor, eps: Tensor, guidance: float) -> Tensor: ...

    def grad(self, eps_fn: EpsFn, z: Tensor, z_hat: Tensor, cond, t: Tensor, eps: Tensor,
             schedule, guidance: float) -> Tensor: ...


class _Base:
    name = ""
    uses_source = False
    rows = 0

    def grad(self, eps_fn: EpsFn, z: Tensor, z_hat: Tensor, cond, t: Tensor, eps: Tensor,
             schedule, guidance: float) -> Tensor:
        """The gradient on z (B,C,h,w); `cond` is `self.conditioning(...)` for these B edits."""
        t = t.expand(z.shape[0]) if t.ndim == 0 else t
        x, tt = self.inputs(z, z_hat, eps, t, schedule)
        return self.combine(eps_fn(x, tt, cond), eps, guidance)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SDS(_Base):
    """Score Distillation Sampling (DreamFusion; the paper's Eq. 1): eps^w(z_t, y, t) - eps."""

    name = "sds"
    rows = 2

    def conditioning(self, uncond, source, target):
        return cat_cond([uncond, target])

    def inputs(self, z, z_hat, eps, t, schedule):
        return sds_inputs(z, eps, t, schedule)

    def combine(self, e, eps, guidance):
        return sds_combine(e, eps, guidance)


class DDS(_Base):
    """Delta Denoising Score (Eq. 3): eps^w(z_t, y, t) - eps^w(zhat_t, yhat, t), shared t, eps."""

    name = "dds"
    uses_source = True
    rows = 4

    def conditioning(self, uncond, source, target):
        return cat_cond([uncond, uncond, source, target])

    def inputs(self, z, z_hat, eps, t, schedule):
        return dds_inputs(z, z_hat, eps, t, schedule)

    def combine(self, e, eps, guidance):
        return dds_combine(e, guidance)


METHODS: dict[str, Method] = {m.name: m for m in (DDS(), SDS())}


def get_method(method) -> Method:
    """A method by name ('dds', 'sds'), or the method itself."""
    if not isinstance(method, str):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise DDSError(f"method '{method}' is not one of {', '.join(METHODS)}") from None
