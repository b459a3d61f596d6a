"""Seconds per UNet training step of a built-in model recipe, on the CPU or a GPU.

Plans a training run: how many UNet steps a preset's batch fits into a time budget on this
machine. It copies the finished stages (text encoder ``text.pt``, autoencoder ``vae.pt``) of an
earlier run of the same preset into a scratch folder, runs ``--steps`` UNet steps through the
trainer itself (scene rendering, the ``--workers`` processes that render ahead, autoencoder
encoding, noise, text encoder, UNet, AdamW, EMA) and reports the mean time of the steps after
the first ``--skip`` (allocator, cuDNN's kernel search, the workers' start-up).

``--render N`` first times the scene renderer alone (N batches through the same worker
processes, no model): when it delivers fewer scenes a second than the steps consume, the GPU
waits for the CPU, and ``--batch-reuse K`` (each rendered batch serves K steps) is the remedy.

  python benchmarks/bench_train_step.py --from-run runs/builtin-4 --preset fourth-gpu \\
      --device cuda --steps 80
  python benchmarks/bench_train_step.py --from-run runs/builtin-4 --preset fourth --steps 20

The last line printed is the seconds per step alone (for scripts).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> None:
    from dds.console import configure_process

    configure_process()
    import torch

    from dds.builtin import configs as C
    from dds.builtin import train as T

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-run", required=True,
                   help="a run folder of the same preset holding finished text.pt and vae.pt")
    p.add_argument("--preset", default="fourth", choices=sorted(C.PRESETS))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=40, help="UNet steps run (a multiple of 10)")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the mean")
    p.add_argument("--workers", type=int, default=None,
                   help="scene-rendering processes (default: the trainer's for the device)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-reuse", type=int, default=None,
                   help="steps each rendered batch serves (default: the preset's)")
    p.add_argument("--render", type=int, default=0,
                   help="time N rendered batches alone first (0: skip)")
    a = p.parse_args()
    if a.steps % 10 or a.skip % 10 or a.skip >= a.steps:
        sys.exit("--steps and --skip must be multiples of 10 (the log's interval), skip < steps")
    src = Path(a.from_run)
    if not ((src / "text.pt").exists() and (src / "vae.pt").exists()):
        sys.exit(f"{src} holds no finished text.pt and vae.pt; train the preset's first stages "
                 "there first (dds train-builtin --preset ... --unet-steps 0)")
    torch.set_num_threads(a.threads)
    cfg = C.with_overrides(C.PRESETS[a.preset](), batch_size=a.batch_size, unet_steps=10**6,
                           batch_reuse=a.batch_reuse, judge_every=0, sample_every=10**9,
                           ckpt_every=10**9, log_every=10)
    dev = T.train_device(a.device)
    workers = a.workers if a.workers is not None else T.default_workers(dev)
    if a.render:
        rate = render_rate(T.StepBatches(cfg, "unet", cfg.batch_size, 10**6, workers),
                           a.render, cfg.batch_size)
        print(f"renderer alone: {rate:.0f} scenes/s ({workers} worker processes)")
    with tempfile.TemporaryDirectory(prefix="dds-train-step-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for name in ("text.pt", "vae.pt"):
            shutil.copy2(src / name, run / name)
        T.train_builtin(cfg, run, run / "model", progress=False, stop_after=a.steps,
                        device=a.device, workers=workers)
        with open(run / "log.csv", newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["stage"] == "unet"]
    at = {int(r["step"]): float(r["seconds"]) for r in rows}
    per_step = (at[a.steps] - at[a.skip]) / (a.steps - a.skip)
    print(f"# preset {a.preset}, batch {cfg.batch_size}, reuse {cfg.batch_reuse}, "
          f"{T.device_name(dev)}, {a.threads} torch threads, {workers} render workers")
    print(f"UNet step: {per_step * 1000:.1f} ms (mean of steps {a.skip + 1}-{a.steps}); "
          f"{cfg.batch_size / per_step:.0f} scenes/s trained, "
          f"{cfg.batch_size / per_step / cfg.batch_reuse:.0f} rendered; loss {rows[-1]['loss']}")
    print(f"{per_step:.5f}")


def render_rate(batches, n: int, batch_size: int) -> float:
    """Scenes a second that ``batches`` (a ``StepBatches``) delivers in steady state: timed
    over ``n`` batches once the batches its workers rendered ahead during their start-up are
    drained (those would arrive at the speed of a queue, not of the renderer); the workers are
    stopped afterwards, so that they do not share the CPU with the step probe."""
    import time

    ahead = 2 + batches.workers * batches.PREFETCH
    try:
        for step in range(ahead):
            batches.get(step)
        start = time.perf_counter()
        for step in range(ahead, ahead + n):
            batches.get(step)
        return n * batch_size / (time.perf_counter() - start)
    finally:
        batches.close()


if __name__ == "__main__":
    main()
