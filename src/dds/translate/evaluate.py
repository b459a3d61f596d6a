"""Evaluate a translation network on the built-in world against zero-shot DDS and SDEdit.

For each task that is a world rule (OLD:NEW on shapes or object colours), held-out scenes with
exactly one OLD object are edited; the re-render of the rule's target scene is the exact
answer.  Reported per method and task (means; PSNR to the truth also as a gain over the
source, psnr_gain, and success also position-aware, success_pos):

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

Pooled over the tasks ('all'), the network is compared with each baseline edit by edit (the
same held-out edits; `dds.eval.paired`: 95% intervals, 'no difference' when one holds zero),
and every edit's metrics are kept with the edits' digest, so that `dds translate-compare` can
pair two networks evaluated on the same edits (a recipe against its ablation).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from dds.errors import DDSError
from dds.eval.seeds import TRANSLATION_TEST_SEED
from dds.eval.world_edits import score


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


NETWORK = "network"
METHOD_LABELS = {NETWORK: "one-pass network", "zero_shot_dds": "zero-shot DDS",
                 "sdedit": "SDEdit"}


def evaluate(checkpoint, n_per_task: int = 32, baselines=("dds", "sdedit"), base_model=None,
             judge=None, sdedit_strength: float = 0.6, dds_steps: int | None = None, batch_size: int = 32,
             quiet: bool = False) -> dict:
    """Metrics of the network (and baselines) per task and pooled over the tasks, its paired
    differences from each baseline, and every edit's metrics; returns a JSON-able dict."""
    from dds.models import get_model
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
    report: dict = {"checkpoint": str(tr.folder), "n_per_task": n_per_task,
                    "test_seed": TRANSLATION_TEST_SEED, "tasks": {}}
    per: dict[str, list[dict]] = {}  # method or floor -> per-task {metric: per-edit values}
    edits_all: list = []
    for td in tr.cfg.tasks:
        task = Task.from_dict(td)
        edits = world_task_edits(task, n_per_task)
        if not edits:
            report["tasks"][task.name] = {"skipped": "not a shape or colour rule of the world"}
            continue
        res = {}
        outs = _task_outputs(tr, task, edits, model, baselines, sdedit_strength, dds_steps,
                             batch_size, quiet)
        for name, (im, secs) in outs.items():
            metrics = score(im, edits, judge)
            per.setdefault(name, []).append(metrics)
            res[name] = {k: float(np.mean(v)) for k, v in metrics.items()}
            res[name].update(collapse_metrics(im, edits))
            res[name]["images_per_s"] = len(edits) / max(secs, 1e-9)
        if model is not None:
            for name, metrics in floor_metrics(model, edits, judge).items():
                per.setdefault(name, []).append(metrics)
                res[name] = {k: float(np.mean(v)) for k, v in metrics.items()}
        report["tasks"][task.name] = res
        edits_all += [(task.name, e) for e in edits]
    report.update(pooled(per, edits_all))
    return report


def _task_outputs(tr, task, edits, model, baselines, sdedit_strength, dds_steps, batch_size,
                  quiet) -> dict[str, tuple[torch.Tensor, float]]:
    """{method: (outputs (N,3,64,64) in [0,1], seconds)} for the network and the baselines."""
    from dds.eval.world_edits import decode01, images_of, prepare, run_zero_shot
    from dds.pipeline import edit_config
    from dds.sampling import sdedit

    x = images_of([e.source for e in edits])
    if tr.cfg.resolution != 64:
        x = F.interpolate(x, size=tr.cfg.resolution, mode="bilinear", antialias=True)
    t0 = time.perf_counter()
    out = torch.cat([tr.edit_tensor(x[i:i + batch_size], task.name)
                     for i in range(0, len(edits), batch_size)])
    outs = {NETWORK: (_to64(out), time.perf_counter() - t0)}
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
    return outs


def floor_metrics(model, edits, judge) -> dict[str, dict[str, np.ndarray]]:
    """The world metrics of the two floors (no edit, autoencoder round trip), edit by edit."""
    from dds.eval.floors import measure_floors
    from dds.eval.runner import open_runner
    from dds.eval.world_edits import images_of, prepare

    return measure_floors(open_runner(None, {}), model, images_of([e.source for e in edits]),
                          lambda: prepare(model, edits).z_hat,
                          lambda im, sl: score(im, edits[sl], judge), [slice(0, len(edits))])


def edits_digest(edits_all) -> str:
    """A short fingerprint of the (task, edit) list: two reports with the same one scored the
    same edits, so their networks can be compared edit by edit."""
    text = "\n".join(f"{t}|{e.source_caption}|{e.target_caption}|{e.obj_index}"
                      for t, e in edits_all)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pooled(per: dict[str, list[dict]], edits_all) -> dict:
    """Over all tasks: each method's means ('all'), the network against each baseline edit by
    edit (PAIRED, `dds.eval.paired.compare_methods`, per task and over all), and every edit's
    metrics with its task and the edits' digest (what `dds translate-compare` pairs)."""
    from dds.eval.metrics import WORLD_COMPARED
    from dds.eval.paired import PAIRED, compare_methods

    if not edits_all:
        return {}
    flat = {name: {k: np.concatenate([m[k] for m in ms]) for k in ms[0]} for name, ms in per.items()}
    tasks = [t for t, _ in edits_all]
    return {
        "all": {name: {k: float(np.mean(v)) for k, v in m.items()} for name, m in flat.items()},
        PAIRED: [compare_methods(flat, tasks, WORLD_COMPARED, NETWORK, b,
                                 (METHOD_LABELS[NETWORK], METHOD_LABELS[b]))
                 for b in flat if b in METHOD_LABELS and b != NETWORK],
        "edits": {"task": tasks, "digest": edits_digest(edits_all)},
        "per_edit": {name: {k: v.tolist() for k, v in m.items()} for name, m in flat.items()},
    }


def report_text(report: dict) -> str:
    """The report as markdown: pooled means with the floors, then each paired comparison."""
    from dds.eval.floors import FLOOR_LABELS
    from dds.eval.metrics import WORLD_METRICS
    from dds.eval.paired import PAIRED, comparison_text
    from dds.eval.report import metric_table

    if "all" not in report:
        return "No task of this network is a rule of the built-in world: nothing was scored.\n"
    n = len(report["edits"]["task"])
    rows = [((METHOD_LABELS.get(k, FLOOR_LABELS.get(k, k)),), v) for k, v in report["all"].items()]
    text = (f"{report['checkpoint']}: {n} held-out edits ({report['n_per_task']} per task; "
            f"tasks {', '.join(dict.fromkeys(report['edits']['task']))}), means over all tasks:\n\n"
            + metric_table(rows, ["method"], WORLD_METRICS, unranked=FLOOR_LABELS.values()))
    text += "\n" + collapse_text(report)
    for c in report.get(PAIRED, []):
        text += "\n" + comparison_text(c)
    return text


COLLAPSE_COLUMNS = {"pos_err": "centre error (px)", "pos_corr_x": "centre corr x",
                    "pos_corr_y": "centre corr y", "size_corr": "size corr",
                    "mask_iou_pairwise": "pairwise IoU", "images_per_s": "images/s"}


def collapse_text(report: dict) -> str:
    """Mode-collapse measures and throughput per method, the mean over the tasks."""
    rows = {}
    for res in report["tasks"].values():
        for name, m in res.items():
            if name in METHOD_LABELS:
                rows.setdefault(name, []).append([m.get(k, np.nan) for k in COLLAPSE_COLUMNS])
    lines = ["Mode collapse (1: the edited object follows the input; a high pairwise IoU: every "
             "output puts it in the same place) and throughput, the mean over the tasks:\n",
             "| method | " + " | ".join(COLLAPSE_COLUMNS.values()) + " |",
             "|" + " --- |" * (len(COLLAPSE_COLUMNS) + 1)]
    for name, vals in rows.items():
        mean = np.nanmean(np.asarray(vals, dtype=float), axis=0)
        lines.append(f"| {METHOD_LABELS[name]} | " + " | ".join(f"{v:.3g}" for v in mean) + " |")
    return "\n".join(lines) + "\n"


def load_report(path) -> dict:
    """A `dds translate-eval --out` report that holds every edit's metrics (DDSError if not)."""
    import json
    from pathlib import Path

    try:
        rep = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DDSError(f"report '{path}' does not exist; give the JSON that "
                       "`dds translate-eval --out` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DDSError(f"report '{path}' is not readable JSON ({e}); give the JSON that "
                       "`dds translate-eval --out` wrote") from None
    if not isinstance(rep, dict) or NETWORK not in rep.get("per_edit", {}):
        raise DDSError(f"report '{path}' holds no per-edit metrics of a network; re-run "
                       "`dds translate-eval --out` with this version to write them")
    return rep


def compare_reports(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> dict:
    """Network of report `a` against network of report `b`, edit by edit (both must have
    scored the same edits): `dds.eval.paired.compare_methods`'s result."""
    from dds.eval.metrics import WORLD_COMPARED
    from dds.eval.paired import compare_methods

    if a["edits"] != b["edits"]:
        raise DDSError("the two reports scored different edits (other tasks, --n or held-out "
                       "scenes); evaluate both networks with the same tasks and --n")
    per = {name: {k: np.asarray(v, dtype=float) for k, v in rep["per_edit"][NETWORK].items()}
           for name, rep in zip(names, (a, b), strict=True)}
    return compare_methods(per, a["edits"]["task"], WORLD_COMPARED, *names, labels=names)


def main_compare(args) -> int:
    """`dds translate-compare A B`: print the paired comparison; --out writes it as JSON."""
    from pathlib import Path

    from dds.eval.paired import comparison_text
    from dds.eval.report import write_json

    names = tuple(args.names.split(",")) if args.names else ("A", "B")
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise DDSError(f"--names {args.names!r} is invalid; give two different names, e.g. --names full,sds")
    c = compare_reports(load_report(args.a), load_report(args.b), names)
    c["reports"] = [str(args.a), str(args.b)]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), c)
    print(comparison_text(c))
    return 0


def main_eval(args) -> int:
    """`dds translate-eval`: print the report as markdown; --out writes it as JSON, and the
    markdown beside it (.md)."""
    from pathlib import Path

    from dds.eval.report import write_atomic, write_json

    baselines = tuple(b for b in (args.baselines or "").split(",") if b)
    bad = set(baselines) - {"dds", "sdedit"}
    if bad:
        raise DDSError(f"--baselines {args.baselines!r} is invalid; use a comma list of dds, sdedit")
    rep = evaluate(args.model, n_per_task=args.n, baselines=baselines, base_model=args.base_model,
                   judge=args.judge, sdedit_strength=args.sdedit_strength,
                   dds_steps=args.dds_steps, quiet=args.quiet)
    text = report_text(rep)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, rep)
        write_atomic(out.with_suffix(".md"), text)
    print(text)
    return 0
