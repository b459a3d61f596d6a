"""Time one DDS edit three ways, on one machine and one model shape, in one run.

  reference  the reference recipe's loop, transcribed independently of `dds` (fp32 weights, the
             UNet under fp16 autocast on CUDA / plain fp32 on CPU, a UNet batch of 4 built with
             cat([z_t] * 2) and embeddings [uncond, uncond, source, target], the surrogate
             loss (z_target * grad).sum() / (h * w), (2000 * loss).backward(), SGD lr 0.1)
  default    `dds.loop.edit_latents` with the model's default precision (fp16 on CUDA, fp32 on
             CPU, as `dds.models.load_model(dtype="auto")` chooses)
  fast       `dds.fast.FastEditor` with its defaults (or the --precision/--compile/--cuda-graphs
             given here)

each for one edit and for --batch edits at once.  All paths make the same edit: the same seeds
give the same t and eps draws, and every path uses the recipe's numbers (guidance 7.5, lr 0.1,
loss scale 2000 divided by the latent's own h * w), so the final latents are compared with the
reference's.  The model's own recommended edit settings are deliberately not applied.

Every path loads the model folder through `dds.models.load_model` (the reference path reads its
UNet, schedule and prompt embeddings from that model, then runs its own arithmetic).  Without a
folder, one is written first: SD1.5's UNet (or the built-in model's) with random weights, since
the cost of an edit does not depend on them.

--model sdxl, sd3 or flux: the released architecture of SDXL base 1.0's UNet, SD3 medium's
transformer or FLUX.1-dev's transformer, and the released autoencoder, from their public configs
(`family_configs.py`), with random weights and one-layer text encoders of the released widths
(they run once per edit, outside the timed loop), written as a diffusers folder and loaded
through `dds.models.registry.load_model`.  Each method (DDS; FlowEdit too for SD3 and FLUX.1)
is timed for a few --steps on the straightforward loop (`default`: `dds.loop.edit_latents`;
for SDXL's DDS also `reference`, the recipe's loop with SDXL's added conditioning) and on the
fast path, and the time of a whole edit is extrapolated to the method's default steps.  A run
that will not fit the device's memory is refused before anything is allocated; --layers N
builds a truncated denoiser for smoke runs, labelled TRUNCATED in the output.

Usage (see docs/speed.md):
  python benchmarks/bench_edit.py                          # CPU: the built-in model
  python benchmarks/bench_edit.py --device cuda            # GPU: SD1.5-shaped UNet, random weights
  python benchmarks/bench_edit.py --device cuda --model path/to/sd15 --json out.json
  python benchmarks/bench_edit.py --device cuda --model flux --steps 5 --json flux.json
  python benchmarks/bench_edit.py --device cpu --model sd3 --layers 2 --size 256 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

# Stable Diffusion 1.5's UNet, from its public configuration (unet/config.json): the cost of an
# edit does not depend on the weights, so random ones stand in when no --model is given.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000)

FAMILY_MODELS = ("sdxl", "sd3", "flux")  # built from public configs: family_configs.py
PATH_NAMES = ("reference", "default", "fast")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL_FP32 = 1e-4  # both paths in float32: rounding only
TOL_HALF = 5e-2  # a path in fp16/bf16: half-precision rounding, on latents of unit scale
PROMPTS = ("a photo of a cat sitting on a sofa", "a photo of a lion sitting on a sofa")


# ---- the model: a diffusers folder, every path loads it through `dds.models` --------------
def write_folder(folder: Path, unet, vae, text_encoder) -> Path:
    """Save a complete Stable Diffusion folder (the recipe's DDPM schedule, the CLIP tokenizer)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from dds.tokenizer import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULE, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sd15_folder(folder: Path, seed: int = 0) -> Path:
    """SD1.5's UNet with random weights; a small random autoencoder with SD's 8x downsampling
    and a one-layer text encoder of SD's width stand in for the parts that run once per edit."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=512, scaling_factor=0.18215,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=SD15_UNET["cross_attention_dim"], intermediate_size=768,
        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    return write_folder(folder, unet, vae, text)


def builtin_shape_folder(folder: Path, seed: int = 0) -> Path:
    """The built-in model's architecture (`dds.builtin.configs.default()`), random weights."""
    from dds.builtin import configs as C

    torch.manual_seed(seed)
    vae, unet, text = C.build_models(C.default())
    return write_folder(folder, unet, vae, text)


def model_folder(spec: str, device: torch.device, scratch: Path) -> tuple[str, Path]:
    """--model: auto, sd15, builtin, builtin-shape, tiny, or a diffusers folder -> (name, folder)."""
    from dds.models import builtin_model_dir
    from dds.models.registry import BUILTIN_DIR

    if spec == "auto":
        if device.type == "cuda":
            spec = "sd15"
        else:
            spec = "builtin" if (BUILTIN_DIR / "model_index.json").is_file() else "builtin-shape"
    if spec == "sd15":
        return "SD1.5-shaped UNet, random weights", sd15_folder(scratch / "sd15")
    if spec == "builtin-shape":
        return "built-in model shape, random weights", builtin_shape_folder(scratch / "builtin")
    if spec == "builtin":
        return "built-in model", builtin_model_dir()
    if spec == "tiny":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_tiny_sd

        return "tiny test model (random weights)", make_tiny_sd(scratch / "tiny")
    return f"model folder {Path(spec).name}", Path(spec)


@dataclass
class Setup:
    """What every path shares, read once from the model in float32 through its interface."""

    name: str
    folder: Path
    vae_factor: int
    native_size: int
    channels: int
    prediction: str  # "epsilon" or "v_prediction"
    uncond: object  # Conditioning, 1 row, float32 on the CPU
    source: object
    target: object


def read_setup(name: str, folder: Path) -> Setup:
    from dds.models import load_model

    m = load_model(folder, dtype="fp32", device="cpu")
    prompts = m.encode_prompt(list(PROMPTS)).float().to("cpu")
    source, target = prompts[0], prompts[1]
    return Setup(name, folder, m.vae_scale_factor, m.native_size, m.latent_channels,
                 m.identity()["prediction"], m.uncond().float().to("cpu"), source, target)


# ---- the reference loop, transcribed from the recipe (no dds code) -------------------------
def reference_draws(seeds: list[int], steps: int, shape: tuple[int, ...]):
    """Per edit, one generator; per step, t ~ U{50..948} then eps ~ N(0, I)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    ts, epss = [], []
    for _ in range(steps):
        ts.append(torch.stack([torch.randint(50, 949, (), generator=g) for g in gens]))
        epss.append(torch.stack([torch.randn(shape, generator=g) for g in gens]))
    return ts, epss


def reference_edit(
    unet,
    alphas_cumprod,
    z_source,
    emb_u,
    emb_s,
    emb_t,
    draws,
    autocast_dtype,
    prediction_type="epsilon",
    lr=0.1,
    guidance_scale=7.5,
    pooled=None,
    time_ids=None,
):
    """The reference loop; a batch of N edits makes a UNet batch of 4N.  SDXL: `pooled` (the
    three pooled text embeddings, as emb_u, emb_s, emb_t) and `time_ids` (1, 6) become the
    UNet's added conditioning, in the same row order as the token embeddings."""
    device = z_source.device
    z_target = z_source.clone().requires_grad_(True)
    opt = torch.optim.SGD(params=[z_target], lr=lr)
    n = z_source.shape[0]
    for t, eps in zip(*draws, strict=True):
        t, eps = t.to(device), eps.to(device)
        with torch.no_grad():
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t_source = a.sqrt() * z_source + (1 - a).sqrt() * eps
            z_t_target = a.sqrt() * z_target + (1 - a).sqrt() * eps
            z_t = torch.cat((z_t_source, z_t_target))
            latent_input = torch.cat([z_t] * 2)
            timestep = torch.cat([t] * 4)
            embedd = torch.cat(
                [
                    emb_u.expand(n, -1, -1),
                    emb_u.expand(n, -1, -1),
                    emb_s.expand(n, -1, -1),
                    emb_t.expand(n, -1, -1),
                ]
            )
            kw = {}
            if pooled is not None:
                pu, ps, pt = (p.expand(n, -1) for p in pooled)
                kw["added_cond_kwargs"] = {"text_embeds": torch.cat([pu, pu, ps, pt]),
                                           "time_ids": time_ids.expand(4 * n, -1)}
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                e_t = unet(latent_input, timestep, encoder_hidden_states=embedd, **kw).sample
            e_t = e_t.float()
            if prediction_type == "v_prediction":  # SD 2.x: eps = alpha_t v + sigma_t z_t
                aa = torch.cat([a] * 4)
                e_t = aa.sqrt() * e_t + (1 - aa).sqrt() * latent_input
            e_t_uncond, e_t = e_t.chunk(2)
            e_t = e_t_uncond + guidance_scale * (e_t - e_t_uncond)
            eps_pred_source, eps_pred_target = e_t.chunk(2)
            grad = eps_pred_target - eps_pred_source
        loss = (z_target * grad.clone()).sum() / (z_target.shape[2] * z_target.shape[3])
        opt.zero_grad()
        (2000 * loss).backward()
        opt.step()
    return z_target.detach()


# ---- measuring -----------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if platform.system() == "Darwin" else r / 1024


def memory_kind(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated (weights + activations of that path)"
    if Path("/proc/self/clear_refs").exists():
        return (
            "process peak RSS (VmHWM, reset before each path; includes interpreter and libraries)"
        )
    return "process peak RSS since start (ru_maxrss; not reset between paths)"


def unet_flops(unet, setup: Setup, device, h: int, w: int, autocast_dtype=None) -> int:
    """FLOPs of one UNet call on the recipe's batch of 4, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    dtype = next(unet.parameters()).dtype
    x = torch.randn(4, setup.channels, h, w, device=device, dtype=dtype)
    t = torch.full((4,), 500, device=device)
    emb = torch.cat([c.embeds for c in (setup.uncond, setup.uncond, setup.source, setup.target)])
    counter = FlopCounterMode(display=False)
    with (
        torch.no_grad(),
        counter,
        torch.autocast(
            device.type, dtype=autocast_dtype or dtype, enabled=autocast_dtype is not None
        ),
    ):
        unet(x, t, encoder_hidden_states=emb.to(device, dtype))
    return int(counter.get_total_flops())


def timed(run, steps: int, repeats: int, device, warm_steps: int):
    """Warm up (a short run of the same shapes: allocator, kernels, compile, graphs), then
    `repeats` timed runs.  Returns (median seconds, warm-up seconds, last output)."""
    t0 = time.perf_counter()
    run(warm_steps)
    sync(device)
    warm = time.perf_counter() - t0
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = run(steps)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm, out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="auto",
        help="auto (CUDA: sd15; CPU: builtin, else builtin-shape), sd15, builtin, "
        "builtin-shape, tiny, a diffusers model folder, or sdxl, sd3, flux (the released "
        "architecture with random weights: SDXL base 1.0, SD3 medium, FLUX.1-dev)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--steps", type=int, default=None,
                   help="steps timed (default: 200; sdxl/sd3/flux: 5, the time of a whole "
                   "edit is extrapolated from them)")
    p.add_argument("--schedule", default="reference", choices=["reference", "descending",
                                                                 "stratified"],
                   help="timestep schedule of the default and fast paths (EditConfig.schedule); "
                   "the reference path stays the recipe")
    p.add_argument("--step-rule", default="constant", choices=["constant", "budget", "decay"],
                   help="step rule of the default and fast paths (EditConfig.step_rule)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"],
                   help="optimiser of the default and fast paths (EditConfig.optimizer)")
    p.add_argument("--average-tail", type=float, default=0.0, metavar="F",
                   help="default and fast paths: the result is the mean of the last fraction F "
                   "of the steps' latents (EditConfig.average_tail)")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="steps of the default and fast paths (default: --steps); the "
                   "reference path runs --steps")
    p.add_argument("--batch", type=int, default=None,
                   help="edits in the batched run (N; default 8; sdxl/sd3/flux: 1)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--layers", type=int, default=None,
                   help="sdxl/sd3/flux: a TRUNCATED denoiser of N blocks (SDXL: N transformer "
                   "blocks per UNet level at most; FLUX: N double- and N single-stream) for "
                   "smoke runs on machines without room for the released one")
    p.add_argument("--methods", default="auto",
                   help="sdxl/sd3/flux: comma-separated methods to time (auto: dds for sdxl; "
                   "dds,flowedit for sd3 and flux)")
    p.add_argument("--cache", default=None,
                   help="sdxl/sd3/flux: keep the random-weight folder in this directory and "
                   "reuse it next time (default: a temporary directory, removed)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--precision", default="auto", help="fast path: auto, fp32, fp16, bf16")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--trace", default="auto", choices=["auto", "on", "off"],
                   help="fast path: TorchScript trace of the UNet call (auto: CPU, uncompiled)")
    p.add_argument("--split", default="auto", choices=["auto", "on", "off"],
                   help="fast path: split each traced UNet batch by rows over the CPU threads "
                   "(auto: CPU)")
    p.add_argument("--channels-last", action="store_true", help="fast path: channels-last UNet")
    p.add_argument(
        "--paths",
        default="reference,default,fast",
        help="comma-separated subset of reference,default,fast",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    family = a.model in FAMILY_MODELS
    a.steps = a.steps if a.steps is not None else (5 if family else 200)
    a.batch = a.batch if a.batch is not None else (1 if family else 8)
    if a.steps < 1 or a.batch < 1 or a.repeats < 1:
        p.error("--steps, --batch and --repeats must be >= 1")
    if a.layers is not None and (not family or a.layers < 1):
        p.error("--layers N (N >= 1) truncates --model sdxl, sd3 or flux only")
    return a


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _flag(v: str):
    return {"auto": "auto", "on": True, "off": False}[v]


@dataclass
class Run:
    """One path, ready to time: `run(steps)` -> (N,C,h,w) edited latents."""

    run: object
    precision: str
    attention: list
    holds: tuple = ()  # the path's model and editor, freed with the Run
    warnings: tuple = ()

    def settings(self) -> dict:
        ed = next((x for x in self.holds if hasattr(x, "compile_mode")), None)
        if ed is None:
            return {}
        return {"compile": ed.compile_mode, "cuda_graphs": ed.cuda_graphs,
                "channels_last": ed.channels_last, "trace": ed.trace, "split": ed.split}


def reference_run(setup: Setup, device, z_hat, seeds, shape) -> Run:
    """The recipe's loop on the model's own float32 UNet, schedule and prompt embeddings."""
    from dds.models import load_model

    on_cuda = device.type == "cuda"
    model = load_model(setup.folder, dtype="fp32", device=str(device))
    unet = model.denoiser
    a_bar = model.schedule.alphas_cumprod.to(device)
    emb = [c.embeds.to(device) for c in (setup.uncond, setup.source, setup.target)]
    zd = z_hat.to(device)
    autocast = torch.float16 if on_cuda else None

    def run(steps):
        d = reference_draws(seeds, steps, shape)
        return reference_edit(unet, a_bar, zd, *emb, d, autocast, setup.prediction)

    return Run(run, "fp16 autocast" if on_cuda else "fp32", model.attention_kernels(unet),
               (model,))


def default_run(setup: Setup, device, z_hat, cfg) -> Run:
    """`dds.loop.edit_latents` on the model loaded with its default precision."""
    from dds.loop import edit_latents
    from dds.models import load_model

    model = load_model(setup.folder, dtype="auto", device=str(device))
    n = z_hat.shape[0]
    cs, ct = (c.to(device, model.dtype).expand(n) for c in (setup.source, setup.target))

    def run(steps):
        return edit_latents(model, z_hat, cs, ct, cfg.with_(steps=steps))

    return Run(run, _name(model.dtype), model.attention_kernels(model.denoiser), (model,))


def fast_editor(model, precision: str, a):
    """A `FastEditor` with the command line's flags, and the warnings it raised."""
    from dds.fast import FastEditor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ed = FastEditor(model, precision=precision, compile=_flag(a.compile),
                        cuda_graphs=_flag(a.cuda_graphs), channels_last=a.channels_last,
                        trace=_flag(a.trace), parallel=_flag(a.split))
    return ed, caught


def fast_run(setup: Setup, device, z_hat, cfg, seeds, a) -> Run:
    """`dds.fast.FastEditor` on the model loaded in the fast path's precision."""
    from dds.models import load_model

    model = load_model(setup.folder, dtype=a.precision, device=str(device))
    ed, caught = fast_editor(model, a.precision, a)

    def run(steps):
        return ed.edit(z_hat, setup.source, setup.target, cfg.with_(steps=steps), seeds=seeds)

    return Run(run, _name(ed.dtype), ed.attention, (model, ed), tuple(caught))


def scheduled(a) -> bool:
    """Do the default and fast paths run another schedule than the reference recipe's?"""
    return (a.schedule, a.step_rule, a.optimizer, a.schedule_steps, a.average_tail) != (
        "reference", "constant", "sgd", None, 0.0)


def path_steps(path: str, a) -> int:
    """Steps a path runs: the reference recipe's --steps; --schedule-steps for ours."""
    return a.schedule_steps if path != "reference" and a.schedule_steps else a.steps


def make_run(path: str, setup: Setup, device, z_hat, seeds, cfg, a) -> Run:
    if path == "reference":
        return reference_run(setup, device, z_hat, seeds, tuple(z_hat.shape[1:]))
    cfg = cfg.with_(schedule=a.schedule, step_rule=a.step_rule, optimizer=a.optimizer,
                    average_tail=a.average_tail)
    r = (default_run(setup, device, z_hat, cfg) if path == "default"
         else fast_run(setup, device, z_hat, cfg, seeds, a))
    inner, steps = r.run, path_steps(path, a)
    # A timed run asks for --steps: ours run --schedule-steps then (a warm-up keeps its few).
    return replace(r, run=lambda asked: inner(steps if asked == a.steps else asked))


def _messages(caught) -> list[str]:
    return sorted({str(c.message) for c in caught
                   if not str(c.message).startswith("There are modules")})


def build_and_time(make, a, device):
    """Build a path and time it: (run, median s, warm-up s, final latents on the CPU, peak MB,
    warnings)."""
    reset_peak(device)
    r = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sec, warm, out = timed(r.run, a.steps, a.repeats, device, min(3, a.steps))
    return r, sec, warm, out.float().cpu(), peak_mb(device), caught


def measure(path: str, make, a, device, n: int, refs: dict, flops: int) -> dict:
    """Build one path, time it, compare its latents with the reference's (with another
    schedule: the fast path's with the default path's, which make the same edit); one row."""
    r, sec, warm, out, mem, caught = build_and_time(make, a, device)
    key = (n, path == "reference" or not scheduled(a))
    if path in ("reference", "default") and key not in refs:
        refs[key] = out
    diff = (out - refs[key]).abs().max().item() if key in refs else float("nan")
    tol = TOL_HALF if r.precision != "fp32" or device.type == "cuda" else TOL_FP32
    return {
        "path": path,
        "edits": n,
        "precision": r.precision,
        "attention": r.attention,
        "settings": r.settings(),
        "seconds_total": sec,
        "seconds_per_edit": sec / n,
        "warmup_seconds": warm,
        "steps": path_steps(path, a),
        "unet_tflops": flops * path_steps(path, a) * n / sec / 1e12,
        "peak_memory_mb": mem,
        "max_abs_diff": diff,
        "tolerance": tol,
        "within_tolerance": bool(diff <= tol) if math.isfinite(diff) else None,
        "warnings": _messages([*r.warnings, *caught]),
    }


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    return device


def header(setup: Setup, a, device, size: int, shape, flops: int) -> dict:
    on_cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if on_cuda
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": setup.name,
        "image_size": size,
        "latent_shape": list(shape),
        "steps": a.steps,
        "batch": a.batch,
        "repeats": a.repeats,
        "unet_flops_per_call": flops,  # one UNet call on the batch of 4 of one edit
        "reference_precision": "fp32 weights, fp16 autocast"
        if on_cuda
        else "fp32 weights, no autocast (plain fp32 on CPU)",
        "memory": memory_kind(device),
        "tolerance": {"fp32": TOL_FP32, "half": TOL_HALF},
        "results": [],
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = _device(a.device)
    if a.model in FAMILY_MODELS:
        return bench_family(a, device)
    with tempfile.TemporaryDirectory(prefix="dds-bench-") as scratch:
        setup = read_setup(*model_folder(a.model, device, Path(scratch)))
        return bench(setup, a, device)


def bench(setup: Setup, a, device) -> dict:
    from dds.loop import EditConfig
    from dds.models import load_model

    size = a.size or setup.native_size
    if size % setup.vae_factor:
        raise SystemExit(f"--size {size} is not a multiple of the model's {setup.vae_factor}")
    h = w = size // setup.vae_factor
    shape = (setup.channels, h, w)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]
    for p in paths:
        if p not in ("reference", "default", "fast"):
            raise SystemExit(f"unknown path '{p}'; use reference, default or fast")
    # Same-edit settings for every path: the recipe's numbers at this latent size.
    cfg = EditConfig(steps=a.steps, seed=a.seed, reference_area=h * w)
    g = torch.Generator().manual_seed(a.seed + 12345)
    z_all = torch.randn(a.batch, *shape, generator=g)  # (N,C,h,w) source latents
    autocast = torch.float16 if device.type == "cuda" else None
    model = load_model(setup.folder, dtype="fp32", device=str(device))
    flops = unet_flops(model.denoiser, setup, device, h, w, autocast)
    del model
    report = header(setup, a, device, size, shape, flops)
    print_header(report)
    refs: dict[tuple, torch.Tensor] = {}
    for n in sorted({1, a.batch}):
        seeds = [a.seed + i for i in range(n)]
        z_hat = z_all[:n]
        for path in paths:
            make = partial(make_run, path, setup, device, z_hat, seeds, cfg, a)
            report["results"].append(measure(path, make, a, device, n, refs, flops))
            print_row(report["results"][-1])
            if a.json:  # rewritten after every row: a run cut short keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
            if device.type == "cuda":  # the path's model was freed with its Run
                torch.cuda.empty_cache()
    return report


HEAD = (
    "path",
    "edits",
    "precision",
    "s/edit",
    "TFLOP/s",
    "peak MB",
    "max|diff|",
    "tol",
    "ok",
    "warm-up s",
)


def print_header(r: dict) -> None:
    print(
        f"# {r['model']} | {r['device']} ({r['device_name']}, {r['threads']} threads) | "
        f"image {r['image_size']}, latent {tuple(r['latent_shape'])} | {r['steps']} steps | "
        f"UNet {r['unet_flops_per_call'] / 1e12:.4g} TFLOP per batch-of-4 call"
    )
    print(f"# reference: {r['reference_precision']}; memory: {r['memory']}")
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "|".join("---" for _ in HEAD) + "|", flush=True)


def print_row(x: dict) -> None:
    ok = {True: "yes", False: "NO", None: "-"}[x["within_tolerance"]]
    print(
        f"| {x['path']} | {x['edits']} | {x['precision']} | {x['seconds_per_edit']:.3f} | "
        f"{x['unet_tflops']:.3g} | {x['peak_memory_mb']:.0f} | {x['max_abs_diff']:.2e} | "
        f"{x['tolerance']:.0e} | {ok} | {x['warmup_seconds']:.2f} |",
        flush=True,
    )


# ---- the released SDXL / SD3 / FLUX.1 architectures, random weights (family_configs.py) ----
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
MARGIN = 1.25  # activations and the allocator's slack, on top of the largest set of weights
PROCESS_BYTES = 10**9  # the interpreter, torch and diffusers themselves (CPU runs)


def _family_configs():
    """benchmarks/family_configs.py (this file may be loaded by path, not from its folder)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import family_configs

    return family_configs


@dataclass(frozen=True)
class FamilyPlan:
    """What a family run builds and holds, decided before anything is allocated."""

    fam: object  # family_configs.Family
    config: dict  # the denoiser's config (truncated with --layers)
    truncated: str | None  # how, or None for the released depth
    n_denoiser: int  # denoiser parameters and buffers
    n_rest: int  # autoencoder and text encoders' parameters
    device: torch.device
    dtype: str  # the model's default precision here (`load_model(dtype="auto")`)
    fast_dtype: str  # the fast path's
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    folder: Path
    cached: bool  # the folder is there already: nothing to build


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def family_plan(a, device: torch.device, scratch: Path) -> FamilyPlan:
    from dds.methods import METHODS

    fc = _family_configs()
    fam = fc.FAMILIES[a.model]
    config, truncated = fc.denoiser_config(fam, a.layers)
    n_den, n_rest = fc.parameter_count(fam, config)
    dtype = "fp32"
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        dtype = fam.default_dtype_cuda if bf16_ok or fam.default_dtype_cuda != "bf16" else "fp16"
    # "auto": the model's own precision, so the fast path runs the weights the model holds (on
    # CUDA FastEditor's own "auto" is fp16, which would copy FLUX.1's bf16 transformer).
    fast = dtype if a.precision == "auto" else a.precision
    if fast not in DTYPE_BYTES:
        raise SystemExit(f"--precision {a.precision} is not one of auto, fp32, fp16, bf16")
    methods = fam.methods if a.methods == "auto" else _csv(a.methods)
    paths = _csv(a.paths)
    for name, given, known in (("method", methods, METHODS), ("path", paths, PATH_NAMES)):
        for x in given:
            if x not in known:
                raise SystemExit(f"unknown {name} '{x}'; use {', '.join(known)}")
    root = Path(a.cache).expanduser() if a.cache else scratch
    folder = root / f"{fam.name}-{f'L{a.layers}' if a.layers else 'full'}-{dtype}"
    return FamilyPlan(fam, config, truncated, n_den, n_rest, device, dtype, fast, methods, paths,
                      folder, (folder / "model_index.json").is_file())


def _uses_reference(plan: FamilyPlan, method: str) -> bool:
    """The recipe's loop is an eps-UNet loop: it transcribes to SDXL's DDS and nothing else."""
    return "reference" in plan.paths and plan.fam.name == "sdxl" and method == "dds"


def memory_need(plan: FamilyPlan) -> int:
    """Bytes the run needs at its peak on its device, from the parameter counts: the larger of
    building the denoiser (float32, plus one weight shard being written on the CPU) and running
    it (the model's weights, plus a float32 copy for the reference loop and a copy in the fast
    path's precision where they differ), with a margin for activations; plus the autoencoder
    and text encoders in float32, and (CPU) the process itself."""
    fc = _family_configs()
    w, on_cpu = plan.n_denoiser, plan.device.type == "cpu"
    run = w * DTYPE_BYTES[plan.dtype]
    if "fast" in plan.paths and plan.fast_dtype != plan.dtype:
        run += w * DTYPE_BYTES[plan.fast_dtype]
    if any(_uses_reference(plan, m) for m in plan.methods) and plan.dtype != "fp32":
        run += w * 4
    build = 0 if plan.cached else w * 4 + (fc.SHARD_BYTES if on_cpu else 0)
    return int(MARGIN * max(build, run) + 4 * plan.n_rest + (PROCESS_BYTES if on_cpu else 0))


def memory_available(device: torch.device) -> tuple[int, str]:
    """(bytes free now, what they are)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return torch.cuda.mem_get_info(device)[0], f"free memory on {name}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def check_memory(plan: FamilyPlan) -> tuple[int, int, str]:
    """Refuse, in one sentence and before allocating, a run that will not fit the device."""
    need = memory_need(plan)
    avail, what = memory_available(plan.device)
    if need > avail:
        gb = 1e9
        weights = plan.n_denoiser * DTYPE_BYTES[plan.dtype] / gb
        where = "the GPU" if plan.device.type == "cuda" else "this machine"
        raise SystemExit(
            f"{plan.fam.released}'s {plan.fam.denoiser} ({plan.n_denoiser / 1e9:.2f} B "
            f"parameters{', truncated' if plan.truncated else ''}) needs about "
            f"{need / gb:.0f} GB on {plan.device} ({weights:.1f} GB of {plan.dtype} weights, "
            f"built in fp32, plus activations) but {where} has {avail / gb:.1f} GB of {what}; "
            "run it where there is more memory, or time a truncated variant with --layers N "
            "(e.g. --layers 2)"
        )
    return need, avail, what


def family_folder(plan: FamilyPlan, seed: int) -> float:
    """Write the random-weight folder unless it is cached; seconds it took."""
    if plan.cached:
        return 0.0
    t0 = time.perf_counter()
    _family_configs().write_folder(plan.fam, plan.folder, plan.config, plan.device,
                                   DTYPES[plan.dtype], seed)
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def method_config(model, method: str, seed: int, h: int, w: int):
    """The settings a user gets for this model and method (`dds.pipeline.edit_config`); score
    distillation with the recipe's step at this latent size (2000 / (h * w)), as the reference
    loop takes it, so that every row makes the same edit."""
    from dds.methods import get_method
    from dds.pipeline import edit_config

    cfg = edit_config(model, method=method, seed=seed)
    return cfg.with_(reference_area=h * w) if get_method(method).gradient else cfg


def timed_config(cfg, steps: int):
    """`steps` steps of the method: the first `steps` of score distillation; FlowEdit's last
    `steps` of its T-step schedule (n_max), each step as costly as any other."""
    if cfg.method == "flowedit":
        return cfg.with_(n_max=min(steps, cfg.steps))
    return cfg.with_(steps=steps)


def step_flops(model, cfg, conds, shape, device) -> int:
    """FLOPs of one step of the method for one edit: its denoiser call (4 rows with
    classifier-free guidance, 2 with FLUX.1-dev's embedded guidance) times FlowEdit's n_avg,
    counted by FlopCounterMode on the model's plain call."""
    from torch.utils.flop_counter import FlopCounterMode

    from dds.loop import uses_embedded_guidance
    from dds.methods import get_method

    method = get_method(cfg.method)
    embedded = uses_embedded_guidance(model, cfg)
    cond = method.conditioning(model.uncond(), *conds, cfg, embedded).to(device, model.dtype)
    rows = len(cond)
    x = torch.randn(rows, *shape, device=device, dtype=model.dtype)
    t = model.schedule_for((rows, *shape)).timestep(torch.full((rows,), 500)).to(device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.denoiser_call(model.denoiser, x, t, cond)
    return int(counter.get_total_flops()) * (cfg.n_avg if method.name == "flowedit" else 1)


def sdxl_reference_run(model, plan: FamilyPlan, z_hat, seeds) -> Run:
    """The recipe's loop (`reference_edit`) on SDXL's UNet in float32 (fp16 autocast on CUDA),
    with the added conditioning the pipeline gives it built here: the pooled text embeddings
    and the size ids (H, W, 0, 0, H, W) of an uncropped H x W image (`_get_add_time_ids`)."""
    from dds.models import load_model

    device = plan.device
    ref = model if model.dtype == torch.float32 else load_model(plan.folder, dtype="fp32",
                                                                device=str(device))
    f, (h, w) = ref.vae_scale_factor, z_hat.shape[-2:]
    time_ids = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]], dtype=torch.float32,
                            device=device)
    prompts = ref.encode_prompt(list(PROMPTS))
    conds = [c.to(device, torch.float32) for c in (ref.uncond(), prompts[0], prompts[1])]
    a_bar = ref.schedule.alphas_cumprod.to(device)
    zd = z_hat.to(device)
    autocast = torch.float16 if device.type == "cuda" else None

    def run(steps):
        d = reference_draws(seeds, steps, tuple(z_hat.shape[1:]))
        return reference_edit(ref.denoiser, a_bar, zd, *(c.embeds for c in conds), d, autocast,
                              ref.prediction_type, pooled=[c.pooled for c in conds],
                              time_ids=time_ids)

    precision = "fp16 autocast" if autocast else "fp32"
    return Run(run, precision, ref.attention_kernels(ref.denoiser), (ref,))


def family_run(path: str, model, plan: FamilyPlan, z_hat, seeds, cfg, conds, a) -> Run:
    """One path over the loaded model (shared by the paths: no second copy of the weights)."""
    from dds.loop import edit_latents

    if path == "reference":
        return sdxl_reference_run(model, plan, z_hat, seeds)
    source, target = conds
    if path == "default":
        n = z_hat.shape[0]
        cs, ct = source.expand(n), target.expand(n)

        def run(steps):
            return edit_latents(model, z_hat, cs, ct, timed_config(cfg, steps), seeds=seeds)

        return Run(run, _name(model.dtype), model.attention_kernels(model.denoiser), (model,))
    ed, caught = fast_editor(model, plan.fast_dtype, a)

    def run(steps):
        return ed.edit(z_hat, source, target, timed_config(cfg, steps), seeds=seeds)

    return Run(run, _name(ed.dtype), ed.attention, (model, ed), tuple(caught))


def measure_family(path: str, make, a, device, key: tuple, refs: dict, timing: dict) -> dict:
    """Build one path, time it, compare its latents with the first row of the same method and
    edits (the reference where there is one, else the default loop); one report row."""
    method, n = key
    r, sec, warm, out, mem, caught = build_and_time(make, a, device)
    base_path, base = refs.setdefault(key, (path, out))
    diff = (out - base).abs().max().item()
    tol = TOL_HALF if r.precision != "fp32" or device.type == "cuda" else TOL_FP32
    per_step = sec / timing["steps"]
    return {
        "path": path, "method": method, "edits": n, "precision": r.precision,
        "attention": r.attention, "settings": r.settings(), "steps": timing["steps"],
        "seconds_total": sec, "seconds_per_step": per_step,
        "default_steps": timing["default_steps"],
        "seconds_per_edit": per_step * timing["default_steps"] / n,
        "warmup_seconds": warm,
        "denoiser_tflops": timing["flops"] * timing["steps"] * n / sec / 1e12,
        "peak_memory_mb": mem, "compared_with": base_path, "max_abs_diff": diff,
        "tolerance": tol, "within_tolerance": bool(diff <= tol) if math.isfinite(diff) else None,
        "warnings": _messages([*r.warnings, *caught]),
    }


def family_header(plan: FamilyPlan, model, a, size: int, shape, memory, built: float) -> dict:
    need, avail, what = memory
    on_cuda = plan.device.type == "cuda"
    return {
        "device": str(plan.device),
        "device_name": torch.cuda.get_device_name(plan.device) if on_cuda
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": f"{plan.fam.released}, random weights", "family": plan.fam.name,
        "loaded_as": type(model).__name__, "truncated": plan.truncated,
        "denoiser": plan.fam.denoiser, "denoiser_config": plan.config,
        "denoiser_parameters": plan.n_denoiser, "other_parameters": plan.n_rest,
        "vae": "the released architecture, random weights; outside the timed loop (an edit "
        "runs on latents)",
        "text_encoders": "released output widths, ONE layer each, random weights: they encode "
        "the prompts once per edit, outside the timed loop",
        "precision": plan.dtype, "image_size": size, "latent_shape": list(shape),
        "steps": a.steps, "batch": a.batch, "repeats": a.repeats,
        "reference": "the recipe's loop with SDXL's added conditioning, fp32 weights (DDS "
        "rows; FlowEdit rows are compared with the default loop)" if plan.fam.name == "sdxl"
        else "none (the recipe's loop is an eps-UNet loop); rows are compared with the default "
        "loop, dds.loop.edit_latents",
        "memory": memory_kind(plan.device), "memory_estimate_gb": need / 1e9,
        "memory_available_gb": avail / 1e9, "memory_available_kind": what,
        "folder": str(plan.folder) if a.cache else "temporary", "build_seconds": built,
        "results": [],
    }


def bench_family(a, device: torch.device) -> dict:
    """--model sdxl|sd3|flux: write the released architecture with random weights as a
    diffusers folder, load it through `dds.models.registry.load_model` as a user's folder is
    loaded, and time each method's straightforward loop against the fast path."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from dds.models.registry import load_model

    diffusers_logging.disable_progress_bar()  # per-shard bars when writing and loading
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="dds-bench-") as scratch:
        plan = family_plan(a, device, Path(scratch))
        memory = check_memory(plan)
        print(f"# {plan.fam.released}: {plan.n_denoiser / 1e9:.3f} B denoiser parameters"
              f"{' (' + plan.truncated + ')' if plan.truncated else ''}; needs about "
              f"{memory[0] / 1e9:.1f} GB of {memory[1] / 1e9:.1f} GB {memory[2]}; "
              f"{'reusing' if plan.cached else 'writing'} the folder", flush=True)
        built = family_folder(plan, a.seed)
        model = load_model(plan.folder, dtype="auto", device=str(device))
        if model.family != plan.fam.name or _name(model.dtype) != plan.dtype:
            raise SystemExit(f"the folder loaded as {type(model).__name__} in "
                             f"{_name(model.dtype)}, not as planned ({plan.fam.name}, "
                             f"{plan.dtype})")
        return family_rows(plan, model, a, built, memory)


def family_rows(plan: FamilyPlan, model, a, built: float, memory) -> dict:
    from dds.errors import DDSError
    from dds.methods import get_method

    device = plan.device
    size = a.size or model.native_size
    f = model.vae_scale_factor
    # The sides the model takes (its `size_multiple`; FLUX packs latents in 2x2 patches).
    multiple = getattr(model, "size_multiple", None) or f * (2 if plan.fam.name == "flux" else 1)
    if size % multiple:
        raise SystemExit(f"--size {size} is not a multiple of the model's {multiple}")
    h = w = size // f
    shape = (model.latent_channels, h, w)
    prompts = model.encode_prompt(list(PROMPTS))
    conds = (prompts[0], prompts[1])
    z_all = torch.randn(a.batch, *shape, generator=torch.Generator().manual_seed(a.seed + 12345))
    report = family_header(plan, model, a, size, shape, memory, built)
    print_family_header(report)
    refs: dict[tuple, tuple] = {}
    for method in plan.methods:
        cfg = method_config(model, method, a.seed, h, w)
        m = get_method(method)
        timing = {"steps": m.num_steps(timed_config(cfg, a.steps)),
                  "default_steps": m.num_steps(cfg),
                  "flops": step_flops(model, cfg, conds, shape, device)}
        for n in sorted({1, a.batch}):
            seeds = [a.seed + i for i in range(n)]
            for path in plan.paths:
                if path == "reference" and not _uses_reference(plan, method):
                    continue
                make = partial(family_run, path, model, plan, z_all[:n], seeds, cfg, conds, a)
                try:
                    row = measure_family(path, make, a, device, (method, n), refs, timing)
                except (DDSError, RuntimeError) as e:  # out of memory, diverged: the other
                    row = {"path": path, "method": method, "edits": n,  # rows still run
                           "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
                report["results"].append(row)
                print_family_row(row)
                if a.json:
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return report


FAMILY_HEAD = ("path", "method", "edits", "precision", "s/step", "s/edit (extrapolated)",
               "TFLOP/s", "peak MB", "max|diff|", "vs", "ok", "warm-up s")


def print_family_header(r: dict) -> None:
    print(f"# {r['model']} ({r['denoiser']}, {r['denoiser_parameters'] / 1e9:.3f} B, loaded as "
          f"{r['loaded_as']} in {r['precision']}) | {r['device']} ({r['device_name']}, "
          f"{r['threads']} threads) | image {r['image_size']}, latent {tuple(r['latent_shape'])}"
          f" | {r['steps']} steps timed, {r['repeats']} repeats (median)")
    if r["truncated"]:
        print(f"# {r['truncated']}: NOT the released model's speed")
    print(f"# text encoders: {r['text_encoders']}; VAE: {r['vae']}")
    print(f"# memory: {r['memory']}; estimated need {r['memory_estimate_gb']:.1f} GB of "
          f"{r['memory_available_gb']:.1f} GB {r['memory_available_kind']}; folder written in "
          f"{r['build_seconds']:.0f} s")
    print(f"# reference: {r['reference']}; s/edit = s/step x the method's default steps / edits")
    print("| " + " | ".join(FAMILY_HEAD) + " |")
    print("|" + "|".join("---" for _ in FAMILY_HEAD) + "|", flush=True)


def print_family_row(x: dict) -> None:
    if "error" in x:
        print(f"| {x['path']} | {x['method']} | {x['edits']} | FAILED: {x['error']} |",
              flush=True)
        return
    ok = {True: "yes", False: "NO", None: "-"}[x["within_tolerance"]]
    print(
        f"| {x['path']} | {x['method']} | {x['edits']} | {x['precision']} | "
        f"{x['seconds_per_step']:.3f} | {x['seconds_per_edit']:.1f} @ {x['default_steps']} | "
        f"{x['denoiser_tflops']:.3g} | {x['peak_memory_mb']:.0f} | {x['max_abs_diff']:.2e} | "
        f"{x['compared_with']} | {ok} | {x['warmup_seconds']:.2f} |",
        flush=True,
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
