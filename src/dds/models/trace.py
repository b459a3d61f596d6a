"""A UNet call recorded once per input shape with `torch.jit.trace`, then replayed.

On a CPU a small diffusion UNet spends much of each call in Python: several hundred module calls,
each a few microseconds of dispatch around a few microseconds of arithmetic.  A trace records the
operators once and replays them without the Python layer: the same operators in the same order,
so the same numbers (the tests compare with the eager call).  A trace is only valid for the
shapes it saw (diffusers' UNet branches on shapes), so one is kept per input shape; the number
kept is bounded.  A UNet that cannot be traced runs eager, with one warning.

On a CPU with several threads, a traced call is also split by rows into one chunk per thread,
and each chunk runs on its own thread with threads // chunks intra-op threads (one on two cores).  The ops of a small UNet are too
small for intra-op parallelism to pay (every op wakes and joins the other threads; with passive
OpenMP waiting, dds's default, a wake-up is a system call), while two independent halves keep
both cores busy with no synchronisation until the end: 1.3x to 1.75x faster on two cores, for
one edit (4 rows) as for a large evaluation batch (192 rows).  Each row is computed by the same
operators as before, alone or with the other rows of its chunk, so results agree with the
unsplit call to float rounding (convolutions block differently by batch size).

Used where the UNet is frozen and called without gradients: the model's `predict_eps` and the
fast editing path (a `TracedUNet` is a `dds.models.base.DenoiserCall`: module, z_t, t,
conditioning).  On CUDA the fast path compiles instead, so tracing is a CPU default only.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace

import torch
from torch import Tensor

from dds.models.base import Conditioning


def _sd_eager(unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """A Stable Diffusion UNet's call: token embeddings through cross attention."""
    return unet(x, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]


def _flat(cond: Conditioning) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """The tensor fields of a conditioning, by name (what a trace takes as inputs)."""
    names = tuple(f.name for f in fields(cond) if isinstance(getattr(cond, f.name), Tensor))
    return names, tuple(getattr(cond, n) for n in names)


class _DenoiserCall(torch.nn.Module):
    """eager(module, x, t, cond) with the conditioning's tensors as plain inputs: the module
    that gets traced (a trace takes tensors, not dataclasses)."""

    def __init__(self, module, eager, template: Conditioning, names: tuple[str, ...]):
        super().__init__()
        self.module, self.eager, self.template, self.names = module, eager, template, names

    def forward(self, x: Tensor, t: Tensor, *parts: Tensor) -> Tensor:
        cond = replace(self.template, **dict(zip(self.names, parts, strict=True)))
        return self.eager(self.module, x, t, cond)


def unet_call_for(device, trace="auto", eager=_sd_eager) -> TracedUNet:
    """A frozen model's denoiser call on `device`: traced (and row-split) when `trace` is True,
    or when it is "auto" and the device is the CPU.  `eager`: the family's plain call."""
    on = torch.device(device).type == "cpu" if trace == "auto" else bool(trace)
    return TracedUNet(enabled=on, eager=eager)


def row_chunks(n: int, k: int) -> list[slice]:
    """n rows in k contiguous chunks whose sizes differ by at most one (k <= n)."""
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + base + (i < extra)
        out.append(slice(start, stop))
        start = stop
    return out


# The row split changes torch's intra-op thread count for the length of one call and restores
# it.  That count is process-wide: two calls at once (two edits in the web app) would read each
# other's temporary value, chunk differently (different rounding) and could restore the wrong
# count.  So a split call holds this lock: concurrent edits take turns call by call, and every
# call sees the thread count the entry point set.
_THREADS = threading.Lock()


class TracedUNet:
    """`call(unet, x, t, cond)`: the UNet's output, through a per-shape trace when enabled.

    cond: a `Conditioning` of x's rows (its token embeddings are what a SD UNet reads).

    parallel: "auto" (on for CPU inputs when torch has >= 2 intra-op threads), True/False:
        split a traced call's rows into one chunk per thread (at most one per row), run the
        chunks concurrently, each with threads // chunks intra-op threads (one on a machine
        with fewer threads than rows; see the module docstring).  The chunking, and so the
        float rounding, follows the thread count.
    """

    def __init__(self, enabled: bool = True, max_traces: int = 8, parallel="auto",
                 eager=_sd_eager):
        self.enabled = bool(enabled)
        self.eager = eager  # the family's plain call: (module, x, t, cond) -> output
        self.max_traces = max_traces
        self.parallel = parallel
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def __len__(self) -> int:
        return len(self._traces)

    def __call__(self, unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if (not self.enabled or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):
            return self.eager(unet, x, t, cond)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        with _THREADS:
            return self._split_call(unet, x, t, cond)

    def _split_call(self, unet, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        k = self.workers(x)
        names, parts = _flat(cond)
        chunks = [(x[c], t[c], *(p[c] for p in parts)) for c in row_chunks(x.shape[0], k)]
        calls = [self._trace_for(unet, cond, names, a) for a in chunks]  # one thread at a time
        if any(c is None for c in calls):
            return self.eager(unet, x, t, cond)
        if k == 1:
            return calls[0](*chunks[0])
        if self._pool_size < k - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(k - 1, thread_name_prefix="dds-unet")
            self._pool_size = k - 1
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // k))
        try:
            futures = [self._pool.submit(f, *a) for f, a in zip(calls[1:], chunks[1:], strict=True)]
            first = calls[0](*chunks[0])
            return torch.cat([first, *(f.result() for f in futures)])
        finally:
            torch.set_num_threads(threads)

    def parallel_on(self, device) -> bool:
        """Whether traced calls on `device` are split ("auto": on the CPU)."""
        if self.parallel == "auto":
            return torch.device(device).type == "cpu"
        return bool(self.parallel)

    def workers(self, x: Tensor) -> int:
        """How many concurrent chunks a traced call on x is split into (1: not split)."""
        return max(1, min(torch.get_num_threads(), x.shape[0])) if self.parallel_on(x.device) else 1

    def _trace_for(self, unet, template: Conditioning, names: tuple[str, ...],
                   args: tuple[Tensor, ...]):
        """The trace for these input shapes (built on first use), or None if tracing failed."""
        if not self.enabled:
            return None
        x = args[0]
        key = (id(unet), type(template), names, tuple((tuple(a.shape), a.dtype) for a in args),
               x.device, x.is_contiguous())
        traced = self._traces.get(key)
        if traced is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings about shape-fixed branches
                    traced = torch.jit.trace(_DenoiserCall(unet, self.eager, template, names),
                                             args, check_trace=False)
            except Exception as e:  # an operator TorchScript cannot record: stay eager
                warnings.warn(
                    f"torch.jit.trace failed for this denoiser ({type(e).__name__}); "
                    "running eager", stacklevel=4,
                )
                self.enabled = False
                return None
            self._traces[key] = traced
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        return traced
