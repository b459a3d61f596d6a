"""The resumable runner every evaluation uses: results kept per unit of work.

A run writes into one output folder:
  parts/<unit>.json   one result per unit of work (a setting x a batch), written atomically;
                      a rerun reads the units already there, so an interrupted run resumes.
  parts/settings.json the settings the parts belong to; a rerun with other settings is refused.
A unit's result is returned as a resumed run reads it back (through JSON), so an uninterrupted
run and a resumed one give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dds.errors import DDSError
from dds.eval.report import jsonable, write_json


class Runner:
    """Per-unit results under OUT/parts, tied to one set of settings."""

    def __init__(self, out: Path, settings: dict):
        self.dir = Path(out) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(jsonable(settings), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        meta = self.dir / "settings.json"
        if meta.is_file():
            old = json.loads(meta.read_text()).get("digest")
            if old != digest:
                raise DDSError(f"'{out}' holds parts of a run with other settings; use another "
                               "--out folder or delete its parts/ to start afresh")
        else:
            write_json(meta, {"digest": digest, "settings": json.loads(text)})
        self.computed = 0  # units computed in this run (0 when everything was resumed)
        self.reused = 0

    def has(self, key: str) -> bool:
        return (self.dir / f"{key}.json").is_file()

    def unit(self, key: str, compute: Callable[[], Any],
             on_reuse: Callable[[], None] | None = None):
        """The stored result of unit `key`, or compute it, store it and return it.
        `on_reuse` runs when the stored result is used (e.g. to advance a progress bar)."""
        path = self.dir / f"{key}.json"
        if path.is_file():
            self.reused += 1
            if on_reuse is not None:
                on_reuse()
            return json.loads(path.read_text())
        value = jsonable(compute())
        write_json(path, value)
        self.computed += 1
        return json.loads(json.dumps(value))  # the same floats a resumed run reads back

    def batches(self, prefix: Sequence, slices: Sequence[slice],
                compute: Callable[[slice], dict], on_reuse: Callable[[slice], None] | None = None,
                name_by_start: bool = False, axis: int = 0, tag: str = "b") -> dict[str, np.ndarray]:
        """One unit per batch ('PREFIX-TAG-J', J the batch number or, with `name_by_start`, its
        first row); the per-edit arrays of every batch joined along `axis`."""
        chunks = []
        for j, sl in enumerate(slices):
            key = unit_key(*prefix, tag, sl.start if name_by_start else j)
            chunks.append(self.unit(key, lambda sl=sl: compute(sl),
                                    None if on_reuse is None else lambda sl=sl: on_reuse(sl)))
        return {k: np.concatenate([np.asarray(c[k], dtype=float) for c in chunks], axis=axis)
                for k in chunks[0]}


class MemoryRunner(Runner):
    """A runner that keeps nothing: every unit is computed (returned as a stored one would be)."""

    def __init__(self):
        self.computed = 0
        self.reused = 0

    def has(self, key: str) -> bool:
        return False

    def unit(self, key: str, compute: Callable[[], Any],
             on_reuse: Callable[[], None] | None = None):
        self.computed += 1
        return json.loads(json.dumps(jsonable(compute())))


def open_runner(out: Path | None, settings: dict) -> Runner:
    """A runner keeping its units under `out`, or one that keeps nothing when `out` is None."""
    return MemoryRunner() if out is None else Runner(out, settings)


def unit_key(*parts) -> str:
    """A file-safe unit name: 'dds-7.5-b-0'."""
    return "-".join(str(p).replace("/", "_").replace(" ", "_") for p in parts)


def batches(n: int, size: int) -> list[slice]:
    """Slices of `size` rows covering range(n)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
