"""Training of the built-in text-to-image latent diffusion model, and its export.

One seeded, resumable command trains the whole model on the procedural world (``dds.world``):

* stage 0 ("text", optional, ``text_pretrain_steps``): the ``CLIPTextModel`` learns, through
  linear heads on its token states that are then thrown away, to name every attribute a caption
  mentions (object count, shapes, colours, background, texture), so that every word the UNet
  must obey reaches it distinctly; with ``text_lr`` 0 the encoder then stays frozen, as in SD;
* stage 1 ("vae"): an ``AutoencoderKL`` 64x64x3 -> 16x16x4 (32x32x4 in the fourth preset),
  reconstruction loss (L1 + MSE on [-1, 1] images) plus a tiny KL term; afterwards its
  ``scaling_factor`` is set to 1/std of the latents of training scenes (Stable Diffusion's
  0.18215 plays the same role);
* stage 2 ("unet"): a ``UNet2DConditionModel`` (and the ``CLIPTextModel``, unless frozen)
  trained from scratch with the epsilon objective on Stable Diffusion 1.x's noise schedule,
  the VAE frozen, captions replaced by "" 10% of the time (classifier-free guidance), EMA weights exported.

Every random draw of a step comes from a generator seeded by (seed, stage, step) and scenes are
drawn by index from ``SceneDataset``, so a killed run resumes exactly where its last checkpoint
left it (checkpoints hold models, optimiser, EMA, step and RNG states, and are written
atomically). ``run_dir`` receives ``log.csv``, checkpoints and PNG sample grids; ``out_dir``
receives a complete diffusers ``StableDiffusionPipeline`` folder plus ``training.json``.

Command line: ``dds train-builtin --run-dir runs/builtin`` (also ``python -m dds.builtin.train``);
the model goes to ``RUN_DIR/model`` unless ``--out`` names another folder (the packaged model,
``src/dds/assets/builtin-model``, is replaced only when ``--out`` names it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dds.atomic import atomic_path, atomic_write_text
from dds.builtin import configs as C
from dds.errors import DDSError
from dds.eval.metrics import psnr
from dds.training.toolkit import EMA, CsvLog, save_state, staged_folder, warmup_cosine

# Ids seed each stage's random streams; the order is the order of the stages (log truncation).
STAGE_IDS = {"text": 5, "vae": 1, "unet": 2, "scale": 3, "eval": 4}
CPU = torch.device("cpu")
LOG_FIELDS = ["stage", "step", "loss", "lr", "seconds"]
JUDGE_FIELDS = ["stage", "step", "all_attributes", "objects", "object_shape", "object_color",
                "background", "texture", "seconds"]
# The fewest DDIM steps of a judge reading for which its backend traces the UNet (CPU).
TRACE_MIN_STEPS = 10
# The caption gap beside each judge reading (RUN/gap.csv, `dds.eval.caption_gap`): how much the
# shape and colour words lower the UNet's loss on the object's cells at these timesteps, x 1000,
# with 95% half-widths; it shows a word's use long before a judge can read it in a sample.
GAP_T = (300, 500, 700)
GAP_WORDS = ("shape", "colour")
GAP_FIELDS = ["stage", "step", *(f"{w}_{t}{ci}" for w in GAP_WORDS for t in GAP_T
                                 for ci in ("", "_ci"))]
# And the swap direction (RUN/swap.csv, `dds.eval.caption_gap.swap_directions`): the cosine of
# each word's change of prediction with the ideal change towards the re-rendered scene, and the
# share of it made, at the same timesteps; shape against the change averaged over the object's
# turns (all a caption can say where the noise hides the angle), colour against the exact one.
SWAP_REFERENCE = {"shape": "rotation-mean", "colour": "exact"}
SWAP_TURNS = 12
SWAP_MEASURES = {"cosine": "cos", "gain": "share"}
SWAP_FIELDS = ["stage", "step", *(f"{w}_{m}_{t}{ci}" for w in GAP_WORDS
                                  for m in SWAP_MEASURES.values() for t in GAP_T
                                  for ci in ("", "_ci"))]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _world():
    try:
        from dds.world import SceneDataset, collate_scenes
    except ImportError:  # the package re-exports them; fall back to the module itself
        from dds.world.scene import SceneDataset, collate_scenes
    return SceneDataset, collate_scenes


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one step (independent of resumption)."""
    s = (int(seed) * 1_000_003 + STAGE_IDS[stage] * 7_919 + int(step) * 104_729) % (2**62)
    return torch.Generator().manual_seed(s)


def data_seed(seed: int, stage: str) -> int:
    return int(seed) * 10 + STAGE_IDS[stage]


def batch_at(cfg: C.TrainConfig, stage: str, step: int, batch_size: int) -> dict[str, Any]:
    """Fresh scenes for ``step`` (item indices step*B .. step*B+B-1 of the stage's dataset)."""
    SceneDataset, collate_scenes = _world()
    ds = SceneDataset(2**40, seed=data_seed(cfg.seed, stage), size=cfg.image_size)
    return collate_scenes([ds[step * batch_size + j] for j in range(batch_size)])


def train_device(name: str = "auto") -> torch.device:
    """The device the autoencoder and UNet stages train on: ``auto`` takes CUDA when torch sees
    it, else the CPU (stage 0, a few minutes, always runs on the CPU)."""
    if name == "auto":
        from dds.models.diffusers_base import default_device

        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DDSError(f"--device {name} was asked for, but torch sees no CUDA device; "
                       "use --device cpu (or auto)")
    if not (name == "cpu" or name.startswith("cuda")):
        raise DDSError(f"--device '{name}' is not one of auto, cpu, cuda, cuda:N")
    return torch.device(name)


def default_workers(device: torch.device) -> int:
    """Scene-rendering processes when none are asked for: none on the CPU (they would share
    its cores with the training), up to 8 beside a GPU, leaving two cores to the trainer."""
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 2))


def device_name(device: torch.device) -> str:
    """What a training.json records as the machine: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} logical cores)"


class _StepData(torch.utils.data.Dataset):
    """Item i: the whole batch of rendered batch ``start + i`` (what ``batch_at`` renders)."""

    def __init__(self, cfg: C.TrainConfig, stage: str, batch_size: int, start: int, total: int):
        self.cfg, self.stage, self.bs, self.start, self.total = cfg, stage, batch_size, start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return batch_at(self.cfg, self.stage, self.start + i, self.bs)


class StepBatches:
    """A stage's batches in step order: rendered in place (``workers`` 0), or by ``workers``
    processes a few batches ahead, so that a GPU does not wait for the CPU's scene renderer.
    Each rendered batch serves ``reuse`` consecutive steps (each step still draws its own
    noise, timesteps and caption drops): step s gets exactly
    ``batch_at(cfg, stage, s // reuse, batch_size)``, however the batches were rendered."""

    PREFETCH = 4  # batches each worker process renders ahead

    def __init__(self, cfg: C.TrainConfig, stage: str, batch_size: int, total: int,
                 workers: int = 0, reuse: int = 1):
        if reuse < 1:
            raise DDSError(f"a rendered batch must serve at least one step, not {reuse}")
        self.cfg, self.stage, self.bs, self.workers, self.reuse = (
            cfg, stage, batch_size, workers, reuse)
        self.rendered = -(-total // reuse)  # batches the stage renders in all
        self._it, self._next, self._last = None, None, (None, None)

    def get(self, step: int) -> dict[str, Any]:
        index = step // self.reuse
        if self._last[0] == index:
            return self._last[1]
        if self.workers <= 0:
            batch = batch_at(self.cfg, self.stage, index, self.bs)
        else:
            if self._it is None or index != self._next:
                loader = torch.utils.data.DataLoader(
                    _StepData(self.cfg, self.stage, self.bs, index, self.rendered),
                    batch_size=None, shuffle=False, num_workers=self.workers,
                    prefetch_factor=self.PREFETCH, collate_fn=lambda b: b)
                self._it = iter(loader)
            self._next = index + 1
            batch = next(self._it)
        self._last = (index, batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes (they would otherwise render on, unread, until collected)."""
        self._it, self._next = None, None


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_states(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])


def to_pm1(img01: torch.Tensor) -> torch.Tensor:
    return img01 * 2.0 - 1.0


def save_grid(images01: torch.Tensor, path: Path, ncol: int, scale: int = 2) -> None:
    """Save (N,3,H,W) images in [0,1] as one PNG grid (nearest upscaling by ``scale``)."""
    from PIL import Image

    n, _, h, w = images01.shape
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + 2), ncol * (w + 2))
    for k in range(n):
        r, c = divmod(k, ncol)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = (
            images01[k].clamp(0, 1)
        )
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(arr)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp)


# --------------------------------------------------------------------------------------------
# Logs: log.csv (stage, step, loss, lr, seconds) and eval.csv (judge readings)
# --------------------------------------------------------------------------------------------


def loss_log(run_dir: Path) -> CsvLog:
    return CsvLog(run_dir / "log.csv", LOG_FIELDS)


def judge_log(run_dir: Path) -> CsvLog:
    return CsvLog(run_dir / "eval.csv", JUDGE_FIELDS)


def gap_log(run_dir: Path) -> CsvLog:
    return CsvLog(run_dir / "gap.csv", GAP_FIELDS)


def swap_log(run_dir: Path) -> CsvLog:
    return CsvLog(run_dir / "swap.csv", SWAP_FIELDS)


def truncate_after(log: CsvLog, stage: str, step: int) -> None:
    """Keep the rows of earlier stages and of `stage` up to `step` (a resume at `step`)."""
    order = list(STAGE_IDS)
    log.keep(lambda r: order.index(r["stage"]) < order.index(stage)
             or (r["stage"] == stage and int(r["step"]) <= step))


def drop_stage(log: CsvLog, stage: str) -> None:
    """Remove one stage's rows and keep the others (a stage redone from its start)."""
    log.keep(lambda r: r["stage"] != stage)


def loss_row(stage: str, step: int, loss: float, lr: float, seconds: float) -> dict:
    return {"stage": stage, "step": step, "loss": f"{loss:.6f}", "lr": f"{lr:.6g}",
            "seconds": f"{seconds:.1f}"}


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)


@dataclass
class StepBudget:
    """What one call of the trainer may still spend: optimisation steps (None: any number) and
    wall-clock time (a ``time.monotonic()`` deadline; None: no limit)."""

    steps: int | None = None
    deadline: float | None = None

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def spent(self) -> bool:
        return (self.steps is not None and self.steps <= 0) or self.out_of_time()

    def take(self) -> None:
        if self.steps is not None:
            self.steps -= 1


@dataclass
class Counter:
    """Where a stage is: optimisation steps done and seconds spent in them (checkpointed)."""

    step: int = 0
    seconds: float = 0.0


def run_steps(stage: str, total: int, at: Counter, cfg: C.TrainConfig, log: CsvLog, bar,
              budget: StepBudget, one_step: Callable[[int], tuple[torch.Tensor, float]],
              after: Callable[[int], None]) -> bool:
    """The loop every stage shares: ``one_step(step)`` (returns the loss and the learning rate
    to log) until ``total``, logging the mean loss every ``log_every`` steps and calling
    ``after(step)`` (checkpoints, samples) after each, while ``budget`` lasts; False when it
    ran out first."""
    acc, n_acc = 0.0, 0
    while at.step < total:
        if budget.spent():
            if bar:
                bar.close()
            return False
        t0 = time.perf_counter()
        loss, lr = one_step(at.step)
        at.step += 1
        at.seconds += time.perf_counter() - t0
        budget.take()
        acc, n_acc = acc + loss.detach().item(), n_acc + 1
        if at.step % cfg.log_every == 0 or at.step == total:
            log.write(loss_row(stage, at.step, acc / n_acc, lr, at.seconds))
            if bar:
                bar.set_postfix(loss=f"{acc / n_acc:.4f}", lr=f"{lr:.2e}")
            acc, n_acc = 0.0, 0
        if bar:
            bar.update(1)
        after(at.step)
    if bar:
        bar.close()
    return True


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_text(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """Exactly what ``StableDiffusionPipeline.encode_prompt`` computes (no attention mask)."""
    return text_encoder(tokenize(tokenizer, captions).to(module_device(text_encoder)))[0]


# --------------------------------------------------------------------------------------------
# Stage 0 (optional): the text encoder learns to say what a caption names
# --------------------------------------------------------------------------------------------


def caption_heads() -> dict[str, int]:
    """Classes per attribute a caption can name (slot 1 and the texture add 'none')."""
    from dds.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, TEXTURES

    return {"n_objects": 2, "shape0": len(SHAPES), "color0": len(COLOR_NAMES),
            "shape1": len(SHAPES) + 1, "color1": len(COLOR_NAMES) + 1,
            "background": len(BACKGROUND_NAMES), "texture": len(TEXTURES) + 1}


def caption_labels(captions: list[str]) -> torch.Tensor:
    """(B, len(caption_heads())) class indices of what each caption names ('none' = last)."""
    from dds.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, TEXTURES, parse_caption

    rows = []
    for text in captions:
        p = parse_caption(text)
        if p is None:
            raise DDSError(f"caption {text!r} matches none of the world's templates")
        objs = p["objects"]
        second = objs[1] if len(objs) > 1 else None
        rows.append([
            len(objs) - 1,
            SHAPES.index(objs[0]["shape"]),
            COLOR_NAMES.index(objs[0]["color"]),
            SHAPES.index(second["shape"]) if second else len(SHAPES),
            COLOR_NAMES.index(second["color"]) if second else len(COLOR_NAMES),
            BACKGROUND_NAMES.index(p["background"]),
            TEXTURES.index(p["texture"]) if p["texture"] else len(TEXTURES),
        ])
    return torch.tensor(rows, dtype=torch.long)


def captions_at(cfg: C.TrainConfig, stage: str, step: int, batch_size: int) -> list[str]:
    """Captions of scenes step*B .. step*B+B-1 of the stage's stream (drawn, not rendered)."""
    from dds.world import caption, sample_scene

    seed = data_seed(cfg.seed, stage)
    return [caption(sample_scene(np.random.default_rng([seed, step * batch_size + j])))
            for j in range(batch_size)]


def text_pretrain_loss(text_encoder, heads: torch.nn.Linear, tokenizer,
                       captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every named attribute, read linearly from the mean over the 77 token
    states that the UNet's cross-attention sees; returns (loss, per-caption all-correct)."""
    states = encode_text(text_encoder, tokenizer, captions).mean(dim=1)
    logits = heads(states)
    labels = caption_labels(captions)
    loss, correct, start = 0.0, torch.ones(len(captions), dtype=torch.bool), 0
    for j, n in enumerate(caption_heads().values()):
        part = logits[:, start:start + n]
        loss = loss + F.cross_entropy(part, labels[:, j])
        correct &= part.argmax(dim=1) == labels[:, j]
        start += n
    return loss, correct


def train_text(cfg: C.TrainConfig, run_dir: Path, tokenizer, resume: bool, progress: bool):
    """Stage 0: the text encoder learns to name every attribute of the captions (a minute).

    Trained jointly with the UNet from scratch, the encoder gave captions that differ only in
    the shape word states 13 times closer than captions that differ only in a colour word, and
    the UNet never learned shape words; this stage makes every named attribute linearly
    readable before the UNet starts. Returns (text_encoder, info), or (None, {}) when off."""
    if cfg.text_pretrain_steps <= 0:
        return None, {}
    path = run_dir / "text.pt"
    torch.manual_seed(cfg.seed + 1)
    text_encoder = C.build_text_encoder(cfg.text)
    if resume and path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=False)
        text_encoder.load_state_dict(ck["text_encoder"])
        return text_encoder, ck["info"]
    heads = torch.nn.Linear(cfg.text.hidden_size, sum(caption_heads().values()))
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, weight_decay=0.0)
    log = loss_log(run_dir)
    drop_stage(log, "text")
    total = cfg.text_pretrain_steps

    def one_step(s: int):  # s + 1: the 1-based step whose captions are drawn
        lr = cfg.text_pretrain_lr * warmup_cosine(s, total, 1.0, min(100, s + 1))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, _ = text_pretrain_loss(text_encoder, heads, tokenizer,
                                     captions_at(cfg, "text", s + 1, cfg.text_pretrain_batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        return loss, lr

    at = Counter()
    run_steps("text", total, at, cfg, log, _progress(total, 0, "text", progress), StepBudget(),
              one_step, lambda step: None)
    with torch.no_grad():
        held_out = captions_at(cfg, "eval", 0, 512)
        _, correct = text_pretrain_loss(text_encoder.eval(), heads, tokenizer, held_out)
    info = {"steps": total, "seconds": round(at.seconds, 1),
            "heldout_all_attributes": float(correct.float().mean())}
    save_state({"stage": "text", "config": cfg.to_dict(),
                "text_encoder": text_encoder.state_dict(), "info": info}, path)
    return text_encoder, info


# --------------------------------------------------------------------------------------------
# Stage 1: VAE
# --------------------------------------------------------------------------------------------


def vae_loss(vae, x01: torch.Tensor, kl_weight: float, generator: torch.Generator,
             w: torch.Tensor | None = None):
    """L1 + MSE on [-1, 1] images (each weighted by ``w``, (B,1,H,W), when given) + KL."""
    x = to_pm1(x01)
    post = vae.encode(x).latent_dist
    z = post.sample(generator=generator)
    rec = vae.decode(z).sample
    rec_loss = weighted_mean((rec - x).abs(), w) + weighted_mean((rec - x).square(), w)
    kl = post.kl().mean() / float(z[0].numel())
    return rec_loss + kl_weight * kl, rec


@torch.no_grad()
def vae_reconstruct(vae, x01: torch.Tensor) -> torch.Tensor:
    """Reconstructions of ``x01`` (on the CPU) by ``vae`` (wherever it is)."""
    z = vae.encode(to_pm1(x01.to(module_device(vae)))).latent_dist.mean
    return ((vae.decode(z).sample + 1.0) / 2.0).clamp(0, 1).cpu()


@torch.no_grad()
def vae_latent_std(vae, cfg: C.TrainConfig, n: int = 512, bs: int = 64) -> float:
    """Std of the latents (``latent_dist.mean``) of ``n`` training scenes."""
    zs = []
    for k in range(math.ceil(n / bs)):
        b = batch_at(cfg, "scale", k, bs)
        zs.append(vae.encode(to_pm1(b["image"].to(module_device(vae)))).latent_dist.mean.cpu())
    return float(torch.cat(zs)[:n].std())


@torch.no_grad()
def vae_eval_judge(vae, cfg: C.TrainConfig, n: int = 256, bs: int = 64) -> dict[str, float]:
    """The judge's accuracy per attribute on reconstructions of ``n`` held-out scenes: what the
    autoencoder lets through (a UNet cannot draw a shape that its decoder cannot show)."""
    from dds.world import Judge

    judge = Judge.load()
    scenes, recs = [], []
    for k in range(math.ceil(n / bs)):
        b = batch_at(cfg, "eval", k, bs)
        scenes += b["scene"]
        recs.append(vae_reconstruct(vae, b["image"]))
    acc = judge.attribute_accuracy(torch.cat(recs)[:n], scenes[:n])
    return {k: round(float(v), 4) for k, v in acc.items() if np.isfinite(v)}


@torch.no_grad()
def vae_eval_psnr(vae, cfg: C.TrainConfig, n: int = 256, bs: int = 64) -> float:
    """Mean PSNR (dB) of reconstructions of ``n`` held-out scenes."""
    vals = []
    for k in range(math.ceil(n / bs)):
        b = batch_at(cfg, "eval", k, bs)
        vals.append(psnr(vae_reconstruct(vae, b["image"]), b["image"]))
    return float(torch.cat(vals)[:n].mean())


def _vae_state(cfg, vae, opt, at: Counter, done: bool, info: dict) -> dict:
    return {"stage": "vae", "config": cfg.to_dict(), "model": vae.state_dict(),
            "optimizer": opt.state_dict(), "rng": rng_states(), "step": at.step,
            "seconds": at.seconds, "done": done, "info": info}


def _vae_info(vae, cfg: C.TrainConfig, at: Counter) -> dict:
    """The finished autoencoder's scaling factor and held-out readings."""
    std = vae_latent_std(vae, cfg, n=cfg.scale_images)
    return {
        "steps": at.step,
        "seconds": round(at.seconds, 1),
        "device": device_name(module_device(vae)),
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "heldout_psnr_db": vae_eval_psnr(vae, cfg, n=cfg.eval_images),
        "heldout_judge": vae_eval_judge(vae, cfg, n=cfg.eval_images),
    }


def train_vae(cfg: C.TrainConfig, run_dir: Path, resume: bool, progress: bool, budget: StepBudget,
              device: torch.device = CPU, workers: int = 0):
    """Stage 1 on ``device``. Returns (vae, info) once finished, or (None, info) when stopped
    early."""
    ckpt_path = run_dir / "vae.pt"
    log = loss_log(run_dir)
    torch.manual_seed(cfg.seed)
    vae = C.build_vae(cfg.vae).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    at, info = Counter(), {}
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])  # (moves the moments to the weights' device)
        set_rng_states(ck["rng"])
        at, info = Counter(ck["step"], ck["seconds"]), ck.get("info", {})
        if ck.get("done"):
            vae.register_to_config(scaling_factor=info["scaling_factor"])
            vae.eval().requires_grad_(False)
            return vae, info
        truncate_after(log, "vae", at.step)
    elif not resume:
        truncate_after(log, "vae", -1)

    batches = StepBatches(cfg, "vae", cfg.vae_batch_size, cfg.vae_steps, workers)

    def one_step(step: int):
        lr = warmup_cosine(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batches.get(step)
        w = (object_weights(batch["scene"], cfg.image_size, cfg.image_size,
                            cfg.vae_object_loss_weight).to(device)
             if cfg.vae_object_loss_weight else None)
        loss, _ = vae_loss(vae, batch["image"].to(device), cfg.vae_kl_weight,
                           step_generator(cfg.seed, "vae", step), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        return loss, lr

    fixed = batch_at(cfg, "eval", 10_000, 8)["image"]

    def after(step: int) -> None:
        if step % cfg.sample_every == 0 or step == cfg.vae_steps:
            vae.eval()
            rec = vae_reconstruct(vae, fixed)
            save_grid(torch.cat([fixed, rec]), run_dir / "samples" / f"vae_{step:06d}.png", ncol=8)
            vae.train()
        if step % cfg.ckpt_every == 0 and step < cfg.vae_steps:
            save_state(_vae_state(cfg, vae, opt, at, False, info), ckpt_path)

    vae.train()
    bar = _progress(cfg.vae_steps, at.step, "vae", progress)
    if not run_steps("vae", cfg.vae_steps, at, cfg, log, bar, budget, one_step, after):
        if budget.out_of_time():  # keep every step done: the next call resumes from here
            save_state(_vae_state(cfg, vae, opt, at, False, info), ckpt_path)
        return None, info
    vae.eval().requires_grad_(False)
    info = _vae_info(vae, cfg, at)
    vae.register_to_config(scaling_factor=info["scaling_factor"])
    save_state(_vae_state(cfg, vae, opt, at, True, info), ckpt_path)
    return vae, info


# --------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder
# --------------------------------------------------------------------------------------------


def object_weights(scenes, image_size: int, latent_size: int, weight: float) -> torch.Tensor:
    """(B,1,h,w) loss weights 1 + weight * (the objects' coverage of each latent cell)."""
    from dds.eval.caption_gap import object_cover

    return 1.0 + weight * object_cover(scenes, latent_size, image_size)


def timestep_weights(a_bar: torch.Tensor, kind: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights from alpha_bar at each sample's timestep (`TrainConfig`'s
    timestep_weighting): 1 ("none"), min(SNR, gamma) / SNR ("min-snr") or 1 / (1 + SNR)
    ("p2"), with SNR = a_bar / (1 - a_bar)."""
    snr = a_bar.double() / (1 - a_bar.double())
    if kind == "none":
        w = torch.ones_like(snr)
    elif kind == "min-snr":
        w = snr.clamp(max=gamma) / snr
    elif kind == "p2":
        w = 1 / (1 + snr)
    else:
        raise DDSError(f"timestep weighting {kind!r} is unknown; use one of "
                       + ", ".join(C.TIMESTEP_WEIGHTINGS))
    return w.float()


def weighted_mean(err: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """sum(w * err) / sum(w) over every element (w broadcast); the plain mean for None."""
    if w is None:
        return err.mean()
    w = w.expand_as(err)
    return (w * err).sum() / w.sum()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """mean(w * (pred - target)^2) / mean(w) over every element (w broadcast); plain MSE for None."""
    return weighted_mean((pred - target).square(), w)


def make_noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**C.SD_SCHEDULE, clip_sample=False, prediction_type="epsilon")


def make_export_scheduler():
    """Stable Diffusion v1's own scheduler configuration (PNDM, PLMS steps)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        **C.SD_SCHEDULE,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


@torch.no_grad()
def ddim_sample(
    unet,
    text_encoder,
    tokenizer,
    vae,
    captions: list[str],
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
) -> torch.Tensor:
    """Quick classifier-free-guided DDIM samples (N,3,64,64) in [0,1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        **C.SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    sched.set_timesteps(steps)
    n = len(captions)
    cond = encode_text(text_encoder, tokenizer, captions)
    uncond = encode_text(text_encoder, tokenizer, [""] * n)
    ctx = torch.cat([uncond, cond])
    h = unet.config.sample_size
    lat = torch.randn(
        n, unet.config.in_channels, h, h, generator=torch.Generator().manual_seed(seed)
    ).to(module_device(unet))
    for t in sched.timesteps:
        eps = unet(torch.cat([lat, lat]), t, ctx).sample
        eu, ec = eps.chunk(2)
        lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
    img = vae.decode((lat / vae.config.scaling_factor).to(module_device(vae))).sample
    return ((img + 1.0) / 2.0).clamp(0, 1).cpu()


def judge_reading(cfg: C.TrainConfig, model_dir: Path, vae, unet, text_encoder, tokenizer,
                  device: torch.device = CPU) -> tuple[dict, dict, dict]:
    """Export (unet, text_encoder) with ``vae`` to ``model_dir`` and measure, through the stock
    backend, how often the judge reads back every attribute of held-out single-object prompts
    (the first ``cfg.judge_prompts`` of ``dds eval builtin-quality``'s generation prompts), and
    the caption gap and the swap direction of the shape and colour words on twice as many
    held-out scenes."""
    from dds.eval.builtin_quality import eval_generation
    from dds.models.stable_diffusion import StableDiffusionModel
    from dds.world import Judge

    export_pipeline_folder(model_dir, vae, unet, text_encoder, tokenizer)
    # A trace costs seconds per input shape whatever the UNet's width: it pays over a reading of
    # many denoising steps and is pure cost over a few (the tests' tiny recipe).
    trace = "auto" if cfg.judge_steps >= TRACE_MIN_STEPS else False
    backend = StableDiffusionModel(model_dir, device=str(device), trace=trace)
    r = eval_generation(backend, Judge.load(), cfg.judge_prompts, 1, cfg.judge_steps,
                        batch_size=min(50, cfg.judge_prompts), quiet=True)
    r.pop("samples")
    n = 2 * cfg.judge_prompts
    return r, gap_reading(backend, n), swap_reading(backend, n)


def gap_reading(backend, n: int, seed: int = 10_000) -> dict[str, float]:
    """`GAP_FIELDS`' values: the object cells' caption gap of each of `GAP_WORDS` at `GAP_T`."""
    from dds.eval.caption_gap import caption_gaps, gap_scenes

    scenes, captions = gap_scenes(n, seed)
    rows = caption_gaps(backend, scenes, {k: captions[k] for k in ("own", *GAP_WORDS)}, GAP_T,
                        seed)
    return {f"{w}_{r['t']}{ci}": r[w][key] for r in rows if r["region"] == "object"
            for w in GAP_WORDS for ci, key in (("", "gap_x1000"), ("_ci", "ci95"))}


def swap_reading(backend, n: int, seed: int = 10_000) -> dict[str, float]:
    """`SWAP_FIELDS`' values: each of `GAP_WORDS`' swap direction at `GAP_T` against its
    `SWAP_REFERENCE`, on the caption gap's scenes and noise."""
    from dds.eval.caption_gap import gap_edits, swap_directions

    _, edits = gap_edits(n, seed)
    rows = swap_directions(backend, {w: edits[w] for w in GAP_WORDS}, GAP_T, seed,
                           turns=SWAP_TURNS)
    return {f"{r['word']}_{name}_{r['t']}{ci}": r[k][key]
            for r in rows if r["reference"] == SWAP_REFERENCE[r["word"]]
            for k, name in SWAP_MEASURES.items() for ci, key in (("", "mean"), ("_ci", "ci95"))}


class _UNetStage:
    """Stage 2's models, optimiser, EMA and counters, and what one step and a checkpoint do."""

    def __init__(self, cfg: C.TrainConfig, run_dir: Path, vae, tokenizer, pretrained_text=None,
                 device: torch.device = CPU, workers: int = 0):
        self.cfg, self.run_dir, self.vae, self.tokenizer = cfg, run_dir, vae, tokenizer
        self.device = device
        self.batches = StepBatches(cfg, "unet", cfg.batch_size, cfg.unet_steps, workers,
                                   cfg.batch_reuse)
        self.ckpt_path = run_dir / "unet.pt"
        self.log, self.judged, self.gaps = loss_log(run_dir), judge_log(run_dir), gap_log(run_dir)
        self.swaps = swap_log(run_dir)
        torch.manual_seed(cfg.seed + 1)
        self.text_encoder = C.build_text_encoder(cfg.text)
        self.unet = C.build_unet(cfg.unet, cross_attention_dim=cfg.text.hidden_size)
        if pretrained_text is not None:
            self.text_encoder.load_state_dict(pretrained_text.state_dict())
        self.unet.to(device)
        self.text_encoder.to(device)
        self.text_frozen = cfg.text_lr == 0
        self.text_encoder.requires_grad_(not self.text_frozen)
        self.modules = {"unet": self.unet, "text_encoder": self.text_encoder}
        groups = [{"params": list(self.unet.parameters()), "base_lr": cfg.unet_lr}]
        if not self.text_frozen:
            groups.append({"params": list(self.text_encoder.parameters()),
                           "base_lr": cfg.text_lr})
        self.trained = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.modules, cfg.ema_decay)
        self.at, self.ema_updates = Counter(), 0
        self.noise_sched = make_noise_scheduler()
        self.sf = float(vae.config.scaling_factor)

    def resume(self, resume: bool) -> None:
        """Continue from unet.pt when asked and present; drop the log rows the run will redo."""
        done = -1  # no step kept: the stage starts over
        if resume and self.ckpt_path.exists():
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
            self.unet.load_state_dict(ck["unet"])
            self.text_encoder.load_state_dict(ck["text_encoder"])
            self.opt.load_state_dict(ck["optimizer"])
            self.ema.load_state_dict(ck["ema"])
            self.ema.to(self.device)
            set_rng_states(ck["rng"])
            self.at, self.ema_updates = Counter(ck["step"], ck["seconds"]), ck["ema_updates"]
            done = self.at.step
        truncate_after(self.log, "unet", done)
        truncate_after(self.judged, "unet", done)
        truncate_after(self.gaps, "unet", done)
        truncate_after(self.swaps, "unet", done)

    def save(self) -> None:
        save_state({"stage": "unet", "config": self.cfg.to_dict(), "unet": self.unet.state_dict(),
                    "text_encoder": self.text_encoder.state_dict(),
                    "optimizer": self.opt.state_dict(), "ema": self.ema.state_dict(),
                    "ema_updates": self.ema_updates, "rng": rng_states(), "step": self.at.step,
                    "seconds": self.at.seconds,
                    "vae_scaling_factor": self.vae.config.scaling_factor}, self.ckpt_path)

    def loss(self, step: int) -> torch.Tensor:
        """The epsilon objective on step's batch (its noise, timesteps and caption drops),
        weighted by object cover and timestep as the config says."""
        cfg = self.cfg
        g_step = step_generator(cfg.seed, "unet", step)
        batch = self.batches.get(step)
        bs = len(batch["caption"])
        dev = self.device
        with torch.no_grad():
            lat = self.vae.encode(to_pm1(batch["image"].to(dev))).latent_dist.sample(
                generator=g_step)
            lat = lat * self.sf
        drop = torch.rand(bs, generator=g_step) < cfg.cfg_drop
        caps = ["" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)]
        noise = torch.randn(lat.shape, generator=g_step)
        ts = torch.randint(0, self.noise_sched.config.num_train_timesteps, (bs,), generator=g_step)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn(
                (bs, lat.shape[1], 1, 1), generator=g_step)
        noise, ts = noise.to(dev), ts.to(dev)
        noisy = self.noise_sched.add_noise(lat, noise, ts)
        # On a GPU the networks run under bf16 autocast (fp32 weights, optimiser and loss).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.set_grad_enabled(not self.text_frozen):
                ctx = encode_text(self.text_encoder, self.tokenizer, caps)
            pred = self.unet(noisy, ts, ctx).sample.float()
        w = (object_weights(batch["scene"], cfg.image_size, lat.shape[-1],
                            cfg.object_loss_weight).to(dev)
             if cfg.object_loss_weight else None)
        if cfg.timestep_weighting != "none":
            wt = timestep_weights(self.noise_sched.alphas_cumprod.to(dev)[ts],
                                  cfg.timestep_weighting, cfg.snr_gamma).view(-1, 1, 1, 1)
            w = wt if w is None else w * wt
        return weighted_mse(pred, noise, w)

    def one_step(self, step: int):
        cfg = self.cfg
        lr_scale = warmup_cosine(step, cfg.unet_steps, 1.0, cfg.unet_warmup)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        loss = self.loss(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, cfg.grad_clip)
        self.opt.step()
        if step + 1 >= cfg.ema_start:
            self.ema.update(self.modules, self.ema_updates)
            self.ema_updates += 1
        else:  # before EMA starts, the shadow simply follows the weights
            self.ema.copy_from(self.modules)
        return loss, cfg.unet_lr * lr_scale

    def ema_models(self, device: torch.device = CPU):
        u = C.build_unet(self.cfg.unet, cross_attention_dim=self.cfg.text.hidden_size)
        t = C.build_text_encoder(self.cfg.text)
        u.load_state_dict(self.ema.shadow["unet"])
        t.load_state_dict(self.ema.shadow["text_encoder"])
        return u.to(device).eval(), t.to(device).eval()

    def sample_grid(self, step: int) -> None:
        u, t = self.ema_models(self.device)
        caps = list(self.cfg.sample_captions)
        imgs = [ddim_sample(u, t, self.tokenizer, self.vae, caps, steps=self.cfg.sample_steps,
                            seed=s) for s in range(2)]
        save_grid(torch.cat(imgs), self.run_dir / "samples" / f"unet_{step:06d}.png",
                  ncol=len(caps))

    def judge_row(self, step: int) -> dict:
        u, t = self.ema_models()
        r, gaps, swaps = judge_reading(self.cfg, self.run_dir / "latest-model",
                                       copy.deepcopy(self.vae).cpu(), u, t, self.tokenizer,
                                       self.device)
        self.judged.write({"stage": "unet", "step": step, "seconds": f"{self.at.seconds:.1f}",
                           **{k: "" if r[k] is None else f"{r[k]:.4f}"
                              for k in JUDGE_FIELDS[2:-1]}})
        self.gaps.write({"stage": "unet", "step": step, **{k: f"{v:.3f}" for k, v in gaps.items()}})
        self.swaps.write({"stage": "unet", "step": step,
                          **{k: f"{v:.4f}" for k, v in swaps.items()}})
        return {**r, "gaps": gaps, "swaps": swaps}

    def after(self, step: int, bar) -> None:
        cfg = self.cfg
        last = step == cfg.unet_steps
        if step % cfg.ckpt_every == 0 or last:
            self.save()
        if step % cfg.sample_every == 0 or last:
            self.sample_grid(step)
        if cfg.judge_every and (step % cfg.judge_every == 0 or last):
            reading = self.judge_row(step)
            if bar:
                bar.write(f"step {step}: judge agrees with every attribute of "
                          f"{reading['all_attributes']:.0%} of {reading['n']} prompts "
                          f"(object shape {reading['object_shape']:.0%}, "
                          f"colour {reading['object_color']:.0%}); caption gap at t = 500, "
                          f"shape {reading['gaps']['shape_500']:+.2f}, "
                          f"colour {reading['gaps']['colour_500']:+.2f}; shape word's swap "
                          f"direction at t = 700, cosine {reading['swaps']['shape_cos_700']:+.2f}")

    def info(self) -> dict:
        rows = [r for r in self.log.rows() if r["stage"] == "unet"]
        tail = [float(r["loss"]) for r in rows[-20:]]
        info = {"steps": self.at.step, "seconds": round(self.at.seconds, 1),
                "final_loss": sum(tail) / max(1, len(tail)), "ema_updates": self.ema_updates,
                "device": device_name(self.device)}
        readings = [r for r in self.judged.rows() if r["stage"] == "unet"]
        if readings:
            info["judge_final"] = {k: v for k, v in readings[-1].items() if k != "stage"}
        for key, log in (("caption_gap_final", self.gaps), ("swap_direction_final", self.swaps)):
            kept = [r for r in log.rows() if r["stage"] == "unet"]
            if kept:
                info[key] = {k: v for k, v in kept[-1].items() if k != "stage"}
        return info


def train_unet(
    cfg: C.TrainConfig, run_dir: Path, vae, tokenizer, resume: bool, progress: bool,
    budget: StepBudget, pretrained_text=None, device: torch.device = CPU, workers: int = 0,
):
    """Stage 2. Returns (unet_ema, text_ema, info), or (None, None, info) when the step budget
    ran out first; when the time ran out, the step reached is checkpointed and its EMA weights
    returned, with ``info["stopped_at"]`` (the run resumes from that checkpoint).

    `pretrained_text`: stage 0's encoder to start from (else a fresh one); with text_lr 0 it
    stays frozen."""
    st = _UNetStage(cfg, run_dir, vae, tokenizer, pretrained_text, device, workers)
    st.resume(resume)
    bar = _progress(cfg.unet_steps, st.at.step, "unet", progress)
    st.unet.train()
    st.text_encoder.train(not st.text_frozen)
    if not run_steps("unet", cfg.unet_steps, st.at, cfg, st.log, bar, budget, st.one_step,
                     lambda step: st.after(step, bar)):
        if not budget.out_of_time() or st.at.step == 0:
            return None, None, {}
        st.save()
        u, t = st.ema_models()
        return u, t, {**st.info(), "stopped_at": f"step {st.at.step} of {cfg.unet_steps} "
                      "(time limit; the same command resumes)"}
    u, t = st.ema_models()
    return u, t, st.info()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_pipeline_folder(
    out_dir: str | os.PathLike,
    vae,
    unet,
    text_encoder,
    tokenizer,
    training: dict | None = None,
    storage: str = "fp32",
) -> Path:
    """Write a complete diffusers ``StableDiffusionPipeline`` folder (fp32 safetensors, or
    with ``storage="fp16"`` the same weights rounded to half precision: `store_half`).

    The folder is assembled beside ``out_dir``, flushed to disk and swapped in at the end, so a
    reader never sees a half-written model (``dds.training.toolkit.staged_folder``; no manifest:
    the folder stays a stock diffusers folder). ``training`` (if given) is written as
    ``training.json``.
    """
    from diffusers import StableDiffusionPipeline

    from dds.tokenizer import write_vocab_files

    pipe = StableDiffusionPipeline(
        vae=vae.float().eval(),
        text_encoder=text_encoder.float().eval(),
        tokenizer=tokenizer,
        unet=unet.float().eval(),
        scheduler=make_export_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with staged_folder(out_dir, manifest=False) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Also the classic vocab.json / merges.txt, for transformers releases whose
        # CLIPTokenizer does not read tokenizer.json.
        write_vocab_files(tmp / "tokenizer")
        if storage not in ("fp32", "fp16"):
            raise DDSError(f"storage '{storage}' is not one of fp32, fp16")
        if storage == "fp16":
            store_half(tmp)
        if training is not None:
            (tmp / "training.json").write_text(
                json.dumps(training, indent=2, default=str) + "\n", encoding="utf-8"
            )
    return Path(out_dir)


def store_half(folder: Path) -> None:
    """Rewrite every safetensors file under `folder` with its float tensors in float16.

    The configs are left as written (float32), so diffusers and transformers build float32
    modules and upcast the stored weights: the folder loads anywhere as before, at half the
    size, with each weight rounded to float16 (about 3 significant digits)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(half, path, metadata=meta)


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6


# --------------------------------------------------------------------------------------------
# Seeding a run from an exported model
# --------------------------------------------------------------------------------------------


def seed_from_model(cfg: C.TrainConfig, run_dir: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """Write the finished stage-0 and stage-1 checkpoints (text.pt, vae.pt) of `run_dir` from
    an exported model folder's text encoder and autoencoder, so that a run trains only its
    UNet on them (a UNet recipe measured on a released model's encoder and autoencoder, which
    the folder keeps when its run folder is gone).  A checkpoint already there is kept (the run
    resumes).  Returns the files written.  Both networks must have the config's architecture."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    run_dir, folder = Path(run_dir), Path(folder)
    if not (folder / "model_index.json").is_file():
        raise DDSError(f"--from-model '{folder}' is not an exported model folder (no "
                       "model_index.json); give a folder that `dds train-builtin` wrote")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = json.loads((folder / "training.json").read_text(encoding="utf-8")) \
        if (folder / "training.json").is_file() else {}
    written = []
    if cfg.text_pretrain_steps > 0 and not (run_dir / "text.pt").exists():
        text = C.build_text_encoder(cfg.text)
        _load_same(text, CLIPTextModel.from_pretrained(folder / "text_encoder"), folder, "text encoder")
        info = {**record.get("text", {}), "seeded_from": str(folder)}
        save_state({"stage": "text", "config": cfg.to_dict(), "text_encoder": text.state_dict(),
                    "info": info}, run_dir / "text.pt")
        written.append("text.pt")
    if not (run_dir / "vae.pt").exists():
        src = AutoencoderKL.from_pretrained(folder / "vae")
        vae = C.build_vae(cfg.vae)
        _load_same(vae, src, folder, "autoencoder")
        info = {**record.get("vae", {}), "scaling_factor": float(src.config.scaling_factor),
                "seeded_from": str(folder)}
        if "heldout_psnr_db" not in info:  # a folder without its training record
            info["heldout_psnr_db"] = vae_eval_psnr(vae.eval(), cfg, n=cfg.eval_images)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        at = Counter(cfg.vae_steps, float(record.get("vae", {}).get("seconds", 0.0)))
        save_state(_vae_state(cfg, vae, opt, at, True, info), run_dir / "vae.pt")
        written.append("vae.pt")
    return written


def _load_same(dst: torch.nn.Module, src: torch.nn.Module, folder: Path, what: str) -> None:
    """dst's weights from src, in float32; a different architecture is one sentence."""
    have, want = src.state_dict(), dst.state_dict()
    if have.keys() != want.keys() or any(have[k].shape != want[k].shape for k in want):
        raise DDSError(f"the {what} of '{folder}' is not the architecture of this recipe; "
                       "give the --preset (or --tiny) that the folder was trained with")
    dst.load_state_dict({k: v.float() for k, v in have.items()})


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def _check_config(run_dir: Path, cfg: C.TrainConfig, resume: bool) -> None:
    path = run_dir / "config.json"
    if resume and path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        arch = ("seed", "vae", "unet", "text", "image_size", "vae_batch_size", "batch_size")
        mismatch = [k for k in arch if old.get(k) != json.loads(json.dumps(cfg.to_dict()))[k]]
        if mismatch:
            raise DDSError(
                f"the run folder {run_dir} holds a run with a different {', '.join(mismatch)}; "
                "use another --run-dir or pass --no-resume to start over"
            )
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def export_dir(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None) -> Path:
    """Where the trained model goes: ``out_dir`` when given, else ``run_dir/model`` (never the
    installed package unless the user names that folder)."""
    return Path(out_dir) if out_dir is not None else Path(run_dir) / "model"


def train_builtin(
    cfg: C.TrainConfig,
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    *,
    stop_after: int | None = None,
    time_limit: float | None = None,
    command: str | None = None,
    device: str = "cpu",
    workers: int | None = None,
) -> dict:
    """Train (or resume) the built-in model and export it to ``out_dir`` (default:
    ``run_dir/model``; the packaged model is replaced only when ``out_dir`` names it).

    ``device`` (``auto``, ``cpu``, ``cuda``): where the autoencoder and UNet stages train (the
    CPU reproduces a run bit for bit; a GPU rounds differently, under bf16 autocast).
    ``workers``: processes that render scenes ahead of the steps (None: none on the CPU, where
    the two cores are busy training, and up to 8 beside a GPU).

    ``stop_after`` stops after that many autoencoder and UNet optimisation steps in this call
    (as if the run had been killed after its last checkpoint; stage 0, a few minutes, always
    runs to its end); the return value then has ``"finished": False``.  ``time_limit``
    (seconds of this call) stops at the first step boundary past it, checkpointing there; in
    the UNet stage the EMA weights of that step are exported as a complete folder all the
    same (``"finished": False``, ``training.json``'s ``unet.stopped_at`` says where), so a
    timed run always leaves a usable model and resumes with the same command.  Torch's thread count
    is the caller's: the command line sets ``cfg.threads`` once for the whole run.
    """

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = export_dir(run_dir, out_dir)
    if not resume:
        for name in ("text.pt", "vae.pt", "unet.pt", "log.csv"):
            if (run_dir / name).exists():
                (run_dir / name).unlink()
    _check_config(run_dir, cfg, resume)
    dev = train_device(device)
    if dev.type == "cuda":  # fixed shapes: let cuDNN pick its fastest kernels; TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if workers is None:
        workers = default_workers(dev)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    return _train_builtin(cfg, run_dir, out_dir, resume, progress,
                          StepBudget(stop_after, deadline), command, dev, workers)


def _train_builtin(
    cfg: C.TrainConfig,
    run_dir: Path,
    out_dir: Path,
    resume: bool,
    progress: bool,
    budget: StepBudget,
    command: str | None,
    device: torch.device,
    workers: int,
) -> dict:
    from dds.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    t_start = time.time()

    pretrained_text, text_info = train_text(cfg, run_dir, tokenizer, resume, progress)
    vae, vae_info = train_vae(cfg, run_dir, resume, progress, budget, device, workers)
    if vae is None:
        return {"finished": False, "stage": "vae"}
    unet, text_encoder, unet_info = train_unet(
        cfg, run_dir, vae, tokenizer, resume, progress, budget, pretrained_text, device, workers
    )
    if unet is None:
        return {"finished": False, "stage": "unet"}
    vae = vae.cpu()

    training = {
        "command": command or "python -m dds.builtin.train",
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        **({"text": text_info} if text_info else {}),
        "vae": vae_info,
        "unet": unet_info,
        "params": {
            "vae": C.count_params(vae),
            "unet": C.count_params(unet),
            "text_encoder": C.count_params(text_encoder),
        },
        "scaling_factor": vae.config.scaling_factor,
        "noise_schedule": C.SD_SCHEDULE,
        "exported_weights": "EMA of the UNet and text encoder",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
        },
        "threads": torch.get_num_threads(),  # the run's (the command line sets cfg.threads)
        # Where this call trained (a resumed run's earlier stages may have run elsewhere: the
        # autoencoder's own record is vae.device).
        "device": device_name(device),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds_this_call": round(time.time() - t_start, 1),
    }
    training["storage"] = cfg.storage
    export_pipeline_folder(out_dir, vae, unet, text_encoder, tokenizer, training, cfg.storage)
    training["size_mb"] = round(folder_size_mb(out_dir), 2)
    atomic_write_text(out_dir / "training.json", json.dumps(training, indent=2, default=str) + "\n")
    atomic_write_text(run_dir / "training.json", json.dumps(training, indent=2, default=str) + "\n")
    return {"finished": "stopped_at" not in unet_info, "out_dir": str(out_dir), **training}


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from dds.console import Parser

    p = Parser(
        prog="dds train-builtin",
        description="Train the built-in text-to-image model on the procedural world and export "
        "it as a diffusers Stable Diffusion folder (resumable; seeded).",
    )
    p.add_argument("--run-dir", default="runs/builtin", help="checkpoints, log.csv, samples")
    p.add_argument("--out", default=None,
                   help="exported model folder (default: RUN_DIR/model; name "
                   "src/dds/assets/builtin-model to replace the packaged model)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="UNet-stage batch size")
    p.add_argument("--batch-reuse", type=int, default=None,
                   help="UNet steps each rendered batch of scenes serves, each with fresh noise "
                   "and timesteps (default 1: fresh scenes every step; more when the scene "
                   "renderer, not the GPU, limits the steps a second)")
    p.add_argument("--offset-noise", type=float, default=None,
                   help="std of the per-channel constant added to the UNet's training noise")
    p.add_argument("--object-loss-weight", type=float, default=None,
                   help="extra loss weight of the latent cells objects cover (0: plain mean)")
    p.add_argument("--timestep-weighting", choices=C.TIMESTEP_WEIGHTINGS, default=None,
                   help="weight each sample's UNet loss by its noise level: none (the plain "
                   "epsilon objective), min-snr (min(SNR, --snr-gamma)/SNR), p2 (1/(1+SNR): "
                   "more weight where coarse content such as shape is decided)")
    p.add_argument("--snr-gamma", type=float, default=None, help="min-snr's cap (default 5)")
    p.add_argument("--text-pretrain-steps", type=int, default=None,
                   help="steps of stage 0, where the text encoder learns to name each caption's "
                   "attributes before the UNet starts (0: none)")
    p.add_argument("--text-lr", type=float, default=None,
                   help="the text encoder's learning rate in the UNet stage (0: frozen)")
    p.add_argument("--vae-object-loss-weight", type=float, default=None,
                   help="extra weight of object pixels in the autoencoder's loss (0: plain)")
    p.add_argument("--attention-grids", default=None, metavar="SIDES",
                   help="comma list of the latent grid sides whose UNet levels have "
                   "cross-attention, down and up alike (fourth: 8,4; 16,8,4 adds the 16x16 "
                   "level)")
    p.add_argument("--judge-every", type=int, default=None,
                   help="judge-read generation accuracy every N UNet steps (eval.csv; 0: off)")
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="third",
                   help="the recipe the other options change (third: 16x16 latent; fourth: the "
                   "shipped model's, 32x32 latent, docs/builtin-model-4.md)")
    p.add_argument("--tiny", action="store_true", help="tiny test-size model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, set once for the whole run (default 2)")
    p.add_argument("--device", default="auto",
                   help="where the autoencoder and UNet train: auto (CUDA when present), cpu, "
                   "cuda, cuda:N (the CPU reproduces a run bit for bit)")
    p.add_argument("--data-workers", type=int, default=None,
                   help="processes rendering scenes ahead of the steps (default: 0 on the CPU, "
                   "up to 8 beside a GPU)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop at the first step past this many seconds, checkpointed; in the "
                   "UNet stage the model reached is exported all the same (the same command "
                   "resumes)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring checkpoints")
    p.add_argument("--from-model", metavar="FOLDER",
                   help="take the text encoder and autoencoder of this exported model (e.g. "
                   "the shipped one) as the run's finished stages 0 and 1, so that only the "
                   "UNet trains")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args) -> C.TrainConfig:
    """The run's config: the tiny recipe or the named preset, with the options given."""
    if args.time_limit is not None and args.time_limit <= 0:
        raise DDSError(f"--time-limit {args.time_limit:g}: give a positive number of seconds")
    if args.batch_reuse is not None and args.batch_reuse < 1:
        raise DDSError(f"--batch-reuse {args.batch_reuse}: each rendered batch must serve at "
                       "least one step; give 1 or more")
    cfg = C.tiny() if args.tiny else C.PRESETS[getattr(args, "preset", "third")]()
    if getattr(args, "attention_grids", None):
        what = f"--attention-grids {args.attention_grids}"
        try:
            grids = tuple(int(g) for g in args.attention_grids.split(","))
        except ValueError:
            raise DDSError(f"{what}: give whole numbers such as 16,8,4") from None
        try:
            cfg = replace(cfg, unet=C.with_attention_grids(cfg.unet, grids))
        except ValueError as e:
            raise DDSError(f"{what}: {e}") from None
    return C.with_overrides(
        cfg,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        batch_reuse=args.batch_reuse,
        threads=args.threads,
        offset_noise=args.offset_noise,
        judge_every=args.judge_every,
        object_loss_weight=args.object_loss_weight,
        timestep_weighting=args.timestep_weighting,
        snr_gamma=args.snr_gamma,
        text_pretrain_steps=args.text_pretrain_steps,
        text_lr=args.text_lr,
        vae_object_loss_weight=args.vae_object_loss_weight,
    )


def main(argv: list[str] | None = None) -> int:
    """The entry point: `dds train-builtin ...` or `python -m dds.builtin.train ...`."""
    from dds.console import configure_process

    configure_process()
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    # The thread count is part of the recipe (CPU kernels round differently with another one),
    # so the entry point sets it once for the whole run.
    torch.set_num_threads(max(1, int(cfg.threads)))
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = "dds train-builtin " + " ".join(argv_used)
    if args.from_model and not args.no_resume:
        for name in seed_from_model(cfg, args.run_dir, args.from_model):
            print(f"{name}: from '{args.from_model}'")
    elif args.from_model:
        raise DDSError("--from-model seeds a run's first stages and --no-resume would delete "
                       "them; drop one of the two")
    res = train_builtin(
        cfg,
        args.run_dir,
        args.out,
        resume=not args.no_resume,
        progress=not args.quiet,
        command=command.strip(),
        time_limit=args.time_limit,
        device=args.device,
        workers=args.data_workers,
    )
    if "out_dir" in res and not res["finished"]:
        print(f"time limit: exported {res['out_dir']} ({res['size_mb']} MB) at "
              f"{res['unet']['stopped_at']}")
    elif res.get("finished"):
        print(
            f"exported {res['out_dir']} ({res['size_mb']} MB); "
            f"VAE PSNR {res['vae']['heldout_psnr_db']:.2f} dB, "
            f"scaling factor {res['scaling_factor']:.5f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DDSError as e:
        print(f"dds train-builtin: error: {e}", file=sys.stderr)
        sys.exit(2)
