"""A UNet call recorded once per input shape with `torch.jit.trace`, then replayed.

On a CPU a small diffusion UNet spends much of each call in Python: several hundred module calls,
each a few microseconds of dispatch around a few microseconds of arithmetic.  A trace records the
operators once and replays them without the Python layer: the same operators in the same order,
so the same numbers (the tests compare with the eager call).  A trace is only valid for the
shapes it saw (diffusers' UNet branches on shapes), so one is kept per input shape; the number
kept is bounded.  A UNet that cannot be traced runs eager, with one warning.

Used where the UNet is frozen and called without gradients: the backend's `predict_eps` and the
fast editing path.  On CUDA the fast path compiles instead, so tracing is a CPU default only.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import Tensor


def _eager(unet, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
    return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


class _UNetCall(torch.nn.Module):
    """unet(x, t, emb) -> the prediction as one tensor: the module that gets traced."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        return _eager(self.unet, x, t, emb)


class TracedUNet:
    """`call(unet, x, t, emb)`: the UNet's output, through a per-shape trace when enabled."""

    def __init__(self, enabled: bool = True, max_traces: int = 8):
        self.enabled = bool(enabled)
        self.max_traces = max_traces
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def __len__(self) -> int:
        return len(self._traces)

    def __call__(self, unet, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        if (not self.enabled or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):
            return _eager(unet, x, t, emb)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        key = (id(unet), tuple(x.shape), tuple(t.shape), tuple(emb.shape), x.dtype, emb.dtype,
               x.device, x.is_contiguous())
        traced = self._traces.get(key)
        if traced is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings about shape-fixed branches
                    traced = torch.jit.trace(_UNetCall(unet), (x, t, emb), check_trace=False)
            except Exception as e:  # an operator TorchScript cannot record: stay eager
                warnings.warn(
                    f"torch.jit.trace failed for this UNet ({type(e).__name__}); running eager",
                    stacklevel=3,
                )
                self.enabled = False
                return _eager(unet, x, t, emb)
            self._traces[key] = traced
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        return traced(x, t, emb)
