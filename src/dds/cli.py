"""The `dds` command: one entry point with subcommands.

Every user error is one line on stderr and exit code 2; no traceback, no partial output.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dds.commands import DELEGATED, REGISTRY
from dds.console import Parser, configure_process
from dds.errors import DDSError


# ---- edit ----------------------------------------------------------------------------------
@dataclass
class Job:
    image: Path
    source: str | None
    target: str
    out: Path


def check_jobs(jobs: list[Job], method: str, check_image) -> list:
    """Every job's prompts and image checked; each problem names its job.  Returns the images."""
    from dds.jobs.inputs import raise_all
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
    """The one job of a single-image edit (a folder, a job list or world:N is a dataset:
    `edit_dataset`)."""
    src = Path(args.input)
    out = Path(args.out) if args.out else Path(src.stem + f"-{args.method or 'dds'}.png")
    if out.suffix.lower() != ".png":
        raise DDSError(f"output '{out}' must end in .png")
    if out.resolve() == src.resolve() and not args.overwrite:
        raise DDSError(f"output '{out}' is an input image; choose another --out or add --overwrite")
    return [Job(src, args.source, args.target, out)]


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
    for flag in ("batch_size", "processes", "threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise DDSError(f"--{flag.replace('_', '-')} {v} is invalid: it must be a whole "
                           "number >= 1")


def edit_settings(args) -> dict:
    """The EditConfig fields the command line sets (None: the model's or the method's)."""
    return dict(method=args.method, steps=args.steps, guidance=args.guidance, lr=args.lr,
                seed=args.seed, source_guidance=args.source_guidance, n_max=args.n_max,
                n_min=args.n_min, n_avg=args.n_avg, true_cfg=args.true_cfg or None,
                schedule=args.schedule, step_rule=args.step_rule, optimizer=args.optimizer,
                average_tail=args.average_tail)


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
    """Every job is checked (inputs, prompts, numbers) before the first edit runs.  One image is
    `EditPipeline.run`; a folder, a job list, an ImageFolder or world:N is a dataset
    (`edit_dataset`)."""
    from dds.jobs.inputs import is_dataset_input

    if args.merge_manifests is not None:
        return merge_manifests(args.merge_manifests)
    if args.input is None:
        raise DDSError("INPUT is missing: give an image, a folder, a .csv/.json/.jsonl job list, "
                       "an ImageFolder (metadata.jsonl) or world:N")
    _check_edit_args(args)
    if is_dataset_input(args.input) or args.export_jobs:
        return edit_dataset(args)
    if args.processes is not None and args.processes > 1:
        raise DDSError("--processes splits a list of jobs over processes; one image is one edit")
    return edit_one(args)


def edit_one(args) -> int:
    """A single image, as always: the step-by-step loop with its progress bar and previews."""
    from dds.pipeline import EditRequest, as_image, pipeline_for

    jobs = collect_jobs(args)
    # Cheap checks first: a bad prompt or image costs no model load.
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


# ---- edit: datasets (dds.jobs) -----------------------------------------------------------------
def _say(text: str) -> None:
    print(f"dds: {text}", file=sys.stderr)


@contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count for the length of a run (--threads), then the old one."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _job_options(args):
    from dds.jobs.inputs import Columns, JobOptions

    cols = Columns(image=args.image_column, source=args.source_column,
                   target=args.target_column or "target", out=args.out_column or "out",
                   seed=args.seed_column or "seed", truth=args.truth_column or "truth")
    return JobOptions(source=args.source, target=args.target, method=args.method or "dds",
                      out=args.out, seed=args.seed or 0, overwrite=args.overwrite, columns=cols)


def _run_settings(args):
    from dds.jobs.run import RunSettings

    settings = {k: v for k, v in edit_settings(args).items() if k != "seed"}
    return RunSettings(settings=settings, size=args.size, crop=args.crop, model=args.model,
                       precision=args.precision, seed=args.seed or 0,
                       save_every=args.save_every)


def edit_dataset(args) -> int:
    """Many jobs: checked up front, then edited in batches by one or more processes, each
    finished or failed job recorded in the manifest beside the outputs (docs/scale.md).  Exit
    code 0: every job succeeded; 1: some failed (their sentences are in the manifest)."""
    from dds.jobs import launch as L
    from dds.jobs.inputs import export_world, read_jobs
    from dds.jobs.manifest import read_records
    from dds.jobs.run import check_same_request, pending
    from dds.pipeline import check_prompts

    opts = _job_options(args)
    if args.export_jobs:
        if not args.input.startswith("world:"):
            raise DDSError("--export-jobs writes the jobs of world:N as an ImageFolder; give "
                           "INPUT world:N (other inputs are already files)")
        folder = export_world(args.input, args.export_jobs, opts)
        _say(f"wrote the jobs of {args.input} to '{folder}' (images/, truth/, metadata.jsonl); "
             f"edit them with `dds edit {folder}`")
        return 0
    if args.save_every is not None and (args.batch_size or 1) > 1:
        raise DDSError("--save-every shows each step of the step-by-step loop, which edits one "
                       "image at a time; drop --batch-size or --save-every")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and args.processes is not None and args.processes > 1:
        raise DDSError("--processes starts local processes itself; under accelerate launch "
                       "(or torchrun) leave it out")
    worker = L.is_worker()
    jl = read_jobs(args.input, opts, check_prompts)
    run = _run_settings(args)
    records = read_records(jl.out_dir)
    if args.resume:
        check_same_request(jl, records, run.request())
    left = pending(jl, records, args.resume, args.skip_failed)
    main_ui = not worker and not (launched and int(os.environ.get("RANK", "0")) != 0)
    already = left.done + len(left.recovered)
    if main_ui and already:
        _say(f"resuming: {already} of {len(jl.jobs)} edits already written")
    if main_ui and left.failed_left:
        _say(f"leaving {left.failed_left} failed edits alone (--skip-failed)")
    if not left.todo:  # nothing left to edit: no model is needed
        if not main_ui:
            return 0
        if left.recovered:
            from dds.jobs.manifest import ShardWriter, shard_path
            from dds.jobs.run import recover

            recover(left.recovered, jl, ShardWriter(shard_path(jl.out_dir, 0)))
        return _finish(jl, None, quiet=True)
    if not launched and not worker and (args.processes or 1) > 1:
        return _launch_local(args, jl, left, run)
    return _run_rank(args, jl, left, run, show=main_ui, worker=worker)


def _launch_local(args, jl, left, run) -> int:
    """--processes N: the same command in N processes (accelerate's launcher); this process
    shows the one bar and reads the manifests for the summary and the exit code."""
    import torch

    from dds.jobs import launch as L
    from dds.jobs.manifest import ShardWriter, shard_path
    from dds.jobs.run import Progress, recover

    n = args.processes
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if not cpu and (args.device is None or args.device == "cuda") and n > torch.cuda.device_count():
        raise DDSError(f"--processes {n} needs {n} GPUs and {torch.cuda.device_count()} are "
                       "visible; one process per GPU (or --device cpu)")
    if args.model is not None:  # a missing model is one sentence here, not one per worker
        from dds.models.stable_diffusion import resolve_model_dir

        resolve_model_dir(args.model)
    threads = args.threads or max(1, L.cpu_count() // n)
    if left.recovered:
        recover(left.recovered, jl, ShardWriter(shard_path(jl.out_dir, 0)))
    progress = Progress(jl.out_dir, len(left.todo), quiet=args.quiet).start()
    since = time.time()
    try:
        L.launch(n, L.strip_option(args.argv[1:], "--processes"), threads, cpu)
    except Exception as e:  # a worker stopped early; what it recorded stays
        progress.stop()
        if type(e).__name__ == "SignalException":  # torch.distributed.run got Ctrl-C or a kill
            return _interrupted(progress)
        codes = {getattr(f, "exitcode", None) for f in getattr(e, "failures", {}).values()}
        if 2 in codes:  # a problem the workers found before editing (their sentence is above)
            _say("the worker processes stopped on the error above; nothing more was edited")
            return 2
        _say(f"a worker process failed ({type(e).__name__}; its message is above); "
             f"{progress.ok} edits were written in this run; rerun with --resume to finish "
             "the rest")
        return 1
    except KeyboardInterrupt:
        progress.stop()
        return _interrupted(progress)
    progress.stop()
    return _finish(jl, since)


def _interrupted(progress) -> int:
    _say(f"interrupted: {progress.ok} edits written in this run; rerun with --resume to finish "
         "the rest")
    return 130


def _run_rank(args, jl, left, run, show: bool, worker: bool) -> int:
    """This process's share (all of it when alone): plan, edit, record; the main process shows
    the bar over every process and prints the summary."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    from dds.jobs.manifest import ShardWriter, shard_path
    from dds.jobs.plan import default_batch_size, make_batches, shard, working_size
    from dds.jobs.run import Progress, ShardRunner, recover
    from dds.pipeline import pipeline_for, size_multiple

    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(days=7))
    rank, n = state.process_index, state.num_processes
    device = args.device or (str(state.device) if state.device.type == "cuda" else None)
    with _threads(args.threads):
        pipe = pipeline_for(args.model, dtype=args.precision, device=device)
        pipe.config(**run.settings)  # settings the model's defaults make invalid: refused once
        long_side = pipe.check_size(args.size)
        multiple, scale = size_multiple(pipe.model), int(pipe.model.vae_scale_factor)
        sizes = [working_size(j.size, long_side, multiple, args.crop) for j in jl.jobs]
        b = 1 if args.save_every else args.batch_size or default_batch_size(
            pipe.model.device.type, (long_side // scale) ** 2)
        mine = shard(make_batches(jl.jobs, sizes, b), rank, n)
        writer = ShardWriter(shard_path(jl.out_dir, rank))
        if rank == 0 and left.recovered and not worker:
            recover(left.recovered, jl, writer)
        progress = Progress(jl.out_dir, len(left.todo), quiet=args.quiet or not show)
        if show:
            progress.start()
        runner = ShardRunner(pipe, jl, run, writer, rank=rank, processes=n,
                             warn=lambda m: _say(f"warning: {m}"))
        since = time.time()
        try:
            runner.run(mine, todo={j.key for j in left.todo})
        except KeyboardInterrupt:
            progress.stop()
            return _interrupted(progress) if show else 130
        state.wait_for_everyone()
        progress.stop()
    if worker:
        return 0
    return _finish(jl, since, quiet=not show)


def _finish(jl, since: float | None, quiet: bool = False) -> int:
    """The summary (counts, rate, mean metrics) and the exit code: 0 when every job has
    succeeded, else 1.  since: the run's start (Unix time)."""
    from dds.jobs.manifest import OK, read_records
    from dds.jobs.run import summary

    records = read_records(jl.out_dir)
    if not quiet:
        for line in summary(records, jl, since):
            print(line, file=sys.stderr)
    ok = all(records.get(j.key, {}).get("status") == OK for j in jl.jobs)
    return 0 if ok else 1


def merge_manifests(folder: str) -> int:
    """--merge-manifests OUT: every shard of OUT into OUT/manifest.jsonl, latest record per job."""
    from dds.jobs.manifest import manifest_files, merge, summarise

    out = Path(folder)
    if not manifest_files(out):
        raise DDSError(f"'{out}' holds no manifest (manifest.jsonl or manifest-<rank>.jsonl); "
                       "give the output folder of a dds edit run")
    path, recs = merge(out)
    s = summarise(recs.values())
    _say(f"merged {len(recs)} job records into '{path}': {s['ok']} ok, {s['failed']} failed")
    return 0


METHOD_NAMES = ("dds", "sds", "flowedit")  # dds.methods.METHODS (kept here: no torch for --help)


def add_method_options(p) -> None:
    """The methods' own options: FlowEdit's, guidance-distilled models', DDS/SDS schedules."""
    p.add_argument("--source-guidance", type=float,
                   help="guidance of the source branch (DDS, FlowEdit; default: --guidance, "
                   "FlowEdit: its published value)")
    p.add_argument("--n-max", type=int, help="FlowEdit: run the last N of the T steps")
    p.add_argument("--n-min", type=int, help="FlowEdit: of those, sample the target alone for "
                   "the last N (default 0)")
    p.add_argument("--n-avg", type=int, help="noise draws averaged per step (default 1)")
    p.add_argument("--true-cfg", action="store_true", help="guidance-distilled models (FLUX.1-dev):"
                   " classifier-free guidance with an unconditional branch (2x the model calls)")
    p.add_argument("--schedule", choices=["reference", "descending", "stratified"],
                   help="DDS/SDS noise levels over the steps: reference (the paper's recipe: "
                   "uniform t every step, 200 steps unless --steps), descending, or stratified; "
                   "default: the model folder's recommended schedule, else reference; naming "
                   "one sets the recommendation aside (docs/evidence.md, 'Fewer steps')")
    p.add_argument("--step-rule", choices=["constant", "budget", "decay"],
                   help="DDS/SDS step size: constant lr (default), budget (lr x 200 / steps), or "
                   "decay (budget's distance in steps falling linearly to near zero)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"],
                   help="DDS/SDS optimiser of the latent: sgd (the reference, default), momentum "
                   "(0.9) or adam (its --lr is a per-element step, e.g. 0.01)")
    p.add_argument("--average-tail", type=float, metavar="F",
                   help="DDS/SDS result: the mean of the latents after the last fraction F of the "
                   "steps (suffix averaging; 0, the default, keeps the last latent)")


def add_edit_parser(sub) -> None:
    p = sub.add_parser(
        "edit",
        help="edit images with DDS (or SDS, FlowEdit) towards a target prompt",
        description=(
            "Zero-shot text-driven editing (Delta Denoising Score, Section 3 of the paper). "
            "INPUT is an image, a folder of images (same prompts for all), a CSV/JSON/JSONL "
            "list of jobs with columns image, source, target (and optionally out, seed, truth), "
            "a Hugging Face ImageFolder (metadata.jsonl: file_name, text), or world:N[:SEED] "
            "(edits of the procedural world, whose exact truth gives metrics). Many jobs are "
            "edited in batches, over processes with --processes N or `accelerate launch -m dds "
            "edit`, each recorded in manifest-<rank>.jsonl beside the outputs (docs/scale.md). "
            "Defaults "
            "are the reference recipe (SGD lr 0.1, loss x2000 per 64x64 latent, 200 steps, "
            "guidance 7.5), or the settings a model family or folder recommends "
            "(dds_edit_defaults.json); FlowEdit's are its published ones. The model's family "
            "(Stable Diffusion 1/2, SDXL, SD3/SD3.5, FLUX.1) is read from its model_index.json."
        ),
        epilog="example: dds edit cat.png --source 'a photo of a cat' --target 'a photo of a "
        "lion' --model ./stable-diffusion-v1-5 --out lion.png",
    )
    p.add_argument("input", metavar="INPUT", nargs="?",
                   help="image file, folder, .csv/.json/.jsonl job list, ImageFolder or world:N")
    p.add_argument("--source", help="caption of the input image (required for DDS)")
    p.add_argument("--target", help="caption of the edited image")
    p.add_argument("--model", help="diffusers model folder or cached model id (default: built-in)")
    p.add_argument("--method", choices=METHOD_NAMES,
                   help="dds, sds (score distillation) or flowedit (default dds)")
    p.add_argument("--steps", type=int,
                   help="optimisation steps (default: the model's; DDS on the built-in model 25, "
                   "on SD 1.x/2.x/SDXL 50, the reference recipe 200); FlowEdit: its schedule's T")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5); "
                   "FLUX.1-dev: its guidance input")
    add_method_options(p)
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.1)")
    p.add_argument("--seed", type=int, help="random seed for t and noise (default 0); for many "
                   "jobs the base of each job's own seed (docs/scale.md)")
    p.add_argument("--size", type=int, help="working long side in pixels (default: the model's)")
    p.add_argument("--crop", action="store_true", help="centre-crop to a square first")
    p.add_argument("--out", help="output PNG (single image) or folder (batch)")
    p.add_argument("--save-every", type=int, metavar="N", help="also save a preview every N steps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="UNet/text-encoder precision (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="allow writing over an input image")
    p.add_argument("--resume", action="store_true", help="skip edits already written (for many "
                   "jobs: recorded as done in the manifest, whatever the number of processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("many jobs (a folder, a job list, an ImageFolder, world:N)")
    g.add_argument("--batch-size", type=int, metavar="B", help="edits of one working size per "
                   "denoiser call (default: 8 on a GPU at SD1.5's 64x64 latents, fewer for "
                   "larger ones; on a CPU 8 for small models like the built-in one, else 1)")
    g.add_argument("--processes", type=int, metavar="N", help="split the jobs over N local "
                   "processes (accelerate's launcher; one per GPU); the outputs do not depend on N")
    g.add_argument("--threads", type=int, metavar="T", help="CPU threads per process (default: "
                   "torch's, or the CPU count divided by --processes)")
    g.add_argument("--skip-failed", action="store_true",
                   help="with --resume, leave jobs that failed before (default: retry them)")
    g.add_argument("--merge-manifests", metavar="OUT", help="merge OUT's manifest-<rank>.jsonl "
                   "shards into OUT/manifest.jsonl (latest record per job) and stop")
    g.add_argument("--export-jobs", metavar="FOLDER", help="write world:N's jobs as an ImageFolder"
                   " (images, exact truth, metadata.jsonl) and stop")
    for name, default in (("image", "image; ImageFolder: file_name"),
                          ("source", "source; ImageFolder: text"), ("target", "target"),
                          ("out", "out"), ("seed", "seed"), ("truth", "truth")):
        g.add_argument(f"--{name}-column", metavar="NAME",
                       help=f"column of a job list or ImageFolder holding the {name} "
                       f"(default: {default})")
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
    args.argv = argv
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
