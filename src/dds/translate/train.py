"""Train the one-pass translation network with DDS and an identity loss (paper Section 4).

Each optimiser step, for a batch of (source zhat with caption ŷ, task k with target y_k):

    z      = g(zhat | k)                                      one forward pass
    grad   = DDS(z, zhat; y_k, ŷ, t, eps, w(step))             shared t and eps (Eq. 3)
    loss   = <z, sg(grad)> / numel  +  lambda_ID(step) * mean((z - zhat)^2)

lambda_ID decays with a cosine from `lambda_id_start` to `lambda_id_end`; the guidance scale w
warms up linearly from `guidance_start` to `guidance_end` (without the warm-up the paper sees
mode collapse: one object in one place).  `score="sds"` swaps DDS for SDS (the ablation).

Runs on accelerate: several processes (each draws its own samples), mixed precision, gradient
accumulation.  All randomness of step s on process r, micro-batch j comes from
`default_rng([seed, s, r, j])`, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would take: on the CPU the final weights are equal bit for bit.

Run folder:
    config.json            the training config
    log.csv                one row per logged step (tensorboard in tb/ when installed)
    samples/step-N.png     validation grids: a row per source, a column per task
    checkpoints/step-N/    unet.safetensors, tasks.safetensors, translation.json,
                           optimizer.pt, state.json, manifest.json (sizes + sha256, written last;
                           the folder appears by an atomic rename)
    model/                 the final network + the base model's VAE: all `dds translate` needs

The base model's own folder is only read, never written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dds.errors import DDSError
from dds.methods import SCORES, get_method, stratum_levels
from dds.models.base import Conditioning
from dds.training.toolkit import (
    CsvLog,
    checkpoint_dir,
    latest_good,
    list_checkpoints,
    problem,
    prune_checkpoints,
    staged_folder,
)

MODEL = "model"
LOG_FIELDS = ["step", "images", "lr", "guidance", "lambda_id", "dds_grad_norm", "id_mse",
              "loss_id", "grad_norm", "images_per_s", "seconds"]
# Settings that may change when a run is resumed (they do not change what a step computes;
# a run folder may also be moved).
RESUMABLE = {"out", "steps", "checkpoint_every", "keep_checkpoints", "val_every", "val_images",
             "log_every", "resume", "quiet", "device"}


TRAIN_GUIDANCE = 7.5  # the final guidance of the warm-up when none is given
# How the trainer draws each sample's t (the zero-shot schedules of `dds.methods`, carried
# over to training): "uniform", the paper's i.i.d. draw; "stratified", a batch's B samples one
# in each of B equal strata of [t_min, t_max - 1) (less variance, same distribution);
# "descending", a window of a tenth of the range that slides from the noisiest tenth to the
# least noisy over the run (DreamTime's coarse-to-fine order).
TRAIN_T_SCHEDULES = ("uniform", "stratified", "descending")
DESCENDING_WINDOWS = 10

@dataclass(frozen=True)
class TrainConfig:
    out: str = "translate-run"
    model: str | None = None  # base model folder; None: the built-in model
    data: str = "world"  # "world" or an ImageFolder with metadata.jsonl
    tasks: tuple[str, ...] = ("circle:square",)
    world_size: int = 5000  # scenes drawn from the built-in world when data == "world"
    world_seed: int = 0
    resolution: int | None = None  # image side; default: the base model's native size
    on_bad_data: str = "error"
    steps: int = 2000
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    score: str = "dds"  # a method of dds.methods: "dds", or "sds" (the ablation)
    guidance_start: float = 1.0
    guidance_end: float | None = None  # default: TRAIN_GUIDANCE (7.5)
    guidance_warmup: float = 0.5  # fraction of the steps over which w rises linearly
    lambda_id_start: float = 1.0
    lambda_id_end: float = 0.01
    t_min: int = 50
    t_max: int = 950
    t_schedule: str = "uniform"  # how t is drawn: TRAIN_T_SCHEDULES
    residual: bool = True
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    val_every: int = 200
    val_images: int = 4
    log_every: int = 10
    resume: str | None = None  # None, "latest", or a checkpoint folder
    device: str | None = None  # "cpu" forces the CPU
    quiet: bool = False

    def __post_init__(self):
        def bad(name, why):
            raise DDSError(f"{name.replace('_', '-')} = {getattr(self, name)!r} is invalid: {why}")

        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                     "val_every", "log_every", "world_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "it must be a whole number >= 1")
        if self.val_images < 0:
            bad("val_images", "it must be >= 0")
        for name in ("lr", "guidance_start", "lambda_id_start", "lambda_id_end"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                bad(name, "it must be a finite number >= 0")
        if self.lr <= 0:
            bad("lr", "it must be > 0")
        if not 0 <= self.guidance_warmup <= 1:
            bad("guidance_warmup", "it is a fraction of the steps, between 0 and 1")
        if self.score not in SCORES:
            bad("score", "use one of " + ", ".join(repr(m) for m in SCORES))
        if self.t_schedule not in TRAIN_T_SCHEDULES:
            bad("t_schedule", "use one of " + ", ".join(repr(m) for m in TRAIN_T_SCHEDULES))
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            bad("mixed_precision", "use 'no', 'fp16' or 'bf16'")
        if self.on_bad_data not in ("skip", "error"):
            bad("on_bad_data", "use 'skip' or 'error'")
        if not 0 <= self.t_min < self.t_max - 1 <= 1000:
            bad("t_min", "need 0 <= t_min < t_max - 1 <= 1000")
        if self.resolution is not None and self.resolution < 8:
            bad("resolution", "it must be at least 8 pixels")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Schedules (pure functions of the step)
# --------------------------------------------------------------------------------------------


def lambda_id(step: int, cfg: TrainConfig) -> float:
    """Identity weight: cosine decay from lambda_id_start (step 0) to lambda_id_end (last step)."""
    frac = min(step / max(cfg.steps - 1, 1), 1.0)
    return cfg.lambda_id_end + (cfg.lambda_id_start - cfg.lambda_id_end) * 0.5 * (
        1 + math.cos(math.pi * frac))


def guidance(step: int, cfg: TrainConfig, w_end: float) -> float:
    """CFG warm-up: linear from guidance_start to w_end over the first guidance_warmup steps."""
    n = cfg.guidance_warmup * cfg.steps
    frac = 1.0 if n <= 0 else min(step / n, 1.0)
    return cfg.guidance_start + (w_end - cfg.guidance_start) * frac


# --------------------------------------------------------------------------------------------
# Checkpoints and the exported model: sealed folders (dds.training.toolkit)
# --------------------------------------------------------------------------------------------


def write_checkpoint(run: Path, step: int, net, netcfg, optimizer, scaler, keep: int) -> Path:
    """Atomically write checkpoints/step-N and keep only the `keep` newest ones."""
    final = checkpoint_dir(run, step)
    with staged_folder(final) as tmp:
        net.save(tmp, netcfg)
        torch.save({"optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    prune_checkpoints(run, keep)
    return final


def export_model(run: Path, net, netcfg, model) -> Path:
    """run/model: the network, its config, and the base model's VAE (atomic, sealed)."""
    with staged_folder(Path(run) / MODEL) as tmp:
        net.save(tmp, netcfg)
        model.save_autoencoder(tmp / "vae")
    return Path(run) / MODEL


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _Cache:
    """Latents and prompt conditionings, each computed alone (batch of one) so that its bits do
    not depend on which other items share a batch: a resumed run sees the same numbers."""

    def __init__(self, model, pool, limit: int = 8192):
        self.model, self.pool, self.limit = model, pool, limit
        self.lat: dict[int, torch.Tensor] = {}
        self.cond: dict[str, Conditioning] = {}

    def latent(self, i: int) -> torch.Tensor:
        if i not in self.lat:
            if len(self.lat) >= self.limit:
                self.lat.clear()
            x = self.pool.image(i).unsqueeze(0) * 2 - 1  # (1,3,H,W) in [-1,1]
            self.lat[i] = self.model.encode(x)[0].float()  # (C,h,w)
        return self.lat[i]

    def prompt(self, text: str) -> Conditioning:
        if text not in self.cond:
            if len(self.cond) >= self.limit:
                self.cond.clear()
            self.cond[text] = self.model.encode_prompt([text]).float()  # 1 row
        return self.cond[text]

    def prompts(self, texts: list[str], device) -> Conditioning:
        """The conditionings of `texts`, one row each, stacked in order."""
        return Conditioning.cat([self.prompt(y) for y in texts]).to(device)


def _make_pool(cfg: TrainConfig, size: int):
    from dds.translate.data import FolderSources, WorldSources

    if cfg.data == "world":
        return WorldSources(cfg.world_size, cfg.world_seed, size)
    if not Path(cfg.data).is_dir():
        raise DDSError(f"data '{cfg.data}' is neither 'world' nor a folder; give an ImageFolder "
                       "with metadata.jsonl, or 'world' for the built-in world")
    return FolderSources(cfg.data, size, cfg.on_bad_data)


def _val_grid(net, cache, table, pool, device, n: int) -> np.ndarray:
    """Rows: the first n sources some task applies to; columns: source, then each task."""
    model = cache.model
    seen: list[int] = []
    for srcs in table.sources:
        for i in srcs[:n]:
            if i not in seen:
                seen.append(i)
    rows = sorted(seen)[:n]
    z_hat = torch.stack([cache.latent(i) for i in rows]).to(device)  # (n,C,h,w)
    cols = [pool.image(i).unsqueeze(0) for i in rows]
    cols = [torch.cat(cols)]
    with torch.no_grad():
        for k in range(len(table.tasks)):
            ids = torch.full((len(rows),), k, dtype=torch.long, device=device)
            z = net(z_hat, ids).float()
            cols.append(((model.decode(z).cpu() + 1) / 2).clamp(0, 1))
    grid = torch.stack(cols, 1)  # (n, 1+M, 3, H, W)
    n_r, n_c, _, h, w = grid.shape
    img = grid.permute(0, 3, 1, 4, 2).reshape(n_r * h, n_c * w, 3)
    return (img.numpy() * 255 + 0.5).astype(np.uint8)


def train_levels(g: torch.Generator, cfg: TrainConfig, step: int, n: int) -> torch.Tensor:
    """The n samples' t at optimiser `step` under `cfg.t_schedule` -> (n,) long in
    [t_min, t_max - 1)."""
    if cfg.t_schedule == "uniform":
        return torch.randint(cfg.t_min, cfg.t_max - 1, (n,), generator=g)
    if cfg.t_schedule == "stratified":
        return stratum_levels(torch.randperm(n, generator=g), n, [g] * n, cfg)
    window = min(step * DESCENDING_WINDOWS // cfg.steps, DESCENDING_WINDOWS - 1)
    return stratum_levels(window, DESCENDING_WINDOWS, [g] * n, cfg)


def _draw(rng: np.random.Generator, cfg: TrainConfig, shape,
          step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    t = train_levels(g, cfg, step, shape[0])
    eps = torch.randn(shape, generator=g)
    return t, eps


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


class _Voice:
    """The trainer's messages on stderr, from the main process only."""

    def __init__(self, main: bool, quiet: bool):
        self.main, self.quiet = main, quiet

    def say(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(f"dds translate-train: {msg}", file=sys.stderr)

    def warn(self, msg: str) -> None:
        if self.main:
            print(f"dds translate-train: warning: {msg}", file=sys.stderr)


def _check_out(cfg: TrainConfig) -> None:
    """The run folder must lie outside the base model's folder: training never writes there."""
    from dds.models.registry import BUILTIN_DIR

    out = Path(cfg.out).resolve()
    base = BUILTIN_DIR if cfg.model is None else Path(cfg.model)
    if base.is_dir() and (out == base.resolve() or base.resolve() in out.parents):
        raise DDSError(f"--out '{cfg.out}' is inside the base model's folder '{base}'; choose a "
                       "run folder elsewhere (training never writes into the model)")


def _start_point(cfg: TrainConfig, run: Path, voice: _Voice) -> Path | None:
    """The checkpoint to resume from (None: the base model); refuses a mismatched resume and
    a fresh start over an existing run."""
    if not cfg.resume:
        if list_checkpoints(run):
            raise DDSError(f"'{run}' already holds a training run; add --resume latest to "
                           "continue it, or choose another --out folder")
        return None
    saved = run / "config.json"
    if saved.is_file():
        # a field the run's config predates holds its default (what the run computed with)
        old = TrainConfig.from_dict(json.loads(saved.read_text(encoding="utf-8"))).to_dict()
        new = cfg.to_dict()
        diff = sorted(k for k in new if k not in RESUMABLE and old.get(k) != new[k])
        if diff:
            raise DDSError(
                f"cannot resume '{run}' with a different {diff[0].replace('_', '-')} "
                f"({old.get(diff[0])!r} before, {new[diff[0]]!r} now); use the same settings "
                "or a new --out folder"
            )
    if cfg.resume == "latest":
        start_from = latest_good(run, voice.warn)
        if start_from is None:
            voice.say(f"no checkpoint in '{run}' yet; starting from the base model")
        return start_from
    start_from = Path(cfg.resume)
    why = problem(start_from) if start_from.is_dir() else "it does not exist"
    if why:
        raise DDSError(f"checkpoint '{start_from}' cannot be resumed from: {why}")
    return start_from


def _base_label(cfg: TrainConfig, model) -> str:
    """How translation.json names the base model: "builtin", or the folder the user gave."""
    from dds.models.registry import is_builtin

    if is_builtin(model) or cfg.model is None:
        return "builtin"
    return str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else str(cfg.model)


@dataclass
class _Job:
    """Everything one training run works with, built once."""

    model: Any
    pool: Any
    table: Any
    net: Any
    netcfg: Any
    optimizer: Any
    w_end: float


def _build(cfg: TrainConfig, device, voice: _Voice) -> _Job:
    """The base model, the data, the network g (a copy of the base UNet) and its optimiser."""
    from dds.pipeline import get_model
    from dds.translate.data import TaskTable, load_tasks
    from dds.translate.network import NetConfig, TranslationNet

    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model, device=str(device))
    size = cfg.resolution or model.native_size
    # Not the model's zero-shot edit guidance: that one is tuned together with the step size of
    # a 200-step optimisation, while here the guidance alone sets how hard DDS pulls against
    # the identity loss.  The paper's (and the reference's) CFG scale is the default.
    w_end = cfg.guidance_end if cfg.guidance_end is not None else TRAIN_GUIDANCE
    tasks = load_tasks(cfg.tasks)
    pool = _make_pool(cfg, size)
    table = TaskTable.build(pool, tasks)
    voice.say(f"{len(pool)} source images; tasks: " + ", ".join(
        f"{t.name} ({len(s)} sources)" for t, s in zip(tasks, table.sources, strict=True)))
    # On the CPU until accelerate places it, as the network is built there.
    unet = model.copy_denoiser(dtype=torch.float32, trainable=True).to("cpu")
    phrases = model.encode_prompt([t.phrase for t in tasks]).float().to("cpu").embeds  # (M,L,D)
    net = TranslationNet.from_unet(unet, phrases, residual=cfg.residual)
    netcfg = NetConfig(unet=dict(unet.config), tasks=[t.to_dict() for t in tasks],
                       base_model=_base_label(cfg, model), resolution=size,
                       residual=cfg.residual, train=cfg.to_dict(), base_identity=model.identity())
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _Job(model, pool, table, net, netcfg, optimizer, w_end)


def _resume(job: _Job, start_from: Path | None) -> tuple[int, dict | None]:
    """Load a checkpoint's weights and optimiser into the job; (step, saved state)."""
    if start_from is None:
        return 0, None
    job.net.load_weights(start_from)
    state = torch.load(start_from / "optimizer.pt", map_location="cpu", weights_only=False)
    job.optimizer.load_state_dict(state["optimizer"])
    return json.loads((start_from / "state.json").read_text())["step"], state


def _step(job: _Job, cfg: TrainConfig, accelerator, cache: _Cache, step: int,
          lam: float, w: float) -> dict:
    """One optimiser step (grad_accum micro-batches); returns its statistics."""
    from dds.score import grad_to_loss

    method, model, net, device = get_method(cfg.score), job.model, job.net, accelerator.device
    uncond = model.uncond().float()  # 1 row
    for group in job.optimizer.param_groups:
        group["lr"] = cfg.lr
    stats = {"dds_grad_norm": 0.0, "id_mse": 0.0}
    for micro in range(cfg.grad_accum):
        rng = np.random.default_rng([cfg.seed, step, accelerator.process_index, micro])
        batch = job.table.sample(rng, cfg.batch_size)
        z_hat = torch.stack([cache.latent(i) for _, i, _ in batch]).to(device)  # (B,C,h,w)
        k = torch.tensor([kk for kk, _, _ in batch], device=device)  # (B,)
        source = cache.prompts([job.pool.captions[i] for _, i, _ in batch], device)
        target = cache.prompts([y for _, _, y in batch], device)
        t, eps = _draw(rng, cfg, z_hat.shape, step)
        t, eps = t.to(device), eps.to(device)
        cond = method.conditioning(uncond.expand(len(batch)), source, target)
        sync = micro == cfg.grad_accum - 1
        with accelerator.no_sync(net) if not sync else contextlib.nullcontext():
            z = net(z_hat, k).float()  # (B,C,h,w), one forward pass
            with torch.no_grad():
                g = method.grad(model.predict_eps, z.detach(), z_hat, cond, t, eps,
                                model.schedule, w)
            id_mse = (z - z_hat).pow(2).mean()
            loss = grad_to_loss(z, g) / z.numel() + lam * id_mse
            accelerator.backward(loss / cfg.grad_accum)
        stats["dds_grad_norm"] += float(g.flatten(1).norm(dim=1).mean()) / cfg.grad_accum
        stats["id_mse"] += float(id_mse.detach()) / cfg.grad_accum
    stats["grad_norm"] = accelerator.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return stats


def _log_row(step: int, images: int, dt: float, lr: float, lam: float, w: float,
             stats: dict) -> dict:
    return {"step": step, "images": images, "lr": lr, "guidance": round(w, 6),
            "lambda_id": round(lam, 6), "dds_grad_norm": round(stats["dds_grad_norm"], 6),
            "id_mse": f"{stats['id_mse']:.4g}", "loss_id": f"{lam * stats['id_mse']:.4g}",
            "grad_norm": round(float(stats["grad_norm"]), 6),
            "images_per_s": round(images / max(dt, 1e-9), 3), "seconds": round(dt, 2)}


def _open_run(cfg: TrainConfig, run: Path, accelerator, tb: bool, step: int,
              voice: _Voice) -> CsvLog:
    """config.json, tensorboard and log.csv (its rows after `step` dropped) on the main process."""
    log = CsvLog(run / "log.csv", LOG_FIELDS)
    if not accelerator.is_main_process:
        return log
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
    if tb:
        accelerator.init_trackers("tb", config={k: str(v) for k, v in cfg.to_dict().items()})
    else:
        voice.say("tensorboard is not installed; logging to log.csv only")
    log.truncate_after(step)
    return log


def train(cfg: TrainConfig) -> Path:
    """Train g; returns the run folder (its `model/` is the final network)."""
    from accelerate import Accelerator

    from dds.images import save_png
    from dds.progress import progress_bar

    _check_out(cfg)
    run = Path(cfg.out)
    tb = _tensorboard_available()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
        log_with="tensorboard" if tb else None, project_dir=str(run),
    )
    main = accelerator.is_main_process
    voice = _Voice(main, cfg.quiet)
    start_from = _start_point(cfg, run, voice)
    job = _build(cfg, accelerator.device, voice)
    step, state = _resume(job, start_from)
    if start_from is not None:
        voice.say(f"resuming from '{start_from}' at step {step}")
    job.net, job.optimizer = accelerator.prepare(job.net, job.optimizer)
    if state is not None and accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    raw = accelerator.unwrap_model(job.net)
    log = _open_run(cfg, run, accelerator, tb, step, voice)
    cache = _Cache(job.model, job.pool)
    bar = progress_bar(cfg.steps, "translate-train", quiet=cfg.quiet or not main)
    bar.update(step)
    t0, images_done = time.time(), 0
    while step < cfg.steps:
        lam, w = lambda_id(step, cfg), guidance(step, cfg, job.w_end)
        stats = _step(job, cfg, accelerator, cache, step, lam, w)
        step += 1
        images_done += cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        bar.update(1)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            row = _log_row(step, images_done, time.time() - t0, cfg.lr, lam, w, stats)
            if main:
                log.write(row)
            if tb:
                accelerator.log({k: float(v) for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(w=f"{w:.2f}", lam=f"{lam:.3f}", dds=f"{stats['dds_grad_norm']:.3f}")
        if main and cfg.val_images and (step % cfg.val_every == 0 or last):
            from PIL import Image

            grid = _val_grid(raw, cache, job.table, job.pool, accelerator.device, cfg.val_images)
            save_png(Image.fromarray(grid), run / "samples" / f"step-{step:07d}.png")
        if step % cfg.checkpoint_every == 0 or last:
            if main:
                write_checkpoint(run, step, raw, job.netcfg, job.optimizer, accelerator.scaler,
                                 cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()
    if main:
        out = export_model(run, raw, job.netcfg, job.model)
        voice.say(f"done: {step} steps; the network is in '{out}'")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run


# --------------------------------------------------------------------------------------------
# Command line: `dds translate-train` (also `accelerate launch -m dds.translate.train`)
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dds.console import Parser

    d = TrainConfig()
    p = Parser(
        prog="dds translate-train",
        description="Train a one-pass image-to-image translation network with DDS (paper "
        "Section 4). Several processes: `accelerate launch [--num_processes N] -m "
        "dds.translate.train ...`.",
        epilog="example: dds translate-train --data world --task circle:square --task "
        "circle:triangle --task circle:star --steps 3000 --out runs/circle",
    )
    p.add_argument("--out", default=d.out, help="run folder (checkpoints, logs, samples, model)")
    p.add_argument("--model", help="base diffusers model folder (default: the built-in model)")
    p.add_argument("--data", default=d.data,
                   help="'world' (built-in scenes) or an ImageFolder with metadata.jsonl")
    p.add_argument("--task", action="append", dest="tasks", metavar="SPEC",
                   help="OLD:NEW (replace a caption word), NAME=CAPTION (fixed target), or a "
                   ".json list of {name, phrase, replace|target}; repeat for several tasks")
    p.add_argument("--world-size", type=int, default=d.world_size, help="scenes when --data world")
    p.add_argument("--world-seed", type=int, default=d.world_seed)
    p.add_argument("--resolution", type=int, help="image side (default: the model's native size)")
    p.add_argument("--on-bad-data", choices=["skip", "error"], default=d.on_bad_data,
                   help="an unreadable image or missing caption: report and skip, or stop")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process, per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--score", choices=list(SCORES), default=d.score,
                   help="the distillation score (sds: the paper's ablation)")
    p.add_argument("--guidance-start", type=float, default=d.guidance_start)
    p.add_argument("--guidance-end", type=float,
                   help="final guidance (default 7.5, the paper's CFG scale)")
    p.add_argument("--guidance-warmup", type=float, default=d.guidance_warmup,
                   help="fraction of the steps over which the guidance rises (0: no warm-up)")
    p.add_argument("--lambda-id-start", type=float, default=d.lambda_id_start)
    p.add_argument("--lambda-id-end", type=float, default=d.lambda_id_end)
    p.add_argument("--t-min", type=int, default=d.t_min)
    p.add_argument("--t-max", type=int, default=d.t_max)
    p.add_argument("--t-schedule", choices=TRAIN_T_SCHEDULES, default=d.t_schedule,
                   help="how each sample's t is drawn: uniform (the paper), stratified across "
                   "the batch, or descending over the run")
    p.add_argument("--direct", action="store_true",
                   help="predict the edited latent directly instead of a residual")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=d.mixed_precision)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--val-images", type=int, default=d.val_images)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", metavar="latest|FOLDER",
                   help="continue from the newest intact checkpoint, or from a checkpoint folder")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(a) -> TrainConfig:
    return TrainConfig(
        out=a.out, model=a.model, data=a.data, tasks=tuple(a.tasks or TrainConfig.tasks),
        world_size=a.world_size, world_seed=a.world_seed, resolution=a.resolution,
        on_bad_data=a.on_bad_data, steps=a.steps, batch_size=a.batch_size,
        grad_accum=a.grad_accum, lr=a.lr, weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm, score=a.score, guidance_start=a.guidance_start,
        guidance_end=a.guidance_end, guidance_warmup=a.guidance_warmup,
        lambda_id_start=a.lambda_id_start, lambda_id_end=a.lambda_id_end, t_min=a.t_min,
        t_max=a.t_max, t_schedule=a.t_schedule, residual=not a.direct, mixed_precision=a.mixed_precision, seed=a.seed,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
        val_every=a.val_every, val_images=a.val_images, log_every=a.log_every, resume=a.resume,
        device="cpu" if a.cpu else None, quiet=a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    """The entry point: `dds translate-train ...` or `python -m dds.translate.train ...`."""
    from dds.console import configure_process

    configure_process()
    args = build_parser().parse_args(argv)
    train(config_from_args(args))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DDSError as e:
        print(f"dds translate-train: error: {e}", file=sys.stderr)
        sys.exit(2)
