"""Quality of the built-in model, measured against the world's exact answers.

- generation: sample from world captions (DDIM, 50 steps, guidance 7.5) and ask the judge
  whether every attribute the caption mentions is in the image;
- autoencoder: reconstruction PSNR on held-out scenes;
- editing: one-attribute edits (object colour, object shape, background colour) on held-out
  scenes, DDS and SDS at the model's editing defaults, scored by success (position-aware and
  attribute-only), PSNR to the exact ground-truth re-render and its gain over no edit, and
  PSNR/SSIM to the source outside the edited region, beside the two floors (no edit,
  autoencoder round trip); DDS against SDS edit by edit, with 95% intervals
  (`dds.eval.paired`);
- defaults: the small sweep (on validation scenes, disjoint from the test scenes) from which the
  model's `dds_edit_defaults.json` is chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dds.eval.floors import FLOOR_LABELS, measure_floors
from dds.eval.metrics import WORLD_COMPARED, WORLD_METRICS, psnr
from dds.eval.paired import PAIRED, compare_methods, comparison_text
from dds.eval.report import metric_table, write_atomic
from dds.eval.runner import Runner, batches, open_runner
from dds.eval.seeds import GENERATION_STREAM, HELD_OUT_SEED, VAE_STREAM, VALIDATION_SEED
from dds.eval.world_edits import (
    Prepared,
    decode01,
    held_out_edits,
    images_of,
    prepare,
    run_zero_shot,
    score,
    summarise,
)
from dds.loop import EditConfig
from dds.methods import METHODS
from dds.pipeline import edit_config
from dds.progress import progress_bar
from dds.sampling import generate
from dds.world import caption, parse_caption, sample_scene


@dataclass(frozen=True)
class QualityPreset:
    gen_single: int = 500
    gen_double: int = 200
    gen_steps: int = 50
    vae_images: int = 500
    edits_per_kind: int = 200
    batch_size: int = 50


FULL = QualityPreset()
QUICK = QualityPreset(gen_single=40, gen_double=20, gen_steps=20, vae_images=64,
                      edits_per_kind=8, batch_size=24)


def prompt_agreement(pred: dict, wanted: dict) -> bool:
    """Does a judge reading agree with every attribute a parsed caption mentions?"""
    return all(v for v in attribute_agreement(pred, wanted).values() if v is not None)


def attribute_agreement(pred: dict, wanted: dict) -> dict[str, bool | None]:
    """Per attribute, does a judge reading agree with a parsed caption?  The object entries
    need the right number of objects and every object right in that field, left to right;
    texture is None when the caption names none."""
    def objects(fields):
        return ([[o[f] for f in fields] for o in pred["objects"]]
                == [[o[f] for f in fields] for o in wanted["objects"]])

    return {"objects": objects(("shape", "color")), "object_shape": objects(("shape",)),
            "object_color": objects(("color",)),
            "background": pred["background"] == wanted["background"],
            "texture": None if wanted["texture"] is None else pred["texture"] == wanted["texture"]}


def eval_generation(model, judge, n: int, n_objects: int, steps: int = 50,
                    guidance: float = 7.5, seed: int = HELD_OUT_SEED, batch_size: int = 50,
                    quiet: bool = False) -> dict:
    rng = np.random.default_rng([seed, GENERATION_STREAM, n_objects])
    prompts = [caption(sample_scene(rng, n_objects=n_objects)) for _ in range(n)]
    agree = []
    per_attr = {"objects": [], "object_shape": [], "object_color": [], "background": [],
                "texture": []}
    bar = progress_bar(n, f"generation ({n_objects} object{'s' if n_objects > 1 else ''})",
                       quiet=quiet, unit="img")
    images = []
    for i in range(0, n, batch_size):
        chunk = prompts[i:i + batch_size]
        z = generate(model, model.encode_prompt(chunk), guidance, steps, seed=seed + i)
        x = decode01(model, z)
        images.append(x)
        for p, text in zip(judge.predict(x), chunk, strict=True):
            w = parse_caption(text)
            agree.append(prompt_agreement(p, w))
            for k, v in attribute_agreement(p, w).items():
                if v is not None:
                    per_attr[k].append(v)
        bar.update(len(chunk))
    bar.close()
    return {"n": n, "all_attributes": float(np.mean(agree)),
            **{k: float(np.mean(v)) if v else None for k, v in per_attr.items()},
            "samples": torch.cat(images)[:16]}


def eval_vae(model, n: int, seed: int = HELD_OUT_SEED, judge=None) -> dict:
    """PSNR of the autoencoder's reconstructions of `n` held-out scenes and, with a judge, its
    accuracy per attribute on them: the most a generation or an edit can show, since every
    image the model makes passes through the same decoder."""
    rng = np.random.default_rng([seed, VAE_STREAM])
    scenes = [sample_scene(rng) for _ in range(n)]
    x = images_of(scenes)
    rec = torch.cat([decode01(model, model.encode(x[i:i + 64] * 2 - 1))
                     for i in range(0, n, 64)])
    p = psnr(rec, x).numpy()
    out = {"n": n, "psnr_mean": float(p.mean()), "psnr_min": float(p.min()),
           "psnr_p05": float(np.percentile(p, 5))}
    if judge is not None:
        acc = judge.attribute_accuracy(rec, scenes)
        out["judge_on_reconstructions"] = {k: float(v) for k, v in acc.items() if np.isfinite(v)}
    return out


def eval_editing(model, judge, cfg: EditConfig, per_kind: int, batch_size: int = 50,
                 seed: int = HELD_OUT_SEED, quiet: bool = False,
                 parts_dir: Path | None = None) -> dict:
    """Every editing method (DDS, SDS, FlowEdit) on `per_kind` held-out edits of each kind, and the two
    floors, scored against the exact truth: {method or floor: {kind: means}}, with the paired
    comparison of the methods under `PAIRED` and their success per target value under
    `BY_VALUE`.

    With `parts_dir`, each batch's per-edit metrics are kept in `parts_dir/parts/` as it
    finishes, so an interrupted run resumes at the first missing batch (edit i is seeded
    cfg.seed + i either way, so a resumed run gives the same numbers)."""
    edits = held_out_edits(per_kind, seed=seed)
    runner = open_runner(parts_dir, {
        "edit_config": json.loads(cfg.to_json()), "per_kind": per_kind, "seed": seed,
        "batch_size": batch_size, "metrics": list(WORLD_METRICS)})
    prepared = None

    def prep() -> Prepared:  # only when a unit is computed: a resumed run needs no model
        nonlocal prepared
        prepared = prepared or prepare(model, edits)
        return prepared

    def run(sl: slice, c: EditConfig) -> dict:
        p = prep()
        p = Prepared(p.z_hat[sl], p.cond_source[sl], p.cond_target[sl])
        images = run_zero_shot(
            model, edits[sl], c.with_(seed=c.seed + sl.start), batch_size=batch_size, prepared=p,
            quiet=quiet, desc=f"{c.method.upper()} edits {sl.start + 1}-{sl.stop} of {len(edits)}")
        return score(images, edits[sl], judge)

    slices = batches(len(edits), batch_size)
    out, per = {}, {}
    for method in METHODS:
        # DDS and SDS at the given settings; FlowEdit at its own (same seeds).
        c = (cfg.with_(method=method) if METHODS[method].gradient
             else edit_config(model, method=method, seed=cfg.seed))
        per[method] = runner.batches((method,), slices, lambda sl, c=c: run(sl, c),
                                     name_by_start=True)
        out[method] = summarise(per[method], edits)
    floors = measure_floors(runner, model, images_of([e.source for e in edits]),
                            lambda: prep().z_hat, lambda x, sl: score(x, edits[sl], judge),
                            slices, name_by_start=True)
    out.update({name: summarise(m, edits) for name, m in floors.items()})
    out[PAIRED] = compare_methods(per, [e.kind for e in edits], WORLD_COMPARED)
    out[BY_VALUE] = by_target_value(per, edits)
    return out


BY_VALUE = "by_value"  # the key of the success per target value beside the methods' figures
BY_VALUE_METRICS = ("success_pos", "success")


def by_target_value(per: dict[str, dict[str, np.ndarray]], edits) -> dict:
    """Success per edit kind and per value the edit asks for (a colour, a shape):
    {kind: {value: {"n": edits, method: {metric: mean}}}}.  `per`: method -> per-edit metrics.
    A mean over all values hides a value that no method reaches."""
    kinds = np.array([e.kind for e in edits])
    values = np.array([str(e.new_value) for e in edits])
    out: dict = {}
    for kind in dict.fromkeys(kinds.tolist()):
        out[kind] = {}
        for value in sorted(set(values[kinds == kind])):
            sel = (kinds == kind) & (values == value)
            out[kind][value] = {"n": int(sel.sum()), **{
                m: {k: float(np.mean(v[sel])) for k, v in metrics.items() if k in BY_VALUE_METRICS}
                for m, metrics in per.items()}}
    return out


def by_value_table(by_value: dict) -> str:
    """Markdown: per edit kind and target value, each method's success, placed (attribute
    only)."""
    methods = [m for m in next(iter(next(iter(by_value.values())).values())) if m != "n"]
    lines = ["| edit kind | changed to | n | " + " | ".join(
                 f"{m.upper()}: placed (attribute)" for m in methods) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for kind, values in by_value.items():
        for value, row in values.items():
            cells = [f"{row[m]['success_pos']:.1%} ({row[m]['success']:.1%})" for m in methods]
            lines.append(f"| {kind} | {value} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choose_defaults(model, judge, lrs=(0.03, 0.1, 0.2, 0.4), guidances=(3.0, 7.5, 15.0),
                    steps: int = 200, per_kind: int = 8, quiet: bool = False) -> dict:
    """Sweep lr x guidance on validation edits; pick the best position-aware success over all
    of them, then the best PSNR to the truth among settings within one edit of that success.  The two floors
    (no edit, autoencoder round trip) on the same edits are reported beside the rows.

    (The worst kind's success is reported but not used: when one kind fails at every setting
    it ties every row at zero and the choice would fall to PSNR alone.)"""
    edits = held_out_edits(per_kind, seed=VALIDATION_SEED)
    prepared = prepare(model, edits)
    rows = []
    for lr in lrs:
        for w in guidances:
            cfg = EditConfig(lr=lr, guidance=w, steps=steps)
            images = run_zero_shot(model, edits, cfg, batch_size=len(edits), prepared=prepared,
                                   desc=f"lr {lr} guidance {w}", quiet=quiet)
            s = summarise(score(images, edits, judge), edits)
            kinds = {k: v["success"] for k, v in s.items() if k != "all"}
            rows.append({"lr": lr, "guidance": w, **s["all"], "kind_success": kinds,
                         "min_kind_success": min(kinds.values())})
    best = pick_defaults(rows, len(edits))
    floors = measure_floors(open_runner(None, {}), model, images_of([e.source for e in edits]),
                            prepared.z_hat, lambda x, sl: score(x, edits[sl], judge),
                            [slice(0, len(edits))])
    return {"rows": rows, "best": {"lr": best["lr"], "guidance": best["guidance"]},
            "floors": {name: summarise(m, edits)["all"] for name, m in floors.items()}}


def pick_defaults(rows: list[dict], n_edits: int, key: str = "success_pos") -> dict:
    """The row with the best PSNR to the truth among those within one edit of the best success.

    Success is position-aware by default (the attribute right *and* the object where the
    truth's is): an attribute-only reading counts a recoloured blob in the wrong place."""
    top = max(r[key] for r in rows)
    near = [r for r in rows if r[key] >= top - 1.0 / n_edits - 1e-9]
    return max(near, key=lambda r: r["psnr_gt"])


def _with_samples(fn, png: Path):
    """fn() -> a dict; its 'samples' (N,3,H,W) in [0,1] are taken out and saved as a grid."""
    from dds.eval.plots import grid_image
    from dds.images import save_png

    def compute():
        value = fn()
        samples = value.pop("samples", None)
        if samples is not None:
            tiles = [s.permute(1, 2, 0).numpy() for s in samples]
            rows = [tiles[i:i + 8] for i in range(0, len(tiles), 8)]
            save_png(grid_image(rows, [""] * 8, [""] * len(rows), scale=2), png)
        return value

    return compute


def run_quality(model, judge, out_dir: Path, preset: QualityPreset = FULL,
                quiet: bool = False) -> dict:
    """All of the built-in model's figures into `out_dir` (report.json, report.md, samples).

    Each measurement is a unit of one resumable runner (OUT/parts/), the editing one per batch
    (OUT/parts/editing/parts/); the report is written from the units' results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = edit_config(model)
    runner = Runner(out_dir, {"preset": preset.__dict__, "edit_config": json.loads(cfg.to_json()),
                              "model": getattr(model, "label", None),
                              "metrics": list(WORLD_METRICS)})
    report = {
        "preset": preset.__dict__,
        "edit_config": json.loads(cfg.to_json()),
        "vae": runner.unit("vae", lambda: eval_vae(model, preset.vae_images, judge=judge)),
        "generation_single": runner.unit("generation_single", _with_samples(
            lambda: eval_generation(model, judge, preset.gen_single, 1, preset.gen_steps,
                                    quiet=quiet), out_dir / "generation_single.png")),
        "generation_double": runner.unit("generation_double", _with_samples(
            lambda: eval_generation(model, judge, preset.gen_double, 2, preset.gen_steps,
                                    quiet=quiet), out_dir / "generation_double.png")),
        "editing": runner.unit("editing", lambda: eval_editing(
            model, judge, cfg, preset.edits_per_kind, preset.batch_size, quiet=quiet,
            parts_dir=runner.dir / "editing")),
        "model_mb": model.folder_mb() if hasattr(model, "folder_mb") else None,
    }
    report["targets"] = release_targets(report)
    write_quality_report(out_dir, report)
    return report


# The built-in model's release targets (docs/builtin-model-4.md): (label, where in the report,
# minimum, unit).  DDS's success here is the position-aware one.
TARGETS = (
    ("generation, one object, every attribute right", ("generation_single", "all_attributes"),
     0.75, "%"),
    ("autoencoder: the judge reads the first object's shape on reconstructions",
     ("vae", "judge_on_reconstructions", "obj0_shape"), 0.97, "%"),
    ("autoencoder: reconstruction PSNR", ("vae", "psnr_mean"), 32.0, "dB"),
    ("DDS success (placed), object colour", ("editing", "dds", "object_color", "success_pos"),
     0.90, "%"),
    ("DDS success (placed), object shape", ("editing", "dds", "object_shape", "success_pos"),
     0.70, "%"),
    ("DDS success (placed), background", ("editing", "dds", "background_color", "success_pos"),
     0.95, "%"),
    ("DDS PSNR gain over no edit, object colour", ("editing", "dds", "object_color", "psnr_gain"),
     2.0, "dB"),
    ("DDS PSNR gain over no edit, object shape", ("editing", "dds", "object_shape", "psnr_gain"),
     2.0, "dB"),
)
MAX_MODEL_MB = 30.0


def release_targets(r: dict) -> list[dict]:
    """Each release target with its measured value and whether it is met (None: not measured);
    DDS against SDS per kind: ahead on placed success, or at equal success on SSIM outside."""
    rows = []
    for label, path, minimum, unit in TARGETS:
        v = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        rows.append({"target": label, "value": v, "minimum": minimum, "unit": unit,
                     "met": None if v is None else bool(v >= minimum)})
    for kind, by in r.get("editing", {}).get(PAIRED, {}).get("by", {}).items():
        if kind == "all":
            continue
        success, kept = by["success_pos"]["verdict"], by["ssim_out"]["verdict"]
        met = success == "DDS better" or (success == "no difference" and kept == "DDS better")
        rows.append({"target": f"DDS against SDS (paired), {kind}", "unit": "verdict",
                     "value": f"success: {success}; SSIM outside: {kept}", "met": met})
    size = r.get("model_mb")
    rows.append({"target": "model folder size", "value": size, "maximum": MAX_MODEL_MB,
                 "unit": "MB", "met": None if size is None else bool(size <= MAX_MODEL_MB)})
    return rows


def targets_markdown(rows: list[dict]) -> str:
    def shown(x, unit):
        if x is None or isinstance(x, str):
            return "not measured" if x is None else x
        return f"{x:.1%}" if unit == "%" else f"{x:.2f} {unit}"

    lines = ["| release target | measured | target | met |", "| --- | --- | --- | --- |"]
    for t in rows:
        bound = (f">= {shown(t['minimum'], t['unit'])}" if "minimum" in t
                 else f"<= {shown(t['maximum'], t['unit'])}" if "maximum" in t
                 else "DDS ahead on success, or on SSIM outside at equal success")
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {shown(t['value'], t['unit'])} | {bound} | {met} |")
    return "\n".join(lines)


def write_quality_report(out_dir: Path, report: dict) -> None:
    """report.json and report.md from the measurements."""
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    write_atomic(out_dir / "report.md", quality_markdown(report))


GENERATION_PARTS = (("objects", "object shape and colour right"),
                    ("object_shape", "object shape right"), ("object_color", "object colour right"),
                    ("background", "background colour right"), ("texture", "texture right (when named)"))


VAE_PARTS = (("obj0_shape", "first object's shape"), ("obj0_color", "first object's colour"),
             ("obj1_shape", "second object's shape"), ("texture", "texture"))


def quality_markdown(r: dict) -> str:
    g1, g2, v = r["generation_single"], r["generation_double"], r["vae"]
    lines = [
        "# Built-in model quality",
        "",
        f"Editing settings: `{json.dumps(r['edit_config'])}`",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| generation, 1 object, all prompt attributes (n={g1['n']}) | {g1['all_attributes']:.1%} | see below |",
        *[f"| ... {label} | {g1[key]:.1%} | |" for key, label in GENERATION_PARTS if g1.get(key) is not None],
        f"| generation, 2 objects, all prompt attributes (n={g2['n']}) | {g2['all_attributes']:.1%} | (reported) |",
        f"| VAE reconstruction PSNR, mean (min) (n={v['n']}) | {v['psnr_mean']:.2f} dB ({v['psnr_min']:.2f}) | see below |",
        *[f"| ... judge reads the {label} of the reconstructions | {v['judge_on_reconstructions'][key]:.1%} | |"
          for key, label in VAE_PARTS if key in v.get("judge_on_reconstructions", {})],
        "",
        editing_table(r["editing"]),
        "",
        "## Release targets",
        "",
        targets_markdown(r.get("targets") or release_targets(r)),
    ]
    return "\n".join(lines)


def editing_table(editing: dict) -> str:
    """Markdown: per edit kind, each method and then the two floors, by the world metrics; then,
    when `editing` holds them, the paired comparison of the methods and the success per target
    value (`by_target_value`)."""
    floors = [f for f in FLOOR_LABELS if f in editing]
    methods = [m for m in editing if m not in FLOOR_LABELS and m not in (PAIRED, BY_VALUE)]
    rows = []
    for kind in editing[methods[0]]:
        rows += [((f"{kind} (n={editing[m][kind]['n']})", m.upper()), editing[m][kind])
                 for m in methods]
        rows += [((f"{kind} (n={editing[f][kind]['n']})", FLOOR_LABELS[f]), editing[f][kind])
                 for f in floors]
    table = metric_table(rows, ["edit kind", "method"], WORLD_METRICS,
                         unranked=FLOOR_LABELS.values(), group=0)
    if PAIRED in editing:
        table += "\n" + comparison_text(editing[PAIRED])
    if editing.get(BY_VALUE):
        table += ("\n\nSuccess by the value each edit asks for, placed (attribute only):\n\n"
                  + by_value_table(editing[BY_VALUE]) + "\n")
    return table
