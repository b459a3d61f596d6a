"""Throughput of `dds edit` on many jobs: edits/s by batch size and process count, against the
sequential loop, in one run on one machine (docs/scale.md has the figures).

CPU rows (always): --edits jobs of the procedural world (`world:N`, the built-in model's native
64x64, or --model and --size), --steps steps each:

  sequential loop     `EditPipeline.run` one job after another, in this process: what
                      `dds edit FOLDER` did before batching (the step-by-step loop)
  1 process x B=1     `dds edit world:N --batch-size 1` (the fast path, one edit per call)
  1 process x B=8     `dds edit world:N --batch-size 8`
  2 processes x B=8   `dds edit world:N --batch-size 8 --processes 2` (accelerate's launcher;
                      --threads divided between them)

Every `dds edit` row runs as its own command, as a user runs it.  Columns: `wall s` (the whole
command: interpreter start, model load, traces, edits), `edits/s` (steady state: after each
process's first batch, which builds its traced denoiser, summed over the processes; for the
loop, after its first edit) and `max px diff` (the largest difference, in 8-bit levels, of any
output pixel from the B=1 row's: batching and the loop change float rounding only).

GPU rows (--gpu, or by default when CUDA is available): an SD1.5-shaped model (random weights:
`bench_edit.sd15_folder`) editing 512x512 images in one process at B = 1, 8, 16: steady-state
edits/s, seconds per edit and the peak GPU memory of each row (`torch.cuda.max_memory_allocated`,
reset before each).  The fast path compiles each batch shape on CUDA first (minutes for SD1.5);
that build falls in each row's first batch, which the steady rate leaves out.

Usage:
  python benchmarks/bench_batch.py                         # CPU rows (and GPU rows on CUDA)
  python benchmarks/bench_batch.py --edits 64 --steps 200 --json batch.json
  python benchmarks/bench_batch.py --gpu --gpu-steps 50 --gpu-batches 1,8,16 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="diffusers folder (default: the built-in model)")
    p.add_argument("--size", type=int, help="working long side (default: the model's)")
    p.add_argument("--edits", type=int, default=32, help="jobs per CPU row (default 32: two "
                   "batches of 8 for each of two processes)")
    p.add_argument("--steps", type=int, default=25, help="steps per CPU edit (default 25)")
    p.add_argument("--threads", type=int, help="CPU threads of the 1-process rows (default: "
                   "torch's); the 2-process row gives each half of them")
    p.add_argument("--seed", type=int, default=10_000, help="world:N:SEED of the jobs")
    p.add_argument("--gpu", action="store_true", help="run the GPU rows (default: if CUDA is up)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    p.add_argument("--gpu-model", default="sd15", help="sd15 (SD1.5-shaped, random weights) or a "
                   "diffusers folder")
    p.add_argument("--gpu-device", default="cuda", help="device of the GPU rows")
    p.add_argument("--gpu-size", type=int, default=512, help="image side of the GPU rows")
    p.add_argument("--gpu-steps", type=int, default=50, help="steps per GPU edit (default 50)")
    p.add_argument("--gpu-batches", default="1,8,16", help="batch sizes of the GPU rows")
    p.add_argument("--gpu-rounds", type=int, default=3, help="batches per GPU row (default 3; "
                   "the first is the warm-up)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--scratch", help="folder for outputs and model folders (default: a temp dir)")
    return p.parse_args(argv)


# ---- rates from the manifest -------------------------------------------------------------
def steady_rate(records: list[dict]) -> float:
    """Edits/s after each process's first batch, summed over processes (they run at once)."""
    by_rank: dict[int, list[dict]] = {}
    for r in records:
        by_rank.setdefault(int(r["runtime"]["rank"]), []).append(r)
    total = 0.0
    for recs in by_rank.values():
        first_start = min(r["started"] for r in recs)
        first = [r for r in recs if r["started"] == first_start]  # the first batch
        rest = [r for r in recs if r["started"] != first_start]
        if not rest:
            continue
        t0 = max(r["finished"] for r in first)
        t1 = max(r["finished"] for r in rest)
        if t1 > t0:
            total += len(rest) / (t1 - t0)
    return total


def manifest(folder: Path) -> list[dict]:
    from dds.jobs.manifest import read_records

    return sorted(read_records(folder).values(), key=lambda r: r["index"])


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def max_diff(a: Path, b: Path, keys: list[str]) -> int:
    return int(max(np.abs(pixels(a / k) - pixels(b / k)).max() for k in keys))


# ---- CPU rows ---------------------------------------------------------------------------------
def edit_cmd(a, out: Path, batch: int, processes: int = 1, threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dds.cli", "edit", f"world:{a.edits}:{a.seed}", "--steps",
           str(a.steps), "--batch-size", str(batch), "--out", str(out), "--quiet",
           "--device", "cpu"]
    if a.model:
        cmd += ["--model", a.model]
    if a.size:
        cmd += ["--size", str(a.size)]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def run_cli(name: str, cmd: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    recs = manifest(out)
    return {"name": name, "edits": len(recs), "wall_s": round(wall, 2),
            "edits_per_s": round(steady_rate(recs), 4),
            "batch": max(rec["runtime"]["batch"] for rec in recs),
            "processes": max(rec["runtime"]["processes"] for rec in recs),
            "threads": max(rec["runtime"]["threads"] for rec in recs)}


def sequential_loop(a, out: Path) -> dict:
    """The step-by-step loop, one job after another, in this process (its model load and its
    first edit, which builds the traced denoiser, are left out of the steady rate)."""
    from dds.jobs.inputs import JobOptions, read_jobs
    from dds.pipeline import EditRequest, pipeline_for

    t0 = time.perf_counter()
    jl = read_jobs(f"world:{a.edits}:{a.seed}", JobOptions(out=str(out)))
    pipe = pipeline_for(a.model, device="cpu")
    times = []
    for job in jl.jobs:
        t = time.perf_counter()
        p = pipe.prepare(EditRequest(job.load(), job.source, job.target,
                                     {"steps": a.steps, "seed": job.seed}, size=a.size))
        pipe.run(p).save(job.out)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rest = times[1:]
    return {"name": "sequential loop", "edits": len(times), "wall_s": round(wall, 2),
            "edits_per_s": round(len(rest) / sum(rest), 4) if rest else 0.0, "batch": 1,
            "processes": 1, "threads": torch.get_num_threads()}


def cpu_rows(a, scratch: Path) -> list[dict]:
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    plan = [("1 process x B=1", 1, 1), ("1 process x B=8", 8, 1), ("2 processes x B=8", 8, 2)]
    rows, outs = [], {}
    out = scratch / "cpu-loop"
    rows.append(sequential_loop(a, out))
    outs["sequential loop"] = out
    print_row(rows[-1])
    for name, b, n in plan:
        out = scratch / f"cpu-b{b}-n{n}"
        cmd = edit_cmd(a, out, b, n, threads=max(1, threads // n))
        rows.append(run_cli(name, cmd, out))
        outs[name] = out
        print_row(rows[-1])
    keys = [r["key"] for r in manifest(outs["1 process x B=1"])]
    for r in rows:
        r["max_pixel_diff"] = max_diff(outs[r["name"]], outs["1 process x B=1"], keys)
    base = rows[0]["edits_per_s"]
    for r in rows:
        r["speedup_vs_loop"] = round(r["edits_per_s"] / base, 3) if base else None
    return rows


# ---- GPU rows ---------------------------------------------------------------------------------
def gpu_rows(a, scratch: Path) -> list[dict]:
    """SD1.5-shaped edits at B = 1, 8, 16 in this process (the model and its compiled
    denoiser shared by the rows); peak memory per row."""
    from dds.cli import main as dds_main

    sys.path.insert(0, str(HERE))
    device = torch.device(a.gpu_device)
    if a.gpu_model == "sd15":
        from bench_edit import sd15_folder

        folder = scratch / "sd15"
        if not (folder / "model_index.json").is_file():
            sd15_folder(folder)
    else:
        folder = Path(a.gpu_model)
    rows = []
    for b in [int(x) for x in a.gpu_batches.split(",")]:
        out = scratch / f"gpu-b{b}"
        n = b * a.gpu_rounds
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        code = dds_main(["edit", f"world:{n}:{a.seed}", "--model", str(folder), "--size",
                         str(a.gpu_size), "--steps", str(a.gpu_steps), "--batch-size", str(b),
                         "--device", str(device), "--out", str(out), "--quiet"])
        wall = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"the GPU row at B={b} failed (exit {code})")
        recs = manifest(out)
        rate = steady_rate(recs)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append({"name": f"1 process x B={b}", "batch": b, "edits": len(recs),
                     "steps": a.gpu_steps, "size": a.gpu_size, "wall_s": round(wall, 2),
                     "edits_per_s": round(rate, 4),
                     "seconds_per_edit": round(1 / rate, 3) if rate else None,
                     "seconds_per_edit_at_200_steps": round(200 / a.gpu_steps / rate, 3) if rate else None,
                     "peak_memory_mb": round(peak, 1) if peak is not None else None,
                     "precision": recs[0]["runtime"]["precision"]})
        print_row(rows[-1])
    return rows


# ---- report ------------------------------------------------------------------------------------
def print_row(r: dict) -> None:
    extra = f"  peak {r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") else ""
    print(f"{r['name']:<20} {r['edits']:>4} edits  wall {r['wall_s']:>8.1f} s  "
          f"{r['edits_per_s']:>8.3f} edits/s{extra}", flush=True)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> dict:
    from dds.console import configure_process

    configure_process()
    a = parse_args(argv)
    report = {"machine": machine(), "settings": {
        "model": a.model or "built-in", "edits": a.edits, "steps": a.steps, "size": a.size,
        "gpu_model": a.gpu_model, "gpu_size": a.gpu_size, "gpu_steps": a.gpu_steps}}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(a.scratch or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        if not a.no_cpu:
            print(f"CPU: {a.edits} world edits x {a.steps} steps, model "
                  f"{a.model or 'built-in'}", flush=True)
            report["cpu"] = cpu_rows(a, scratch)
        if a.gpu or (torch.cuda.is_available() and a.gpu_device == "cuda"):
            print(f"GPU: {a.gpu_model} at {a.gpu_size}x{a.gpu_size}, {a.gpu_steps} steps",
                  flush=True)
            report["gpu"] = gpu_rows(a, scratch)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
