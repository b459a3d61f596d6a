"""The pieces both trainers use: a resumable CSV log, atomic sealed folders (exports and
checkpoints) with the newest-intact-checkpoint lookup, the learning-rate schedule and the EMA.

Folders are assembled under a hidden name beside their final place, flushed to disk, optionally
sealed by a manifest (size and sha256 of every file, written last), and then renamed into place:
a reader never sees half a folder, and a checkpoint whose files were damaged afterwards is
recognised and passed over for the one before it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dds.atomic import atomic_path

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------
# CSV log
# --------------------------------------------------------------------------------------------


class CsvLog:
    """A CSV file of one row per logged step.  A resumed run first drops the rows of the steps
    it will redo (`keep`), then appends."""

    def __init__(self, path: str | os.PathLike, fields: list[str]):
        self.path = Path(path)
        self.fields = list(fields)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def keep(self, wanted: Callable[[dict], bool]) -> None:
        """Rewrite the file (atomically) with only the rows for which `wanted(row)` is true."""
        if not self.path.exists():
            return
        rows = [r for r in self.rows() if wanted(r)]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(rows)

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after `step` (those a run resumed at `step` will redo)."""
        self.keep(lambda r: int(r["step"]) <= step)

    def write(self, row: dict) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow(row)


# --------------------------------------------------------------------------------------------
# Atomic sealed folders
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]


def seal(folder: Path, names: list[str] | None = None, manifest: bool = True) -> None:
    """Flush `names` (default: every file of `folder`) to disk; with `manifest`, then write
    manifest.json (size and sha256 of each file), flushed too."""
    folder = Path(folder)
    names = _files(folder) if names is None else names
    entries = {}
    for n in names:
        p = folder / n
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        if manifest:
            entries[n] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    if manifest:
        with open(folder / MANIFEST, "w", encoding="utf-8") as f:
            json.dump({"files": entries}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def staged_folder(final: str | os.PathLike, manifest: bool = True) -> Iterator[Path]:
    """Yield an empty hidden folder beside `final`; when the block ends without an error its
    files are flushed (and sealed by a manifest), it replaces `final` in one rename, and the
    parent folder is flushed.  On an error it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        seal(tmp, manifest=manifest)
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if final.exists():  # written before: swap the new one in, then drop the old one
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, intact sealed folder; None when it is."""
    man = Path(folder) / MANIFEST
    if not man.is_file():
        return "it has no manifest.json, so it was never finished"
    try:
        entries = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for name, e in entries.items():
        p = Path(folder) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != e["bytes"]:
            return f"{name} has {p.stat().st_size} bytes instead of {e['bytes']}"
        if sha256_file(p) != e["sha256"]:
            return f"{name} does not match its recorded checksum"
    return None


# --------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step-N folders of a run
# --------------------------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder of a run, oldest first (not verified)."""
    out = []
    for p in (Path(run) / CHECKPOINTS).glob("step-*"):
        try:
            out.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out)


def latest_good(run: str | os.PathLike, warn: Callable[[str], Any] = print) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported in one sentence."""
    for _, p in reversed(list_checkpoints(run)):
        why = problem(p)
        if why is None:
            return p
        warn(f"checkpoint '{p}' is damaged ({why}) and is skipped; trying the one before it")
    return None


def prune_checkpoints(run: str | os.PathLike, keep: int) -> None:
    """Keep the `keep` newest checkpoints; remove the others and leftovers of killed writers."""
    for _, p in list_checkpoints(run)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in (Path(run) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` atomically (a single-file checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------------------------
# Schedules and EMA
# --------------------------------------------------------------------------------------------


def warmup_cosine(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Learning rate at `step`: linear warm-up over `warmup` steps (step 0 already trains at
    base / warmup), then a cosine decay to `floor * base` at `total`.

    diffusers' `get_scheduler("cosine")` starts its warm-up at 0 and decays to 0, and its
    LambdaLR multiplies base and factor in another order, so its rates differ from this one's
    in the last bits; the recipes of the shipped models are kept as they were trained."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    t = min(max(t, 0.0), 1.0)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


class EMA:
    """Exponential moving average of modules' weights (every float entry of their state dicts,
    buffers too), with diffusers' warm-up: update n (0-based) uses decay min(decay,
    (1 + n) / (10 + n)).

    Not diffusers' `EMAModel`: its first update uses decay 0 (a copy) where this one uses 0.1,
    it updates with `s -= (1 - d) * (s - p)` where this one uses `lerp_` (other rounding), and it
    follows parameters only, so the shipped recipe's EMA weights would change.  Its state is the
    shadow tensors themselves, which a checkpoint saves and restores bit for bit."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                       for name, m in modules.items()}

    @torch.no_grad()
    def copy_from(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, m in modules.items():
            for k, v in m.state_dict().items():
                self.shadow[name][k].copy_(v)

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], n_updates: int) -> None:
        d = min(self.decay, (1 + n_updates) / (10 + n_updates))
        for name, m in modules.items():
            sh = self.shadow[name]
            for k, v in m.state_dict().items():
                if v.dtype.is_floating_point:
                    sh[k].lerp_(v.detach(), 1.0 - d)
                else:
                    sh[k].copy_(v)

    def to(self, device) -> EMA:
        """Move the shadow tensors to `device` (where the modules it follows live)."""
        self.shadow = {name: {k: v.to(device) for k, v in sh.items()}
                       for name, sh in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, s: dict) -> None:
        self.decay = s["decay"]
        self.shadow = s["shadow"]
