"""What every experiment shares: the data sets (built-in world or the user's images), the edit
sets with the metrics that score them, and small helpers.  Results are kept per unit of work by
`dds.eval.runner`; tables and reports are written by `dds.eval.report`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dds.errors import DDSError
from dds.eval.metrics import (
    REAL_COMPARED,
    REAL_METRICS,
    WORLD_COMPARED,
    WORLD_METRICS,
    References,
    get_metric,
    score_outputs,
)
from dds.eval.seeds import DERANGEMENT_STREAM, HELD_OUT_SEED, SCENES_STREAM


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) with no fixed point (n >= 2), deterministic in `seed`."""
    if n < 2:
        raise DDSError("unaligned pairs need at least 2 images; use more pairs")
    rng = np.random.default_rng([seed, DERANGEMENT_STREAM])
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def timesteps_grid(n: int, t_min: int = 50, t_max: int = 950) -> list[int]:
    """`n` evenly spaced integer timesteps in [t_min, t_max)."""
    return [int(t) for t in np.linspace(t_min, t_max, n, endpoint=False).round()]


def model_name(model) -> str:
    """The model's short name in records ('built-in model' or its folder's name)."""
    return getattr(model, "label", None) or type(model).__name__


# ---- data sets ------------------------------------------------------------------------------
@dataclass
class Captioned:
    """Images with captions (for the score statistics).  z: (N,C,h,w)."""

    z: Tensor
    captions: list[str]
    cond: object  # Conditioning, one row per image


@dataclass
class RelatedPairs:
    """Scene/edit pairs, each image with its own caption: (z_a, y_a) and (z_b, y_b)."""

    z_a: Tensor
    cond_a: object
    z_b: Tensor
    cond_b: object
    captions: list[tuple[str, str]]


@dataclass
class EditSet:
    """Edits to run, what their outputs are scored against, and which registered metrics score
    them (`metrics`), are the two axes (fidelity, preservation) and the quality, and compare two
    methods edit by edit (`compared`)."""

    z_hat: Tensor  # (N,C,h,w) source latents
    cond_source: object  # Conditioning, one row per edit
    cond_target: object
    captions: list[tuple[str, str]]
    kinds: list[str]
    refs: References
    metrics: tuple[str, ...] = WORLD_METRICS
    compared: tuple[str, ...] = WORLD_COMPARED
    fidelity: str = "success_pos"
    preservation: str = "psnr_out"
    quality: str = "psnr_gt"  # the one number convergence tracks

    def __len__(self) -> int:
        return self.z_hat.shape[0]

    @property
    def source01(self) -> Tensor:
        """(N,3,H,W) source images in [0,1]."""
        return self.refs.source

    def score(self, images: Tensor, sl: slice) -> dict[str, np.ndarray]:
        """Per-edit metrics of outputs (n,3,H,W) in [0,1] of edits[sl]."""
        return score_outputs(images, self.refs[sl], self.metrics)

    @property
    def preservation_higher(self) -> bool:
        return get_metric(self.preservation).higher_is_better

    @property
    def metrics_doc(self) -> dict[str, str]:
        return {k: get_metric(k).doc for k in self.metrics}


def embed(model, prompts: Sequence[str]):
    """Conditioning of `prompts` (one row each), each distinct prompt encoded once."""
    from dds.eval.world_edits import PromptTable

    return PromptTable(model, sort=False, chunk=64)(prompts)


def encode01(model, x01: Tensor) -> Tensor:
    """Images (N,3,H,W) in [0,1] -> latents, in batches."""
    with torch.no_grad():
        return torch.cat([model.encode((x01[i:i + 64] * 2 - 1).to(model.device)).float().cpu()
                          for i in range(0, x01.shape[0], 64)])


def world_scenes(n: int, seed: int):
    from dds.world import sample_scene

    rng = np.random.default_rng([seed, SCENES_STREAM])
    return [sample_scene(rng) for _ in range(n)]


def world_captioned(model, n: int, seed: int) -> Captioned:
    from dds.eval.world_edits import images_of
    from dds.world import caption

    scenes = world_scenes(n, seed)
    caps = [caption(s) for s in scenes]
    return Captioned(encode01(model, images_of(scenes)), caps, embed(model, caps))


def world_edit_list(n_per_kind: int, seed: int):
    from dds.eval.world_edits import held_out_edits

    return held_out_edits(n_per_kind, seed=HELD_OUT_SEED + seed)


def world_related(model, n_per_kind: int, seed: int) -> RelatedPairs:
    from dds.eval.world_edits import images_of

    edits = world_edit_list(n_per_kind, seed)
    ya = [e.source_caption for e in edits]
    yb = [e.target_caption for e in edits]
    return RelatedPairs(encode01(model, images_of([e.source for e in edits])), embed(model, ya),
                        encode01(model, images_of([e.target for e in edits])), embed(model, yb),
                        list(zip(ya, yb, strict=True)))


def world_editset(model, n_per_kind: int, seed: int, judge=None) -> EditSet:
    """Held-out one-attribute edits of the built-in world, scored against the exact truth."""
    from dds.eval.world_edits import prepare, world_refs

    edits = world_edit_list(n_per_kind, seed)
    if judge is None:
        from dds.world import Judge

        try:
            judge = Judge.load()
        except FileNotFoundError as e:
            raise DDSError(f"{e}") from None
    p = prepare(model, edits)
    return EditSet(
        z_hat=p.z_hat.float().cpu(), cond_source=p.cond_source, cond_target=p.cond_target,
        captions=[(e.source_caption, e.target_caption) for e in edits],
        kinds=[e.kind for e in edits], refs=world_refs(edits, judge))


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


def real_captioned(model, folder, n: int, size: int | None) -> Captioned:
    rows = read_metadata(folder)[:n]
    x = load_images01(Path(folder), [r["file_name"] for r in rows], size or model.native_size)
    caps = [r["text"] for r in rows]
    return Captioned(encode01(model, x), caps, embed(model, caps))


def real_related(model, folder, n: int, size: int | None) -> RelatedPairs:
    rows = read_metadata(folder, need_target_file=True)[:n]
    s = size or model.native_size
    for r in rows:
        if not r.get("target"):
            raise DDSError(f"row for '{r['file_name']}' lacks a 'target' caption")
    xa = load_images01(Path(folder), [r["file_name"] for r in rows], s)
    xb = load_images01(Path(folder), [r["target_file"] for r in rows], s)
    ya, yb = [r["text"] for r in rows], [r["target"] for r in rows]
    return RelatedPairs(encode01(model, xa), embed(model, ya), encode01(model, xb),
                        embed(model, yb), list(zip(ya, yb, strict=True)))


def real_editset(model, folder, n: int, size: int | None, clip, lpips_model) -> EditSet:
    """User images edited towards their 'target' captions, scored by CLIP score and LPIPS.

    clip: (CLIPModel, tokenizer); lpips_model: an LPIPS module (both injected, see the CLI).
    """
    rows = read_metadata(folder)[:n]
    for r in rows:
        if not r.get("target"):
            raise DDSError(f"row for '{r['file_name']}' lacks a 'target' caption")
    x = load_images01(Path(folder), [r["file_name"] for r in rows], size or model.native_size)
    ys, yt = [r["text"] for r in rows], [r["target"] for r in rows]
    return EditSet(
        z_hat=encode01(model, x), cond_source=embed(model, ys), cond_target=embed(model, yt),
        captions=list(zip(ys, yt, strict=True)), kinds=["user"] * len(rows),
        refs=References(source=x, targets=yt, clip=clip, lpips=lpips_model),
        metrics=REAL_METRICS, compared=REAL_COMPARED, fidelity="clip", preservation="lpips",
        quality="clip")
