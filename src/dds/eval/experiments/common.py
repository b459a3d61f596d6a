"""What every experiment shares: resumable per-unit results, tables, settings and data sets.

A run writes into one output folder:
  parts/<unit>.json   one result per unit of work (a setting x a batch), written atomically;
                      a rerun skips the units already there, so an interrupted run resumes.
  parts/settings.json the settings the parts belong to; a rerun with other settings is refused.
  <name>.csv/.json    the tables; <name>.png the plots; report.md the findings in words.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dds.errors import DDSError


def write_atomic(path: Path, text: str) -> None:
    """Write a text file by rename, so a killed run never leaves half a file."""
    from dds.atomic import atomic_write_text

    atomic_write_text(path, text)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, Tensor)):
        return _jsonable(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x).tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = []

    class _W:
        def write(self, s):
            lines.append(s)

    w = csv.DictWriter(_W(), fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(path, "".join(lines))


class Parts:
    """Per-unit results under OUT/parts, tied to one set of settings."""

    def __init__(self, out: Path, settings: dict):
        self.dir = Path(out) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_jsonable(settings), sort_keys=True)
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

    def get(self, key: str, compute: Callable[[], Any]):
        """The stored result of unit `key`, or compute it, store it and return it."""
        path = self.dir / f"{key}.json"
        if path.is_file():
            self.reused += 1
            return json.loads(path.read_text())
        value = _jsonable(compute())
        write_json(path, value)
        self.computed += 1
        return json.loads(json.dumps(value))  # the same floats a resumed run reads back


def unit_key(*parts) -> str:
    """A file-safe unit name: 'dds-g7.5-b0'."""
    return "-".join(str(p).replace("/", "_").replace(" ", "_") for p in parts)


def seed_gen(*ints: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (independent streams per unit)."""
    s = np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) with no fixed point (n >= 2), deterministic in `seed`."""
    if n < 2:
        raise DDSError("unaligned pairs need at least 2 images; use more pairs")
    rng = np.random.default_rng([seed, 7])
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def timesteps_grid(n: int, t_min: int = 50, t_max: int = 950) -> list[int]:
    """`n` evenly spaced integer timesteps in [t_min, t_max)."""
    return [int(t) for t in np.linspace(t_min, t_max, n, endpoint=False).round()]


def model_name(backend) -> str:
    root = getattr(backend, "root", None)
    return Path(root).name if root is not None else type(backend).__name__


def is_builtin(backend) -> bool:
    from dds.builtin import BUILTIN_DIR

    root = getattr(backend, "root", None)
    return root is not None and Path(root).resolve() == BUILTIN_DIR.resolve()


def fmt(x: float, nd: int = 3) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


# ---- data sets ------------------------------------------------------------------------------
@dataclass
class Captioned:
    """Images with captions (for the score statistics).  z: (N,C,h,w)."""

    z: Tensor
    captions: list[str]
    emb: Tensor  # (N,L,D)


@dataclass
class RelatedPairs:
    """Scene/edit pairs, each image with its own caption: (z_a, y_a) and (z_b, y_b)."""

    z_a: Tensor
    emb_a: Tensor
    z_b: Tensor
    emb_b: Tensor
    captions: list[tuple[str, str]]


@dataclass
class EditSet:
    """Edits to run, with how to score outputs and which metrics are the two axes."""

    z_hat: Tensor  # (N,C,h,w) source latents
    emb_source: Tensor  # (N,L,D)
    emb_target: Tensor
    captions: list[tuple[str, str]]
    kinds: list[str]
    score: Callable[[Tensor, slice], dict[str, np.ndarray]]  # images (n,3,H,W) in [0,1]
    source01: Tensor  # (N,3,H,W) source images in [0,1]
    fidelity: str = "success"  # higher is better
    preservation: str = "psnr_out"
    preservation_higher: bool = True
    quality: str = "psnr_gt"  # the one number convergence tracks (higher is better)
    metrics_doc: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.z_hat.shape[0]


def embed(backend, prompts: Sequence[str]) -> Tensor:
    """Prompt embeddings (N,L,D), each distinct prompt encoded once."""
    uniq = list(dict.fromkeys(prompts))
    table = {}
    for i in range(0, len(uniq), 64):
        for p, e in zip(uniq[i:i + 64], backend.encode_prompt(uniq[i:i + 64]), strict=True):
            table[p] = e
    return torch.stack([table[p] for p in prompts])


def encode01(backend, x01: Tensor) -> Tensor:
    """Images (N,3,H,W) in [0,1] -> latents, in batches."""
    with torch.no_grad():
        return torch.cat([backend.encode((x01[i:i + 64] * 2 - 1).to(backend.device)).float().cpu()
                          for i in range(0, x01.shape[0], 64)])


def world_scenes(n: int, seed: int):
    from dds.world import sample_scene

    rng = np.random.default_rng([seed, 4242])
    return [sample_scene(rng) for _ in range(n)]


def world_captioned(backend, n: int, seed: int) -> Captioned:
    from dds.eval.world_edits import images_of
    from dds.world import caption

    scenes = world_scenes(n, seed)
    caps = [caption(s) for s in scenes]
    return Captioned(encode01(backend, images_of(scenes)), caps, embed(backend, caps))


def world_edit_list(n_per_kind: int, seed: int):
    from dds.eval.world_edits import HELD_OUT_SEED, held_out_edits

    return held_out_edits(n_per_kind, seed=HELD_OUT_SEED + seed)


def world_related(backend, n_per_kind: int, seed: int) -> RelatedPairs:
    from dds.eval.world_edits import images_of

    edits = world_edit_list(n_per_kind, seed)
    ya = [e.source_caption for e in edits]
    yb = [e.target_caption for e in edits]
    return RelatedPairs(encode01(backend, images_of([e.source for e in edits])), embed(backend, ya),
                        encode01(backend, images_of([e.target for e in edits])), embed(backend, yb),
                        list(zip(ya, yb, strict=True)))


def world_editset(backend, n_per_kind: int, seed: int, judge=None) -> EditSet:
    """Held-out one-attribute edits of the built-in world, scored against the exact truth."""
    from dds.eval.world_edits import images_of, prepare, score

    edits = world_edit_list(n_per_kind, seed)
    if judge is None:
        from dds.world import Judge

        try:
            judge = Judge.load()
        except FileNotFoundError as e:
            raise DDSError(f"{e}") from None
    p = prepare(backend, edits)
    return EditSet(
        z_hat=p.z_hat.float().cpu(), emb_source=p.emb_source, emb_target=p.emb_target,
        captions=[(e.source_caption, e.target_caption) for e in edits],
        kinds=[e.kind for e in edits],
        score=lambda images, sl: score(images, edits[sl], judge),
        source01=images_of([e.source for e in edits]),
        metrics_doc={
            "success": "judge reads the edited attribute as its target value (text fidelity)",
            "psnr_gt": "PSNR (dB) to the exact ground-truth re-render",
            "psnr_out": "PSNR (dB) to the source outside the edited region (preservation)",
            "ssim_out": "SSIM to the source outside the edited region",
        },
    )


# ---- user-supplied data (real models) ---------------------------------------------------------
def read_metadata(folder: str | Path | None, need_target_file: bool = False) -> list[dict]:
    """Rows of {file_name, text, target[, target_file]} from FOLDER/metadata.jsonl."""
    if folder is None:
        raise DDSError("a real model needs images with captions: give --data FOLDER holding "
                       "metadata.jsonl rows {file_name, text, target}")
    meta = Path(folder) / "metadata.jsonl"
    if not meta.is_file():
        raise DDSError(f"'{meta}' not found; --data needs a metadata.jsonl with rows "
                       "{file_name, text, target}")
    rows = []
    for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise DDSError(f"line {i} of '{meta}' is not valid JSON") from None
        if not r.get("file_name") or not r.get("text"):
            raise DDSError(f"line {i} of '{meta}' lacks 'file_name' or 'text'")
        if need_target_file and not r.get("target_file"):
            raise DDSError(f"line {i} of '{meta}' lacks 'target_file' (an image of the edit, "
                           "captioned by 'target'), which this experiment needs")
        rows.append(r)
    if len(rows) < 2:
        raise DDSError(f"'{meta}' needs at least 2 rows")
    return rows


def load_images01(folder: Path, names: Sequence[str], size: int) -> Tensor:
    """Images from `folder`, centre-cropped square and resized to size x size, in [0,1]."""
    from dds.images import load_image, pil_to_tensor, prepare

    out = []
    for n in names:
        p = Path(folder) / n
        if not p.is_file():
            raise DDSError(f"image '{p}' listed in metadata.jsonl not found")
        out.append((pil_to_tensor(prepare(load_image(p), size, crop=True)) + 1) / 2)
    return torch.cat(out)


def real_captioned(backend, folder, n: int, size: int | None) -> Captioned:
    rows = read_metadata(folder)[:n]
    x = load_images01(Path(folder), [r["file_name"] for r in rows], size or backend.native_size)
    caps = [r["text"] for r in rows]
    return Captioned(encode01(backend, x), caps, embed(backend, caps))


def real_related(backend, folder, n: int, size: int | None) -> RelatedPairs:
    rows = read_metadata(folder, need_target_file=True)[:n]
    s = size or backend.native_size
    for r in rows:
        if not r.get("target"):
            raise DDSError(f"row for '{r['file_name']}' lacks a 'target' caption")
    xa = load_images01(Path(folder), [r["file_name"] for r in rows], s)
    xb = load_images01(Path(folder), [r["target_file"] for r in rows], s)
    ya, yb = [r["text"] for r in rows], [r["target"] for r in rows]
    return RelatedPairs(encode01(backend, xa), embed(backend, ya), encode01(backend, xb),
                        embed(backend, yb), list(zip(ya, yb, strict=True)))


def real_editset(backend, folder, n: int, size: int | None, clip, lpips_model) -> EditSet:
    """User images edited towards their 'target' captions, scored by CLIP score and LPIPS.

    clip: (CLIPModel, tokenizer); lpips_model: an LPIPS module (both injected, see the CLI).
    """
    from dds.eval.clip_score import clip_score
    from dds.eval.lpips import lpips_distance

    rows = read_metadata(folder)[:n]
    for r in rows:
        if not r.get("target"):
            raise DDSError(f"row for '{r['file_name']}' lacks a 'target' caption")
    x = load_images01(Path(folder), [r["file_name"] for r in rows], size or backend.native_size)
    ys, yt = [r["text"] for r in rows], [r["target"] for r in rows]

    def score(images, sl):
        return {
            "clip": clip_score(clip[0], clip[1], images, yt[sl]).numpy(),
            "lpips": lpips_distance(lpips_model, images, x[sl]).numpy(),
        }

    return EditSet(
        z_hat=encode01(backend, x), emb_source=embed(backend, ys), emb_target=embed(backend, yt),
        captions=list(zip(ys, yt, strict=True)), kinds=["user"] * len(rows), score=score,
        source01=x, fidelity="clip", preservation="lpips", preservation_higher=False,
        quality="clip",
        metrics_doc={"clip": "CLIP score of the output and the target caption (100 x cosine)",
                     "lpips": "LPIPS (AlexNet) between the output and the source (lower keeps more)"},
    )
