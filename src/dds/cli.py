"""The `dds` command: one entry point with subcommands.

Every user error is one line on stderr and exit code 2; no traceback, no partial output.
"""

from __future__ import annotations

import csv
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from dds.commands import DELEGATED, REGISTRY
from dds.console import Parser, configure_process
from dds.errors import DDSError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
LIST_SUFFIXES = {".csv", ".json", ".jsonl"}


# ---- edit ---------------------------------------------------------------------------------
@dataclass
class Job:
    image: Path
    source: str | None
    target: str
    out: Path


def _read_job_list(path: Path) -> list[dict]:
    """Rows of {image, source, target[, out]} from a CSV, JSON list or JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DDSError(f"job list '{path}' cannot be read ({e})") from None
    try:
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as e:
        raise DDSError(f"job list '{path}' is not valid {path.suffix[1:].upper()} ({e})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DDSError(f"job list '{path}' must hold a non-empty list of {{image, source, target}}")
    bad = [f"job {i} lacks {' and '.join(repr(k) for k in ('image', 'target') if not r.get(k))}"
           for i, r in enumerate(rows, 1) if not r.get("image") or not r.get("target")]
    raise_all(bad, len(rows), f"in '{path}'")
    return rows


def raise_all(problems: list[str], total: int, where: str = "") -> None:
    """One DDSError listing every bad job (a batch runs all or nothing), one line each."""
    if problems:
        head = f"{len(problems)} of {total} jobs {where} are invalid".replace("  ", " ")
        raise DDSError(head + "; nothing was edited:\n  " + "\n  ".join(problems))


def check_jobs(jobs: list[Job], method: str, check_image) -> list:
    """Every job's prompts and image checked; each problem names its job.  Returns the images."""
    from dds.pipeline import check_prompts

    problems, images = [], []
    for i, j in enumerate(jobs, 1):
        name = f"job {i} ({j.image.name})" if len(jobs) > 1 else f"'{j.image.name}'"
        try:
            check_prompts(j.source, j.target, method)
            images.append(check_image(j.image))
        except DDSError as e:
            problems.append(f"{name}: {cli_words(e)}")
    if len(jobs) == 1 and problems:
        raise DDSError(problems[0].split(": ", 1)[1])
    raise_all(problems, len(jobs))
    return images


def cli_words(e: DDSError) -> str:
    """A library sentence in the command line's words: a setting is named by its flag."""
    from dds.errors import SettingError

    if isinstance(e, SettingError):
        return str(e.relabel(f"--{e.field.replace('_', '-')}"))
    return str(e)


def collect_jobs(args) -> list[Job]:
    src = Path(args.input)
    method = args.method or "dds"
    suffix = f"-{method}.png"
    if src.is_file() and src.suffix.lower() in LIST_SUFFIXES:
        out_dir = Path(args.out or "dds-out")
        jobs = []
        for r in _read_job_list(src):
            img = Path(r["image"])
            img = img if img.is_absolute() else src.parent / img
            out = Path(r["out"]) if r.get("out") else out_dir / (img.stem + suffix)
            jobs.append(Job(img, r.get("source") or args.source, r["target"], out))
    elif src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DDSError(f"folder '{src}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        out_dir = Path(args.out or f"{src.name}-{method}")
        jobs = [Job(p, args.source, args.target, out_dir / (p.stem + suffix)) for p in files]
    else:
        out = Path(args.out) if args.out else Path(src.stem + suffix)
        if out.suffix.lower() != ".png":
            raise DDSError(f"output '{out}' must end in .png")
        jobs = [Job(src, args.source, args.target, out)]
    # Two jobs writing one file, or a job writing over an input, is refused up front.
    seen: dict[Path, int] = {}
    inputs = {j.image.resolve() for j in jobs}
    for j in jobs:
        key = j.out.resolve()
        if key in seen:
            raise DDSError(f"two edits would write '{j.out}'; give each job its own 'out'")
        seen[key] = 1
        if key in inputs and not args.overwrite:
            raise DDSError(f"output '{j.out}' is an input image; choose another --out or add --overwrite")
    return jobs


def _check_edit_args(args) -> None:
    """What the command line alone can get wrong, refused before any model loads."""
    from dds.loop import EditConfig

    try:
        EditConfig().with_(**edit_settings(args))
    except DDSError as e:
        raise DDSError(cli_words(e)) from None
    if args.save_every is not None and args.save_every <= 0:
        raise DDSError(f"--save-every {args.save_every} is invalid: it must be a whole number > 0")
    if args.size is not None and args.size < 8:
        raise DDSError(f"--size {args.size} is invalid: the long side must be at least 8 pixels")


def edit_settings(args) -> dict:
    """The EditConfig fields the command line sets (None: the model's or the method's)."""
    return dict(method=args.method, steps=args.steps, guidance=args.guidance, lr=args.lr,
                seed=args.seed, source_guidance=args.source_guidance, n_max=args.n_max,
                n_min=args.n_min, n_avg=args.n_avg, true_cfg=args.true_cfg or None)


def _step_hook(pipe, args, job: Job, bar):
    """Progress bar and, with --save-every N, a preview PNG every N steps."""
    from dds.images import save_png

    def on_step(info) -> None:
        bar.set_postfix(grad=f"{float(info.grad_norm.mean()):.3f}", refresh=False)
        bar.update(1)
        if args.save_every and info.step % args.save_every == 0 and info.step < info.total:
            snap = job.out.with_name(f"{job.out.stem}-step{info.step:04d}.png")
            save_png(pipe.decode(info.z), snap)

    return on_step


def cmd_edit(args) -> int:
    """Every job is checked (inputs, prompts, numbers) before the first edit runs; the edits
    themselves are `EditPipeline.run`."""
    from dds.pipeline import EditRequest, as_image, pipeline_for

    _check_edit_args(args)
    jobs = collect_jobs(args)
    # Cheap checks first, every job: a bad prompt or image costs no model load.
    images = check_jobs(jobs, args.method or "dds", as_image)
    todo = [(j, im) for j, im in zip(jobs, images, strict=True)
            if not (args.resume and j.out.exists())]
    del images
    if len(todo) < len(jobs):
        print(f"dds: resuming: {len(jobs) - len(todo)} of {len(jobs)} edits already written",
              file=sys.stderr)
    if not todo:
        return 0  # nothing left to do: no model is needed
    pipe = pipeline_for(args.model, dtype=args.precision, device=args.device)
    settings = edit_settings(args)
    prepared = []
    for job, im in todo:
        p = pipe.prepare(EditRequest(im, job.source, job.target, settings, size=args.size,
                                     crop=args.crop))
        for note in p.notes:
            print(f"dds: note: {job.image.name}: {note}", file=sys.stderr)
        prepared.append((job, p))
    return _run_jobs(pipe, args, prepared, total=len(jobs))


def _run_jobs(pipe, args, prepared: list, total: int) -> int:
    from dds.methods import get_method
    from dds.progress import progress_bar

    todo = prepared
    done = total - len(todo)
    try:
        for k, (job, p) in enumerate(todo, 1):
            desc = f"{job.image.name} [{k}/{len(todo)}]" if len(todo) > 1 else job.image.name
            bar = progress_bar(get_method(p.config.method).num_steps(p.config), desc,
                               quiet=args.quiet)
            result = pipe.run(p, on_step=_step_hook(pipe, args, job, bar))
            bar.close()
            result.save(job.out)
            done += 1
            if not args.quiet:
                print(f"wrote {job.out}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"dds: interrupted: {done} of {total} edits written; rerun with --resume to "
              "finish the rest", file=sys.stderr)
        return 130
    return 0


METHOD_NAMES = ("dds", "sds", "flowedit")  # dds.methods.METHODS (kept here: no torch for --help)


def add_edit_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="edit images with DDS (or SDS, FlowEdit) towards a target prompt",
        description=(
            "Zero-shot text-driven editing (Delta Denoising Score, Section 3 of the paper). "
            "INPUT is an image, a folder of images (same prompts for all), or a CSV/JSON/JSONL "
            "list of jobs with columns image, source, target (and optionally out). Defaults "
            "are the reference recipe (SGD lr 0.1, loss x2000 per 64x64 latent, 200 steps, "
            "guidance 7.5), or the settings a model family or folder recommends "
            "(dds_edit_defaults.json); FlowEdit's are its published ones. The model's family "
            "(Stable Diffusion 1/2, SDXL, SD3/SD3.5, FLUX.1) is read from its model_index.json."
        ),
        epilog="example: dds edit cat.png --source 'a photo of a cat' --target 'a photo of a "
        "lion' --model ./stable-diffusion-v1-5 --out lion.png",
    )
    p.add_argument("input", metavar="INPUT", help="image file, folder, or .csv/.json/.jsonl job list")
    p.add_argument("--source", help="caption of the input image (required for DDS)")
    p.add_argument("--target", help="caption of the edited image")
    p.add_argument("--model", help="diffusers model folder or cached model id (default: built-in)")
    p.add_argument("--method", choices=METHOD_NAMES,
                   help="dds, sds (score distillation) or flowedit (default dds)")
    p.add_argument("--steps", type=int,
                   help="optimisation steps (default 200); FlowEdit: its schedule's T")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5); "
                   "FLUX.1-dev: its guidance input")
    p.add_argument("--source-guidance", type=float,
                   help="guidance of the source branch (DDS, FlowEdit; default: --guidance, "
                   "FlowEdit: its published value)")
    p.add_argument("--n-max", type=int, help="FlowEdit: run the last N of the T steps")
    p.add_argument("--n-min", type=int, help="FlowEdit: of those, sample the target alone for "
                   "the last N (default 0)")
    p.add_argument("--n-avg", type=int, help="FlowEdit: noise draws averaged per step (default 1)")
    p.add_argument("--true-cfg", action="store_true", help="guidance-distilled models (FLUX.1-dev):"
                   " classifier-free guidance with an unconditional branch (2x the model calls)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.1)")
    p.add_argument("--seed", type=int, help="random seed for t and noise (default 0)")
    p.add_argument("--size", type=int, help="working long side in pixels (default: the model's)")
    p.add_argument("--crop", action="store_true", help="centre-crop to a square first")
    p.add_argument("--out", help="output PNG (single image) or folder (batch)")
    p.add_argument("--save-every", type=int, metavar="N", help="also save a preview every N steps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="UNet/text-encoder precision (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="allow writing over an input image")
    p.add_argument("--resume", action="store_true", help="skip edits whose output already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_edit)


def build_parser() -> Parser:
    parser = Parser(prog="dds", description="Text-driven image editing with Delta Denoising Score.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_edit_parser(sub)
    for add in REGISTRY:  # subcommands that live next to their features
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `dds` entry point: process settings once, then the subcommand."""
    configure_process()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        try:
            return int(module.main(argv[1:]) or 0)
        except DDSError as e:
            print(f"dds {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DDSError as e:
        print(f"dds {args.command}: error: {cli_words(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dds {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
