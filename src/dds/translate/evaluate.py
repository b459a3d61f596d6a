"""Evaluate a translation network on the built-in world against zero-shot DDS and SDEdit.

For each task that is a world rule (OLD:NEW on shapes or object colours), held-out scenes with
exactly one OLD object are edited; the re-render of the rule's target scene is the exact
answer.  Reported per method and task (means):

- success, psnr_gt, psnr_out, ssim_out: the registered world metrics, as
  `dds.eval.world_edits.score` (judge, PSNR to the ground truth, PSNR/SSIM to the source
  outside the edited object); the two floors (no edit, autoencoder round trip) are reported
  beside the methods when a base model is loaded;
- images_per_s: wall-clock throughput of the method (one pass for the network);
- mode collapse (paper Fig. 7): the edited object is found in the output as the pixels that
  differ from the scene's background (outside the other objects), and its centre and size are compared with the input
  object's: pos_err (pixels), pos_corr_x / pos_corr_y / size_corr (correlation over the set: 1
  when the output follows the input, about 0 for a fixed place), and mask_iou_pairwise (mean IoU
  between the objects of different outputs: high when every output has the same object in the
  same place, i.e. low diversity).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from dds.errors import DDSError
from dds.eval.seeds import TRANSLATION_TEST_SEED


def world_task_edits(task, n: int, seed: int = TRANSLATION_TEST_SEED) -> list:
    """n held-out Edits for a world rule task: scenes with exactly one object matching OLD."""
    from dds.world import SHAPES, Edit, caption, sample_scene

    if len(task.replace) != 1:
        return []
    old, new = task.replace[0]
    out, i = [], 0
    while len(out) < n and i < 200 * n:
        rng = np.random.default_rng([seed, i])
        i += 1
        s = sample_scene(rng)
        tgt = task.target_scene(s)
        if tgt is NotImplemented:
            return []
        if tgt is None:
            continue
        key = "shape" if old in SHAPES else "color"
        hits = [j for j, o in enumerate(s.objects) if getattr(o, key) == old]
        if len(hits) != 1:
            continue
        out.append(Edit(source=s, target=tgt, kind=f"object_{key}", obj_index=hits[0],
                        source_caption=caption(s), target_caption=caption(tgt),
                        attribute=key, old_value=old, new_value=new))
    return out


def object_geometry(images: torch.Tensor, edits) -> dict[str, np.ndarray]:
    """Centre (x, y) and size (sqrt of area) of the edited object in each image: the pixels that
    differ from the scene's background render, outside the other (unedited) objects."""
    from dds.world import object_masks, render_background

    x = images.float().clamp(0, 1)  # (N,3,h,w)
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    out = {"x": np.zeros(n), "y": np.zeros(n), "size": np.zeros(n)}
    masks = []
    for i, e in enumerate(edits):
        bg = torch.from_numpy(render_background(e.source, h)).permute(2, 0, 1).float()
        m = ((x[i] - bg).abs().amax(0) > 0.2).float()  # (h,w)
        others = [k for k in range(len(e.source.objects)) if k != e.obj_index]
        if others:
            om = torch.from_numpy(object_masks(e.source, h)[others].sum(0)).float()
            m = m * (om < 0.01)
        a = m.sum()
        masks.append(m)
        if a > 0:
            out["x"][i] = float((m * xs).sum() / a)
            out["y"][i] = float((m * ys).sum() / a)
        out["size"][i] = float(a.sqrt())
    out["masks"] = torch.stack(masks).numpy() if masks else np.zeros((0, h, w))
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def collapse_metrics(images: torch.Tensor, edits) -> dict[str, float]:
    """How much the edited object follows the input's position and size (see module doc)."""
    from dds.eval.world_edits import images_of

    src = object_geometry(images_of([e.target for e in edits]), edits)  # where it should be
    got = object_geometry(images, edits)
    m = got["masks"].reshape(len(edits), -1) > 0
    inter = (m[:, None] & m[None]).sum(-1)
    union = (m[:, None] | m[None]).sum(-1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    off = ~np.eye(len(edits), dtype=bool)
    return {
        "pos_err": float(np.mean(np.hypot(got["x"] - src["x"], got["y"] - src["y"]))),
        "pos_corr_x": _corr(got["x"], src["x"]),
        "pos_corr_y": _corr(got["y"], src["y"]),
        "size_corr": _corr(got["size"], src["size"]),
        "mask_iou_pairwise": float(iou[off].mean()) if off.any() else 0.0,
    }


def _to64(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] == 64 else F.interpolate(x, size=(64, 64), mode="bilinear",
                                                     antialias=True, align_corners=False)


def evaluate(checkpoint, n_per_task: int = 32, baselines=("dds", "sdedit"), base_model=None,
             judge=None, sdedit_strength: float = 0.6, dds_steps: int | None = None, batch_size: int = 32,
             quiet: bool = False) -> dict:
    """Metrics of the network (and baselines) per task; returns a JSON-able dict."""
    from dds.eval.world_edits import decode01, images_of, prepare, run_zero_shot, score
    from dds.models import get_model
    from dds.pipeline import edit_config
    from dds.sampling import sdedit
    from dds.translate.data import Task
    from dds.translate.network import Translator
    from dds.world import Judge

    tr = checkpoint if isinstance(checkpoint, Translator) else Translator(checkpoint, base_model)
    if judge is None or isinstance(judge, str):
        try:
            judge = Judge.load(judge)
        except FileNotFoundError as e:
            raise DDSError(f"{e}; the world judge is needed to score edits") from None
    model = None
    if baselines:
        base = base_model or (None if tr.cfg.base_model == "builtin" else tr.cfg.base_model)
        model = get_model(base)
    report: dict = {"checkpoint": str(tr.folder), "n_per_task": n_per_task, "tasks": {}}
    for td in tr.cfg.tasks:
        task = Task.from_dict(td)
        edits = world_task_edits(task, n_per_task)
        if not edits:
            report["tasks"][task.name] = {"skipped": "not a shape or colour rule of the world"}
            continue
        res = {}
        x = F.interpolate(images_of([e.source for e in edits]), size=tr.cfg.resolution,
                          mode="bilinear", antialias=True) if tr.cfg.resolution != 64 else \
            images_of([e.source for e in edits])
        t0 = time.perf_counter()
        out = torch.cat([tr.edit_tensor(x[i:i + batch_size], task.name)
                         for i in range(0, len(edits), batch_size)])
        outs = {"network": (_to64(out), time.perf_counter() - t0)}
        if "dds" in baselines:
            cfg = edit_config(model, steps=dds_steps)
            t0 = time.perf_counter()
            im = run_zero_shot(model, edits, cfg, batch_size=batch_size, quiet=quiet)
            outs["zero_shot_dds"] = (im, time.perf_counter() - t0)
        if "sdedit" in baselines:
            t0 = time.perf_counter()
            p = prepare(model, edits)
            zs = [sdedit(model, p.z_hat[i:i + batch_size], p.cond_target[i:i + batch_size],
                         sdedit_strength, seed=i) for i in range(0, len(edits), batch_size)]
            outs["sdedit"] = (decode01(model, torch.cat(zs)), time.perf_counter() - t0)
        for name, (im, secs) in outs.items():
            m = {k: float(np.mean(v)) for k, v in score(im, edits, judge).items()}
            m.update(collapse_metrics(im, edits))
            m["images_per_s"] = len(edits) / max(secs, 1e-9)
            res[name] = m
        if model is not None:
            res.update(floor_figures(model, edits, judge))
        report["tasks"][task.name] = res
    return report


def floor_figures(model, edits, judge) -> dict[str, dict[str, float]]:
    """The means of the world metrics of the two floors (no edit, autoencoder round trip)."""
    from dds.eval.floors import measure_floors
    from dds.eval.runner import open_runner
    from dds.eval.world_edits import images_of, prepare, score

    floors = measure_floors(open_runner(None, {}), model, images_of([e.source for e in edits]),
                            lambda: prepare(model, edits).z_hat,
                            lambda im, sl: score(im, edits[sl], judge), [slice(0, len(edits))])
    return {name: {k: float(np.mean(v)) for k, v in m.items()} for name, m in floors.items()}


def main_eval(args) -> int:
    """`dds translate-eval`: print (and optionally write) the JSON report."""
    from pathlib import Path

    baselines = tuple(b for b in (args.baselines or "").split(",") if b)
    bad = set(baselines) - {"dds", "sdedit"}
    if bad:
        raise DDSError(f"--baselines {args.baselines!r} is invalid; use a comma list of dds, sdedit")
    rep = evaluate(args.model, n_per_task=args.n, baselines=baselines, base_model=args.base_model,
                   judge=args.judge, sdedit_strength=args.sdedit_strength,
                   dds_steps=args.dds_steps, quiet=args.quiet)
    text = json.dumps(rep, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0
