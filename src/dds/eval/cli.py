"""`dds eval EXPERIMENT`: the paper's Section 5 measurements, written as plots, tables, report."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from dds.errors import DDSError
from dds.eval.experiments import EXPERIMENTS, Context, run_experiment


def _summary_line(name: str, summary: dict) -> str:
    verdicts = [f"{k[:-len('reproduces')].rstrip('_') or 'claim'}: "
                f"{'reproduces' if v else 'does NOT reproduce'}"
                for k, v in summary.items() if k.endswith("reproduces") and isinstance(v, bool)]
    if "fewest_steps_to_95pct" in summary:
        verdicts.append(f"95% of the final gain at {summary['fewest_steps_to_95pct']} steps")
    return f"{name}: " + ("; ".join(verdicts) or json.dumps(summary)[:200])


# Measurements of the built-in model itself (not paper experiments), see builtin_quality.py.
MODEL_MEASURES = {
    "builtin-quality": "Built-in model: generation, autoencoder and editing vs exact ground truth",
    "builtin-defaults": "Built-in model: lr x guidance sweep on validation edits (--write saves it)",
}


def cmd_model_measure(args) -> int:
    from dds.eval import builtin_quality as bq
    from dds.models import get_model
    from dds.world import Judge

    kw = dict(per_kind=4, lrs=(0.1, 0.4), guidances=(7.5,)) if args.quick else {}
    if args.edits_per_kind:
        kw["per_kind"] = args.edits_per_kind
    if args.lrs:
        kw["lrs"] = _floats(args.lrs, "--lrs")
    if args.guidances:
        kw["guidances"] = _floats(args.guidances, "--guidances")
    target = _defaults_target(args)
    model = get_model(args.model)
    judge = Judge.load()
    out = Path(args.out or f"dds-eval/{args.experiment}")
    if args.experiment == "builtin-quality":
        preset = bq.QUICK if args.quick else bq.FULL
        if args.edits_per_kind:
            preset = dataclasses.replace(preset, edits_per_kind=args.edits_per_kind)
        bq.run_quality(model, judge, out, preset, quiet=args.quiet)
        print((out / "report.md").read_text())
        return 0
    result = bq.choose_defaults(model, judge, quiet=args.quiet, **kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    print(_sweep_lines(result))
    if target is not None:
        print(f"wrote {write_edit_defaults(target, result['best'])}")
    return 0


def write_edit_defaults(folder: Path, update: dict) -> Path:
    """Merge `update` into FOLDER/dds_edit_defaults.json and write it atomically: top-level keys
    replace the model's lr and guidance; a method's dict replaces that method's recommended
    schedule (`dds.pipeline.SCHEDULE_KEYS`) and keeps its other keys."""
    from dds.atomic import atomic_write_text
    from dds.pipeline import SCHEDULE_KEYS

    path = folder / "dds_edit_defaults.json"
    now = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in update.items():
        if isinstance(value, dict):
            kept = {k: v for k, v in now.get(key, {}).items() if k not in SCHEDULE_KEYS}
            value = {**kept, **value}
        now[key] = value
    return atomic_write_text(path, json.dumps(now, indent=2) + "\n")


def _write_schedule(target: Path, method: str, summary: dict) -> str:
    """`schedules --write`: the winner at the fewest denoiser calls becomes the model's
    recommended schedule for `method`; nothing is written when no setting matches."""
    rec = summary.get("recommended")
    if rec is None:
        return (f"no setting matched the reference recipe; {target / 'dds_edit_defaults.json'} "
                "is unchanged")
    return f"wrote {write_edit_defaults(target, {method: rec})}: {method} {rec}"


def _sweep_lines(result: dict) -> str:
    """builtin-defaults' rows, the floors beside them, and the choice, one line each."""
    from dds.eval.floors import FLOOR_LABELS
    from dds.eval.metrics import get_metric

    def figures(r):
        return "  ".join(f"{get_metric(k).short} {get_metric(k).format(r[k])}"
                         for k in ("psnr_gt", "psnr_out"))

    lines = [f"lr {r['lr']:<5} guidance {r['guidance']:<5} success {r['success']:.3f} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in r['kind_success'].items())})  "
             f"{figures(r)}" for r in result["rows"]]
    lines += [f"{FLOOR_LABELS[name]:<25} success {r['success']:.3f}  {figures(r)}"
              for name, r in result.get("floors", {}).items()]
    return "\n".join([*lines, f"best: {result['best']}"])


def _defaults_target(args) -> Path | None:
    """The folder `builtin-defaults --write` and `schedules --write` write into: the one named
    after --write, or the model folder named with --model; never the installed package's unless
    named."""
    if args.write is None:
        return None
    if args.experiment not in ("builtin-defaults", "schedules", "all"):
        raise DDSError(f"--write saves what builtin-defaults or schedules choose; "
                       f"{args.experiment} chooses nothing: leave --write out")
    folder = args.write or args.model
    if not folder:
        raise DDSError("--write needs a folder: name it (--write FOLDER) or name the model "
                       "folder with --model, since the built-in model lives inside the "
                       "installed package")
    if not Path(folder).is_dir():
        raise DDSError(f"--write folder '{folder}' is not a folder")
    return Path(folder)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or any(v <= 0 for v in vals):
        raise DDSError(f"{flag} takes a comma list of positive numbers, e.g. 0.03,0.1; got '{text}'")
    return vals


def _typed(text: str, like, what: str):
    """`text` read as a value of the preset's own type (that of `like`; the presets hold
    numbers, lists of numbers or names, and NAME:VALUE dicts)."""
    if isinstance(like, (int, float)):
        value = float(text) if isinstance(like, float) or "." in text else int(text)
        if value < 0:
            raise ValueError(f"{what} is not negative")
        return value
    if isinstance(like, dict):  # e.g. optimizers: NAME:LR,...; empty for none
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{what} is a comma list of NAME:VALUE")
        return {k.strip(): _typed(v.strip(), 0.0, what) for k, v in pairs}
    if isinstance(like, list):
        kind = next((v for v in like if isinstance(v, float)), like[0] if like else "")
        return [_typed(item.strip(), kind, what) for item in text.split(",") if item.strip()]
    return text


def preset_overrides(names: list[str], pairs: list[str]) -> dict[str, dict]:
    """`--set KEY=VALUE` for each experiment in `names`: the preset settings it overrides, each
    read as the preset's own type (numbers, comma lists, NAME:VALUE lists). A key that none of
    `names` has, or a value of the wrong type, is one clear error before anything runs."""
    out: dict[str, dict] = {n: {} for n in names}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        owners = [n for n in names if key in EXPERIMENTS[n].full]
        if not sep or not owners:
            keys = sorted({k for n in names for k in EXPERIMENTS[n].full})
            raise DDSError(f"--set '{pair}' names no setting of {', '.join(names)}: give "
                           f"KEY=VALUE with KEY one of {', '.join(keys)}")
        for n in owners:
            try:
                out[n][key] = _typed(text.strip(), EXPERIMENTS[n].full[key], key)
            except ValueError as e:
                raise DDSError(f"--set '{pair}' is invalid ({e}); e.g. --set budgets=16,25 "
                               f"or --set optimizers=adam:0.01") from None
    return out


def cmd_eval(args) -> int:
    from dds.models import get_model, knows_world

    if args.experiment in MODEL_MEASURES:
        if args.set:
            raise DDSError(f"--set changes a Section 5 experiment's preset; {args.experiment} "
                           "takes --edits-per-kind, --lrs and --guidances instead")
        return cmd_model_measure(args)

    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    overrides = preset_overrides(names, args.set or [])
    target = _defaults_target(args)
    model = get_model(args.model)
    if args.data is None and args.model is not None and not knows_world(model):
        raise DDSError("a model that was not trained on the built-in world needs your images and "
                       "captions: give --data FOLDER with metadata.jsonl rows {file_name, text, "
                       "target}")
    if args.data is not None and not Path(args.data).is_dir():
        raise DDSError(f"--data '{args.data}' is not a folder")
    out = Path(args.out or "dds-eval")
    command = "dds eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    for name in names:
        ctx = Context(model=model, out=out / name if len(names) > 1 or args.out is None else out,
                      seed=args.seed, quiet=args.quiet, quick=args.quick, data=args.data,
                      size=args.size, clip=args.clip, lpips=args.lpips_trunk, command=command)
        summary = run_experiment(name, ctx, **overrides[name])
        print(_summary_line(name, summary))
        print(f"  wrote {ctx.out / 'report.md'}")
        if target is not None and name == "schedules":
            print("  " + _write_schedule(target, ctx.edit_cfg().method, summary))
    return 0


def add_parser(sub) -> None:
    lines = "\n".join(f"  {n:<17} {e.title}" for n, e in EXPERIMENTS.items())
    lines += "\n" + "\n".join(f"  {n:<17} {t}" for n, t in MODEL_MEASURES.items())
    import argparse

    p = sub.add_parser(
        "eval", help="run the paper's Section 5 experiments; write plots, tables and a report",
        description="Runs one of the paper's Section 5 measurements (or all of them) and writes "
        "PNG plots, CSV/JSON tables and report.md into the output folder. An interrupted run "
        "resumes: finished units are kept in OUT/parts/.\n\nexperiments:\n" + lines,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "all", *MODEL_MEASURES],
                   metavar="EXPERIMENT",
                   help="one of: " + ", ".join([*EXPERIMENTS, *MODEL_MEASURES]) + ", or all")
    p.add_argument("--edits-per-kind", type=int,
                   help="builtin-quality: held-out edits per kind (full preset 200); "
                   "builtin-defaults: validation edits per kind (default 8)")
    p.add_argument("--lrs", help="builtin-defaults: comma list of step sizes to sweep")
    p.add_argument("--guidances", help="builtin-defaults: comma list of guidance scales to sweep")
    p.add_argument("--write", nargs="?", const="", metavar="FOLDER",
                   help="builtin-defaults: save the chosen lr and guidance, schedules: the "
                   "winning schedule at the fewest denoiser calls, into FOLDER/"
                   "dds_edit_defaults.json (FOLDER defaults to the --model folder)")
    p.add_argument("--quick", action="store_true",
                   help="the small preset (minutes on a CPU with the built-in model)")
    p.add_argument("--out", help="output folder (default dds-eval/EXPERIMENT; with `all`, one "
                   "sub-folder per experiment)")
    p.add_argument("--model", help="model folder (default: the built-in model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="folder of your images with metadata.jsonl rows {file_name, "
                   "text, target[, target_file]} (needed for a real model)")
    p.add_argument("--size", type=int, help="working image side for --data (default: the model's)")
    p.add_argument("--clip", help="local transformers CLIP folder for the CLIP score (real models)")
    p.add_argument("--lpips-trunk", help="local AlexNet state dict (torchvision layout) for LPIPS")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting of the experiment's preset (repeatable; the "
                   "report records it), e.g. schedules --set budgets=16,25 --set "
                   "schedules=stratified --set step_rules=budget --set optimizers=")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
