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
    model/                 the final network + a copy of the base VAE: all `dds translate` needs
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from dds.errors import DDSError

CHECKPOINTS = "checkpoints"
MODEL = "model"
LOG_FIELDS = ["step", "images", "lr", "guidance", "lambda_id", "dds_grad_norm", "id_mse",
              "loss_id", "grad_norm", "images_per_s", "seconds"]
# Settings that may change when a run is resumed (they do not change what a step computes).
RESUMABLE = {"steps", "checkpoint_every", "keep_checkpoints", "val_every", "val_images",
             "log_every", "resume", "quiet", "device"}


TRAIN_GUIDANCE = 7.5  # the final guidance of the warm-up when none is given

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
    score: str = "dds"  # "dds" or "sds" (ablation)
    guidance_start: float = 1.0
    guidance_end: float | None = None  # default: TRAIN_GUIDANCE (7.5)
    guidance_warmup: float = 0.5  # fraction of the steps over which w rises linearly
    lambda_id_start: float = 1.0
    lambda_id_end: float = 0.01
    t_min: int = 50
    t_max: int = 950
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
        if self.score not in ("dds", "sds"):
            bad("score", "use 'dds' or 'sds'")
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
# Checkpoints: written in a hidden folder, then renamed; verified by a manifest on load
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def seal(folder: Path, names: list[str]) -> None:
    """Write manifest.json (size and sha256 of each file) after flushing the files to disk."""
    entries = {}
    for n in names:
        p = folder / n
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        entries[n] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    with open(folder / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, intact checkpoint; None when it is."""
    man = folder / "manifest.json"
    if not man.is_file():
        return "it has no manifest.json, so it was never finished"
    try:
        entries = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its manifest.json is unreadable"
    for name, e in entries.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != e["bytes"]:
            return f"{name} has {p.stat().st_size} bytes instead of {e['bytes']}"
        if _sha256(p) != e["sha256"]:
            return f"{name} does not match its recorded checksum"
    return None


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder of a run, oldest first (not verified)."""
    out = []
    for p in (Path(run) / CHECKPOINTS).glob("step-*"):
        try:
            out.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out)


def latest_good(run: Path, warn=print) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported in one sentence."""
    for _, p in reversed(list_checkpoints(run)):
        why = problem(p)
        if why is None:
            return p
        warn(f"checkpoint '{p}' is damaged ({why}) and is skipped; trying the one before it")
    return None


def write_checkpoint(run: Path, step: int, net, netcfg, optimizer, scaler, keep: int) -> Path:
    """Atomically write checkpoints/step-N and keep only the `keep` newest ones."""
    root = Path(run) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    names = net.save(tmp, netcfg)
    torch.save({"optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    seal(tmp, [*names, "optimizer.pt", "state.json"])
    if final.exists():  # a rerun over a step written before: replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, p in list_checkpoints(run)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):  # leftovers of killed runs
        shutil.rmtree(p, ignore_errors=True)
    return final


def export_model(run: Path, net, netcfg, backend) -> Path:
    """run/model: the network, its config, and a copy of the base VAE (atomic, sealed)."""
    final = Path(run) / MODEL
    tmp = Path(run) / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    names = net.save(tmp, netcfg)
    vae = Path(backend.root) / "vae"
    shutil.copytree(vae, tmp / "vae")
    names += [str(p.relative_to(tmp)) for p in sorted((tmp / "vae").rglob("*")) if p.is_file()]
    seal(tmp, names)
    if final.exists():
        old = Path(run) / f".old-model-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    return final


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _Cache:
    """Latents and prompt embeddings, each computed alone (batch of one) so that its bits do not
    depend on which other items share a batch: a resumed run sees the same numbers."""

    def __init__(self, backend, pool, limit: int = 8192):
        self.backend, self.pool, self.limit = backend, pool, limit
        self.lat: dict[int, torch.Tensor] = {}
        self.emb: dict[str, torch.Tensor] = {}

    def latent(self, i: int) -> torch.Tensor:
        if i not in self.lat:
            if len(self.lat) >= self.limit:
                self.lat.clear()
            x = self.pool.image(i).unsqueeze(0) * 2 - 1  # (1,3,H,W) in [-1,1]
            self.lat[i] = self.backend.encode(x)[0].float()  # (C,h,w)
        return self.lat[i]

    def prompt(self, text: str) -> torch.Tensor:
        if text not in self.emb:
            if len(self.emb) >= self.limit:
                self.emb.clear()
            self.emb[text] = self.backend.encode_prompt([text])[0].float()  # (L,D)
        return self.emb[text]


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
    backend = cache.backend
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
            cols.append(((backend.decode(z).cpu() + 1) / 2).clamp(0, 1))
    grid = torch.stack(cols, 1)  # (n, 1+M, 3, H, W)
    n_r, n_c, _, h, w = grid.shape
    img = grid.permute(0, 3, 1, 4, 2).reshape(n_r * h, n_c * w, 3)
    return (img.numpy() * 255 + 0.5).astype(np.uint8)


def _draw(rng: np.random.Generator, cfg: TrainConfig, shape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    t = torch.randint(cfg.t_min, cfg.t_max - 1, (shape[0],), generator=g)
    eps = torch.randn(shape, generator=g)
    return t, eps


class _Log:
    def __init__(self, run: Path, start: int, active: bool):
        self.path = run / "log.csv"
        self.active = active
        if not active:
            return
        rows = []
        if self.path.is_file() and start > 0:  # drop rows of steps the resume will redo
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        if self.active:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS).writerow({k: row.get(k, "") for k in LOG_FIELDS})


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def train(cfg: TrainConfig, _hang_after: int | None = None) -> Path:
    """Train g; returns the run folder (its `model/` is the final network)."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from dds.pipeline import get_model
    from dds.images import save_png
    from dds.progress import progress_bar
    from dds.score import dds_grad, grad_to_loss, sds_grad
    from dds.translate.data import TaskTable, load_tasks
    from dds.translate.network import NetConfig, TranslationNet

    run = Path(cfg.out)
    tb = _tensorboard_available()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
        log_with="tensorboard" if tb else None, project_dir=str(run),
    )
    main = accelerator.is_main_process
    rank = accelerator.process_index

    def say(msg):
        if main and not cfg.quiet:
            print(f"dds translate-train: {msg}", file=sys.stderr)

    def warn(msg):
        if main:
            print(f"dds translate-train: warning: {msg}", file=sys.stderr)

    # ---- where to start ---------------------------------------------------------------
    start_from: Path | None = None
    if cfg.resume:
        saved = run / "config.json"
        if saved.is_file():
            old = json.loads(saved.read_text(encoding="utf-8"))
            new = cfg.to_dict()
            diff = sorted(k for k in new if k not in RESUMABLE and old.get(k) != new[k])
            if diff:
                raise DDSError(
                    f"cannot resume '{run}' with a different {diff[0].replace('_', '-')} "
                    f"({old.get(diff[0])!r} before, {new[diff[0]]!r} now); use the same settings "
                    "or a new --out folder"
                )
        if cfg.resume == "latest":
            start_from = latest_good(run, warn)
            if start_from is None:
                say(f"no checkpoint in '{run}' yet; starting from the base model")
        else:
            start_from = Path(cfg.resume)
            why = problem(start_from) if start_from.is_dir() else "it does not exist"
            if why:
                raise DDSError(f"checkpoint '{start_from}' cannot be resumed from: {why}")
    elif list_checkpoints(run):
        raise DDSError(f"'{run}' already holds a training run; add --resume latest to continue "
                       "it, or choose another --out folder")

    # ---- model, data, network ---------------------------------------------------------
    torch.manual_seed(cfg.seed)
    backend = get_model(cfg.model, device=str(accelerator.device))
    size = cfg.resolution or backend.native_size
    # Not the model's zero-shot edit guidance: that one is tuned together with the step size of
    # a 200-step optimisation, while here the guidance alone sets how hard DDS pulls against
    # the identity loss.  The paper's (and the reference's) CFG scale is the default.
    w_end = cfg.guidance_end if cfg.guidance_end is not None else TRAIN_GUIDANCE
    tasks = load_tasks(cfg.tasks)
    pool = _make_pool(cfg, size)
    table = TaskTable.build(pool, tasks)
    say(f"{len(pool)} source images; tasks: " + ", ".join(
        f"{t.name} ({len(s)} sources)" for t, s in zip(tasks, table.sources, strict=True)))
    unet = UNet2DConditionModel.from_pretrained(backend.root, subfolder="unet")
    unet_config = dict(unet.config)
    phrases = backend.encode_prompt([t.phrase for t in tasks]).float().cpu()  # (M,L,D)
    net = TranslationNet.from_unet(unet, phrases, residual=cfg.residual)
    base = "builtin" if cfg.model is None else str(Path(backend.root).resolve())
    netcfg = NetConfig(unet=unet_config, tasks=[t.to_dict() for t in tasks], base_model=base,
                       resolution=size, residual=cfg.residual, train=cfg.to_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if start_from is not None:
        net.load_weights(start_from)
        state = torch.load(start_from / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step = json.loads((start_from / "state.json").read_text())["step"]
        say(f"resuming from '{start_from}' at step {step}")
    net, optimizer = accelerator.prepare(net, optimizer)
    if start_from is not None and accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    raw = accelerator.unwrap_model(net)

    if main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2), encoding="utf-8")
        if tb:
            accelerator.init_trackers("tb", config={k: str(v) for k, v in cfg.to_dict().items()})
        else:
            say("tensorboard is not installed; logging to log.csv only")
    log = _Log(run, step, main)
    cache = _Cache(backend, pool)
    device = accelerator.device
    emb_u1 = backend.uncond().float()  # (1,L,D)
    a_bar = backend.alphas_cumprod
    bar = progress_bar(cfg.steps, "translate-train", quiet=cfg.quiet or not main)
    bar.update(step)
    t0, images_done = time.time(), 0

    while step < cfg.steps:
        lam, w = lambda_id(step, cfg), guidance(step, cfg, w_end)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        stats = {"dds_grad_norm": 0.0, "id_mse": 0.0}
        for micro in range(cfg.grad_accum):
            rng = np.random.default_rng([cfg.seed, step, rank, micro])
            batch = table.sample(rng, cfg.batch_size)
            z_hat = torch.stack([cache.latent(i) for _, i, _ in batch]).to(device)  # (B,C,h,w)
            k = torch.tensor([kk for kk, _, _ in batch], device=device)  # (B,)
            emb_s = torch.stack([cache.prompt(pool.captions[i]) for _, i, _ in batch]).to(device)
            emb_t = torch.stack([cache.prompt(y) for _, _, y in batch]).to(device)  # (B,L,D)
            t, eps = _draw(rng, cfg, z_hat.shape)
            t, eps = t.to(device), eps.to(device)
            emb_u = emb_u1.expand(len(batch), -1, -1)
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(net) if not sync else contextlib.nullcontext()
            with ctx:
                z = net(z_hat, k).float()  # (B,C,h,w), one forward pass
                with torch.no_grad():
                    if cfg.score == "dds":
                        g = dds_grad(backend.predict_eps, z.detach(), z_hat, emb_u, emb_t, emb_s,
                                     t, eps, a_bar, w)
                    else:
                        g = sds_grad(backend.predict_eps, z.detach(), emb_u, emb_t, t, eps,
                                     a_bar, w)
                id_mse = (z - z_hat).pow(2).mean()
                loss = grad_to_loss(z, g) / z.numel() + lam * id_mse
                accelerator.backward(loss / cfg.grad_accum)
            stats["dds_grad_norm"] += float(g.flatten(1).norm(dim=1).mean()) / cfg.grad_accum
            stats["id_mse"] += float(id_mse.detach()) / cfg.grad_accum
        gnorm = accelerator.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        images_done += cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = time.time() - t0
            row = {"step": step, "images": images_done, "lr": cfg.lr, "guidance": round(w, 6),
                   "lambda_id": round(lam, 6), "dds_grad_norm": round(stats["dds_grad_norm"], 6),
                   "id_mse": f"{stats['id_mse']:.4g}",
                   "loss_id": f"{lam * stats['id_mse']:.4g}",
                   "grad_norm": round(float(gnorm), 6),
                   "images_per_s": round(images_done / max(dt, 1e-9), 3),
                   "seconds": round(dt, 2)}
            log.write(row)
            if tb:
                accelerator.log({k: float(v) for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(w=f"{w:.2f}", lam=f"{lam:.3f}", dds=f"{stats['dds_grad_norm']:.3f}")
        if main and cfg.val_images and (step % cfg.val_every == 0 or step == cfg.steps):
            grid = _val_grid(raw, cache, table, pool, device, cfg.val_images)
            from PIL import Image

            save_png(Image.fromarray(grid), run / "samples" / f"step-{step:07d}.png")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            if main:
                write_checkpoint(run, step, raw, netcfg, optimizer, accelerator.scaler,
                                 cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            if _hang_after is not None and step >= _hang_after:
                print(f"dds translate-train: hanging after step {step}", file=sys.stderr,
                      flush=True)
                time.sleep(3600)
    bar.close()
    if main:
        out = export_model(run, raw, netcfg, backend)
        say(f"done: {step} steps; the network is in '{out}'")
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
    p.add_argument("--score", choices=["dds", "sds"], default=d.score,
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
    p.add_argument("--debug-hang-after", type=int, help=argparse.SUPPRESS)  # for the kill test
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
        t_max=a.t_max, residual=not a.direct, mixed_precision=a.mixed_precision, seed=a.seed,
        checkpoint_every=a.checkpoint_every, keep_checkpoints=a.keep_checkpoints,
        val_every=a.val_every, val_images=a.val_images, log_every=a.log_every, resume=a.resume,
        device="cpu" if a.cpu else None, quiet=a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train(config_from_args(args), _hang_after=args.debug_hang_after)
    return 0


if __name__ == "__main__":
    from dds.console import configure_process as _quiet_libraries

    _quiet_libraries()
    try:
        sys.exit(main())
    except DDSError as e:
        print(f"dds translate-train: error: {e}", file=sys.stderr)
        sys.exit(2)
