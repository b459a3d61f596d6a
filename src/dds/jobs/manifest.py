"""The manifest of a dataset edit: one JSON line per finished or failed job, beside the outputs.

Each process appends to its own shard, `manifest-<rank>.jsonl` in the output folder, one line
per job written with a single `write` on a file opened for appending and made durable with
`fsync` after each batch, so a killed process leaves at most one torn last line (which readers
skip, and the next writer ends with a newline before appending).  Readers take every shard and
the merged `manifest.jsonl` together; when a job has several records (a failure, then a
success on a rerun), the latest wins.  `merge` writes that view as `manifest.jsonl`
(atomically, sorted by job) and removes the shards.

A record (`record`): key, index, image, source, target, out (relative to the output folder when
inside it), seed, status ("ok" or "failed"), error (the sentence, when failed), seconds (the
job's share of its batch's wall time: load, encode, edit, decode, write), batch (how many edits
shared its denoiser calls), started and finished (Unix times), rank, settings (what the command
line asked: method, steps, guidance, ..., size, crop, model, precision, base seed), config (the
resolved `EditConfig`, with the job's seed), runtime (device, precision, threads, processes),
notes, metrics (when the truth is known) and floors (the same metrics for the source itself,
"no-edit", and its autoencoder round trip, "round-trip"), truth and edit (the world edit) when
given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from dds.atomic import atomic_write_text

MERGED = "manifest.jsonl"
SHARD_RE = re.compile(r"manifest-(\d+)\.jsonl")
OK, FAILED = "ok", "failed"


def shard_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"manifest-{rank}.jsonl"


def manifest_files(out_dir: Path) -> list[Path]:
    """The merged manifest (first) and every shard (by rank) in `out_dir`."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    shards = sorted((p for p in d.iterdir() if SHARD_RE.fullmatch(p.name)),
                    key=lambda p: int(SHARD_RE.fullmatch(p.name).group(1)))
    return ([d / MERGED] if (d / MERGED).is_file() else []) + shards


class ShardWriter:
    """Appends records to one process's shard; each record is one `write` of one line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:  # a torn last line (a killed writer) is closed before appending
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        os.write(self._fd, b"\n")
        return self._fd

    def write(self, rec: dict) -> None:
        data = (json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._open()
        view = memoryview(data)
        while view:  # a regular file takes the whole line at once; loop only on a short write
            n = os.write(fd, view)
            view = view[n:]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def read_lines(path: Path) -> Iterable[dict]:
    """The records of one manifest file; lines that are not JSON objects (torn) are skipped."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and "key" in rec and "status" in rec:
            yield rec


def read_records(out_dir: Path) -> dict[str, dict]:
    """The latest record of every job recorded in `out_dir` (all shards and the merged file)."""
    latest: dict[str, dict] = {}
    for path in manifest_files(out_dir):
        for rec in read_lines(path):
            old = latest.get(rec["key"])
            if old is None or float(rec.get("finished") or 0) >= float(old.get("finished") or 0):
                latest[rec["key"]] = rec
    return latest


def merge(out_dir: Path) -> tuple[Path, dict[str, dict]]:
    """Write the latest record of every job to `manifest.jsonl` (sorted by job index, then
    key) and remove the shards; returns the file and the records."""
    out_dir = Path(out_dir)
    shards = [p for p in manifest_files(out_dir) if p.name != MERGED]
    recs = read_records(out_dir)
    rows = sorted(recs.values(), key=lambda r: (int(r.get("index", 0)), str(r["key"])))
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    path = atomic_write_text(out_dir / MERGED, text)
    for p in shards:
        p.unlink(missing_ok=True)
    return path, recs


def summarise(recs: Iterable[dict]) -> dict:
    """Counts by status, the mean of every metric over the successful jobs, and of each
    floor's metrics over the jobs that recorded them ({floor: {metric: mean}})."""
    recs = list(recs)
    ok = [r for r in recs if r.get("status") == OK]
    sums = _values(r.get("metrics") for r in ok)
    names = dict.fromkeys(k for r in ok for k in (r.get("floors") or {}))
    floors = {f: _values((r.get("floors") or {}).get(f) for r in ok) for f in names}
    return {"ok": len(ok), "failed": sum(r.get("status") == FAILED for r in recs),
            "metrics": {k: sum(v) / len(v) for k, v in sums.items()},
            "scored": max((len(v) for v in sums.values()), default=0),
            "floors": {f: {k: sum(v) / len(v) for k, v in d.items()} for f, d in floors.items()}}


def _values(dicts) -> dict[str, list[float]]:
    """Every numeric value of the dicts, listed by key (None and non-numbers skipped)."""
    out: dict[str, list[float]] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, (int, float)):
                out.setdefault(k, []).append(float(v))
    return out
