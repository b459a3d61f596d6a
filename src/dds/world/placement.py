"""Where the edited object is: the position half of an edit's success.

The judge reads attributes from pooled features, so it does not see where an object is or how
large it is: a recoloured blob in the wrong place, or a shrunken one, reads as a successful
colour edit.  Here an output is compared with the exact ground truth by silhouettes.

Silhouette of an object in an image: the pixels of its search window whose colour is nearer the
object's colour than the truth's background at that pixel (the exact textured background,
re-rendered) and than what the edit replaced (the old object colour of a colour edit, the old
background of a background edit).  An exact render's pixel of coverage a is a*c + (1-a)*bg: its
distance to the object colour c is (1-a)|c-bg| and to the background a|c-bg|, so the silhouette
of the exact truth is its pixels of coverage > 1/2, the truth's object mask itself (IoU 1; the
rivals take at most a few edge pixels).  Decoder blur and small colour errors move edge pixels
only.  The search window is the disc of radius (BOUND + 1) * size around the truth object's
centre (every shape fits in BOUND * size, so this leaves one object radius of room around it)
without the pixels that any other object of the truth covers (it may share the colour).  A blob
moved from the truth's place or grown past it adds pixels to the union; a shrunken or missing
one leaves the truth's mask uncovered: either lowers the IoU.

Rules, per edit kind (IoU >= 1/2 is the usual "same object" threshold of detection benchmarks;
a circle moved by half its width scores 0.24, one shrunk to 0.6 of its radius 0.36):

- object_color, add_object: the edited object's silhouette (in its target colour) overlaps the
  truth's object mask with IoU >= 1/2 (the source fails: its object has the old colour);
- object_shape: the same, and the IoU with the target-shape mask is larger than with the source
  shape at the same place, so a kept source shape that happens to overlap the new one (a circle
  and a square) fails;
- background_color: every object is kept: IoU >= 1/2 for each object of the truth (the source
  passes this part; the judge's reading of the background fails it);
- remove_object: the remaining objects are kept (IoU >= 1/2 each) and the removed object's
  silhouette at its place has IoU < 1/2 with its source mask.

This is the position half only; an edit's success is the judge's reading of the attribute and
this (`Judge.edit_success_placed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dds.world.scene import (
    BOUND,
    COLORS,
    Edit,
    Scene,
    _grid,
    object_masks,
    render_background,
)

IOU_MIN = 0.5  # the silhouette overlaps the truth's object at least this much
WINDOW = BOUND + 1.0  # search window radius, in units of the object's size


def as_hwc(images: Any) -> np.ndarray:
    """(N,3,H,W) / (N,H,W,3) tensor or array (or one image) in [0,1] -> (N,H,W,3) float32."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[None]
    if x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"expected square images, got shape {x.shape}")
    return x.astype(np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def silhouette(image: np.ndarray, scene: Scene, k: int, rivals: Sequence[np.ndarray] = ()
               ) -> np.ndarray:
    """Pixels (H,W) of `image` (H,W,3) read as object `k` of `scene` (the truth): in its search
    window, nearer the object's colour than the truth's background there and than each of
    `rivals` (colours (3,) or images (H,W,3): what the edit replaced)."""
    size = image.shape[0]
    o = scene.objects[k]
    X, Y = _grid(size)
    window = np.hypot(X - o.x, Y - o.y) <= WINDOW * o.size
    masks = object_masks(scene, size)
    others = np.delete(masks, k, axis=0)
    if len(others):
        window &= others.sum(axis=0) <= 0.0
    d_obj = np.linalg.norm(image - np.asarray(COLORS[o.color], dtype=np.float32), axis=-1)
    for other in (render_background(scene, size), *rivals):
        window &= d_obj < np.linalg.norm(image - other, axis=-1)
    return window


def _mask(scene: Scene, k: int, size: int) -> np.ndarray:
    return object_masks(scene, size)[k] > 0.5


def _kept(image: np.ndarray, scene: Scene, rivals: Sequence[np.ndarray] = ()) -> float:
    """The smallest IoU over the objects of `scene` (1 when it has none)."""
    size = image.shape[0]
    return min((iou(silhouette(image, scene, k, rivals), _mask(scene, k, size))
                for k in range(len(scene.objects))), default=1.0)


def placement(image: np.ndarray, edit: Edit) -> tuple[float, bool]:
    """(IoU, placed) of one output `image` (H,W,3) in [0,1] of `edit` (module docstring)."""
    size, t, k = image.shape[0], edit.target, edit.obj_index
    if edit.kind in ("object_color", "object_shape", "add_object"):
        old = [np.asarray(COLORS[edit.old_value], np.float32)] if edit.kind == "object_color" else []
        sil = silhouette(image, t, k, old)
        score = iou(sil, _mask(t, k, size))
        placed = score >= IOU_MIN
        if edit.kind == "object_shape":
            placed = placed and score > iou(sil, _mask(edit.source, k, size))
        return score, placed
    if edit.kind == "background_color":
        score = _kept(image, t, [render_background(edit.source, size)])
        return score, score >= IOU_MIN
    if edit.kind == "remove_object":
        score = _kept(image, t)
        gone = iou(silhouette(image, edit.source, k), _mask(edit.source, k, size)) < IOU_MIN
        return score, score >= IOU_MIN and gone
    raise ValueError(f"unknown edit kind {edit.kind!r}")


def edit_placement(images: Any, edits: Sequence[Edit]) -> tuple[np.ndarray, np.ndarray]:
    """Per output of `edits`: the IoU its rule reads (N,) and whether it is placed (N,) bool."""
    x = as_hwc(images)
    if len(x) != len(edits):
        raise ValueError(f"{len(x)} images for {len(edits)} edits")
    out = [placement(im, e) for im, e in zip(x, edits, strict=True)]
    return (np.array([s for s, _ in out], dtype=float), np.array([p for _, p in out], dtype=bool))


def edit_placed(images: Any, edits: Sequence[Edit]) -> np.ndarray:
    """Per output of `edits`: is the edited object where the truth's is (bool (N,))?"""
    return edit_placement(images, edits)[1]
