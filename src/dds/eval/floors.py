"""The two floors every edit-quality table shows beside the methods.

- no edit: the source image itself scored as the output (what doing nothing scores: full
  preservation, no text fidelity);
- autoencoder round trip: decode(encode(source)), what an edit that leaves the latent where it
  starts scores (every method's output passes through the same decoder).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from dds.eval.world_edits import decode01

FLOOR_LABELS = {"no-edit": "no edit", "round-trip": "autoencoder round trip"}


def floor_output(name: str, model, source01: Tensor, z_source) -> Tensor:
    """Floor `name`'s outputs (N,3,H,W) in [0,1] for sources (N,3,H,W) in [0,1]; z_source:
    their latents (N,C,h,w), or a function that makes them (called only when needed)."""
    if name == "no-edit":
        return source01
    z = z_source() if callable(z_source) else z_source
    return decode01(model, z.to(model.device))


def measure_floors(runner, model, source01: Tensor, z_source: Tensor | Callable[[], Tensor],
                   score: Callable[[Tensor, slice], dict], slices: Sequence[slice],
                   name_by_start: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Per floor, per-edit metrics `score(outputs, rows)` over every row; one runner unit per
    floor and batch ('floor-NAME-rows-J').  z_source may be a function that makes the latents
    of every row, called only when a round-trip unit is computed."""
    def compute(sl, name):
        def rows_z():
            return (z_source() if callable(z_source) else z_source)[sl]

        return score(floor_output(name, model, source01[sl], rows_z), sl)

    return {name: runner.batches(("floor", name), slices, lambda sl, name=name: compute(sl, name),
                                 tag="rows", name_by_start=name_by_start)
            for name in FLOOR_LABELS}
