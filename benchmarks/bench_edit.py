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

Usage (see docs/speed.md):
  python benchmarks/bench_edit.py                          # CPU: the built-in model
  python benchmarks/bench_edit.py --device cuda            # GPU: SD1.5-shaped UNet, random weights
  python benchmarks/bench_edit.py --device cuda --model path/to/sd15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
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
):
    """The reference loop; a batch of N edits makes a UNet batch of 4N."""
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
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                e_t = unet(latent_input, timestep, encoder_hidden_states=embedd).sample
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
        "builtin-shape, tiny, or a diffusers model folder",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8, help="edits in the batched run (N)")
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
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
    if a.steps < 1 or a.batch < 1 or a.repeats < 1:
        p.error("--steps, --batch and --repeats must be >= 1")
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


def fast_run(setup: Setup, device, z_hat, cfg, seeds, a) -> Run:
    """`dds.fast.FastEditor` on the model loaded in the fast path's precision."""
    from dds.fast import FastEditor
    from dds.models import load_model

    model = load_model(setup.folder, dtype=a.precision, device=str(device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ed = FastEditor(model, precision=a.precision, compile=_flag(a.compile),
                        cuda_graphs=_flag(a.cuda_graphs), channels_last=a.channels_last,
                        trace=_flag(a.trace), parallel=_flag(a.split))

    def run(steps):
        return ed.edit(z_hat, setup.source, setup.target, cfg.with_(steps=steps), seeds=seeds)

    return Run(run, _name(ed.dtype), ed.attention, (model, ed), tuple(caught))


def make_run(path: str, setup: Setup, device, z_hat, seeds, cfg, a) -> Run:
    if path == "reference":
        return reference_run(setup, device, z_hat, seeds, tuple(z_hat.shape[1:]))
    if path == "default":
        return default_run(setup, device, z_hat, cfg)
    return fast_run(setup, device, z_hat, cfg, seeds, a)


def _messages(caught) -> list[str]:
    return sorted({str(c.message) for c in caught
                   if not str(c.message).startswith("There are modules")})


def measure(path: str, make, a, device, n: int, refs: dict, flops: int) -> dict:
    """Build one path, time it, compare its latents with the reference's; one report row."""
    reset_peak(device)
    r = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sec, warm, out = timed(r.run, a.steps, a.repeats, device, min(3, a.steps))
    mem = peak_mb(device)
    out = out.float().cpu()
    if path == "reference":
        refs[n] = out
    diff = (out - refs[n]).abs().max().item() if n in refs else float("nan")
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
        "unet_tflops": flops * a.steps * n / sec / 1e12,
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
    refs: dict[int, torch.Tensor] = {}
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


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
