"""Time one DDS edit three ways, on one machine and one model shape, in one run.

  reference  the reference recipe's loop, transcribed independently of `dds` (fp32 weights, the
             UNet under fp16 autocast on CUDA / plain fp32 on CPU, a UNet batch of 4 built with
             cat([z_t] * 2) and embeddings [uncond, uncond, source, target], the surrogate
             loss (z_target * grad).sum() / (h * w), (2000 * loss).backward(), SGD lr 0.1)
  default    `dds.edit.edit_latents` with the backend's default precision (fp16 on CUDA, fp32 on
             CPU, as `StableDiffusionModel(dtype="auto")` chooses)
  fast       `dds.fast.FastEditor` with its defaults (or the --precision/--compile/--cuda-graphs
             given here)

each for one edit and for --batch edits at once.  All paths make the same edit: the same seeds
give the same t and eps draws, and every path uses the recipe's numbers (guidance 7.5, lr 0.1,
loss scale 2000 divided by the latent's own h * w), so the final latents are compared with the
reference's.  The model's own recommended edit settings are deliberately not applied.

Usage (see docs/speed.md):
  python benchmarks/bench_edit.py                          # CPU: the built-in model
  python benchmarks/bench_edit.py --device cuda            # GPU: SD1.5-shaped UNet, random weights
  python benchmarks/bench_edit.py --device cuda --model path/to/sd15 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
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
SD15_VAE_FACTOR = 8
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)

TOL_FP32 = 1e-4  # both paths in float32: rounding only
TOL_HALF = 5e-2  # a path in fp16/bf16: half-precision rounding, on latents of unit scale
PROMPTS = ("a photo of a cat sitting on a sofa", "a photo of a lion sitting on a sofa")


# ---- the model, held once on the CPU in float32 --------------------------------------------
@dataclass
class Model:
    name: str
    unet: torch.nn.Module  # float32, CPU: each path makes its own device copy
    alphas_cumprod: torch.Tensor  # (T,)
    prediction_type: str
    vae_factor: int
    native_size: int
    emb_u: torch.Tensor  # (1,L,D) float32
    emb_s: torch.Tensor
    emb_t: torch.Tensor


def sd_alphas_cumprod() -> torch.Tensor:
    s = SD_SCHEDULE
    betas = (
        torch.linspace(
            s["beta_start"] ** 0.5,
            s["beta_end"] ** 0.5,
            s["num_train_timesteps"],
            dtype=torch.float64,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, 0).float()


def random_unet_model(name: str, unet_kwargs: dict, vae_factor: int, seed: int = 0) -> Model:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    d = unet_kwargs["cross_attention_dim"]
    emb = [torch.randn(1, 77, d, generator=g) for _ in range(3)]
    return Model(
        name,
        unet,
        sd_alphas_cumprod(),
        "epsilon",
        vae_factor,
        unet_kwargs["sample_size"] * vae_factor,
        *emb,
    )


def folder_model(name: str, path) -> Model:
    from dds.pipeline import get_model

    b = get_model(path, dtype="fp32", device="cpu")
    emb_s, emb_t = b.encode_prompt(list(PROMPTS)).float().split(1)
    return Model(
        name,
        b.unet,
        b.alphas_cumprod.float().cpu(),
        b.prediction_type,
        b.vae_scale_factor,
        b.native_size,
        b.uncond().float().cpu(),
        emb_s,
        emb_t,
    )


def load_model(spec: str, device: torch.device) -> Model:
    """--model: auto, sd15, builtin, builtin-shape, tiny, or a diffusers folder."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "sd15"
        else:
            from dds.builtin import BUILTIN_DIR

            spec = "builtin" if (BUILTIN_DIR / "model_index.json").is_file() else "builtin-shape"
    if spec == "sd15":
        return random_unet_model("SD1.5-shaped UNet, random weights", SD15_UNET, SD15_VAE_FACTOR)
    if spec == "builtin-shape":
        from dds.builtin import configs as C

        cfg = C.default()
        torch.manual_seed(0)
        unet = C.build_unet(cfg.unet, cross_attention_dim=cfg.text.hidden_size)
        g = torch.Generator().manual_seed(1)
        emb = [torch.randn(1, 77, cfg.text.hidden_size, generator=g) for _ in range(3)]
        return Model(
            "built-in model shape, random weights",
            unet.eval().requires_grad_(False),
            sd_alphas_cumprod(),
            "epsilon",
            2 ** (len(cfg.vae.block_out_channels) - 1),
            cfg.image_size,
            *emb,
        )
    if spec == "builtin":
        from dds.builtin import builtin_model_dir

        return folder_model("built-in model", builtin_model_dir())
    if spec == "tiny":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from conftest import make_tiny_sd

        folder = Path(tempfile.mkdtemp(prefix="dds-bench-")) / "tiny"
        return folder_model("tiny test model (random weights)", make_tiny_sd(folder))
    return folder_model(f"model folder {Path(spec).name}", spec)


def make_backend(model: Model, device: torch.device, dtype: torch.dtype):
    """A `StableDiffusionModel` around a device copy of the UNet in `dtype` (no VAE or text
    encoder: the prompts are already encoded), so `edit_latents` runs its real code."""
    from dds.models import StableDiffusionModel
    from dds.models.trace import unet_call_for

    b = StableDiffusionModel.__new__(StableDiffusionModel)
    b._unet_call = unet_call_for(device)
    b.unet = copy.deepcopy(model.unet).to(device, dtype).eval().requires_grad_(False)
    b.device, b.dtype = device, dtype
    b.alphas_cumprod = model.alphas_cumprod.to(device)
    b.prediction_type = model.prediction_type
    b.vae_scale_factor, b.native_size = model.vae_factor, model.native_size
    b._uncond = model.emb_u.to(device, dtype)
    b.edit_defaults = {}
    return b


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


def unet_flops(unet, model: Model, device, dtype, h: int, w: int, autocast_dtype=None) -> int:
    """FLOPs of one UNet call on the recipe's batch of 4, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 4, h, w, device=device, dtype=dtype)
    t = torch.full((4,), 500, device=device)
    emb = torch.cat([model.emb_u, model.emb_u, model.emb_s, model.emb_t]).to(device, dtype)
    counter = FlopCounterMode(display=False)
    with (
        torch.no_grad(),
        counter,
        torch.autocast(
            device.type, dtype=autocast_dtype or dtype, enabled=autocast_dtype is not None
        ),
    ):
        unet(x, t, encoder_hidden_states=emb)
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


def main(argv=None) -> dict:
    from dds.loop import EditConfig, edit_latents
    from dds.fast import PRECISIONS, FastEditor

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    on_cuda = device.type == "cuda"
    model = load_model(a.model, device)
    size = a.size or model.native_size
    if size % model.vae_factor:
        raise SystemExit(f"--size {size} is not a multiple of the model's {model.vae_factor}")
    h = w = size // model.vae_factor
    shape = (4, h, w)
    paths = [p.strip() for p in a.paths.split(",") if p.strip()]

    # Same-edit settings for every path: the recipe's numbers at this latent size.
    cfg = EditConfig(steps=a.steps, seed=a.seed, reference_area=h * w)
    ref_autocast = torch.float16 if on_cuda else None
    default_dtype = torch.float16 if on_cuda else torch.float32  # StableDiffusionModel "auto"

    g = torch.Generator().manual_seed(a.seed + 12345)
    z_all = torch.randn(a.batch, *shape, generator=g)  # (N,4,h,w) source latents
    flops = unet_flops(
        copy.deepcopy(model.unet).to(device), model, device, torch.float32, h, w, ref_autocast
    )

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if on_cuda
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": model.name,
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
    refs: dict[int, torch.Tensor] = {}
    warm_steps = min(3, a.steps)
    print_header(report)

    for n in sorted({1, a.batch}):
        seeds = [a.seed + i for i in range(n)]
        z_hat = z_all[:n]
        for path in paths:
            reset_peak(device)
            caught_init = []
            if path == "reference":
                unet = copy.deepcopy(model.unet).to(device, torch.float32)
                emb = [e.to(device) for e in (model.emb_u, model.emb_s, model.emb_t)]
                a_bar = model.alphas_cumprod.to(device)
                zd = z_hat.to(device)

                def run(steps, unet=unet, emb=emb, a_bar=a_bar, zd=zd, seeds=seeds):
                    d = reference_draws(seeds, steps, shape)
                    return reference_edit(
                        unet, a_bar, zd, *emb, d, ref_autocast, model.prediction_type
                    )

                precision, attention, settings = (
                    ("fp16 autocast" if on_cuda else "fp32"),
                    sorted({type(p).__name__ for p in unet.attn_processors.values()}),
                    {},
                )
            elif path == "default":
                unet = None
                backend = make_backend(model, device, default_dtype)
                es, et = (
                    model.emb_s.to(device, default_dtype),
                    model.emb_t.to(device, default_dtype),
                )

                def run(steps, backend=backend, es=es, et=et, z_hat=z_hat, n=n):
                    return edit_latents(
                        backend,
                        z_hat,
                        es.expand(n, -1, -1),
                        et.expand(n, -1, -1),
                        cfg.with_(steps=steps),
                    )

                precision = _name(default_dtype)
                attention = sorted(
                    {type(p).__name__ for p in backend.unet.attn_processors.values()}
                )
                settings = {}
            elif path == "fast":
                dtype = {"auto": torch.float16 if on_cuda else torch.float32, **PRECISIONS}[
                    a.precision
                ]
                backend = make_backend(model, device, dtype)
                with warnings.catch_warnings(record=True) as caught_init:
                    warnings.simplefilter("always")
                    ed = FastEditor(
                        backend,
                        precision=a.precision,
                        compile=_flag(a.compile),
                        cuda_graphs=_flag(a.cuda_graphs),
                        channels_last=a.channels_last,
                        trace=_flag(a.trace),
                        parallel=_flag(a.split),
                    )

                def run(steps, ed=ed, z_hat=z_hat, seeds=seeds):
                    return ed.edit(
                        z_hat, model.emb_s, model.emb_t, cfg.with_(steps=steps), seeds=seeds
                    )

                precision = _name(ed.dtype)
                attention = ed.attention
                settings = {}
            else:
                raise SystemExit(f"unknown path '{path}'; use reference, default or fast")

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sec, warm, out = timed(run, a.steps, a.repeats, device, warm_steps)
            if path == "fast":
                settings = {
                    "compile": ed.compile_mode,
                    "cuda_graphs": ed.cuda_graphs,
                    "channels_last": ed.channels_last,
                    "trace": ed.trace,
                    "split": ed.split,
                }
            mem = peak_mb(device)
            out = out.float().cpu()
            if path == "reference":
                refs[n] = out
            diff = (out - refs[n]).abs().max().item() if n in refs else float("nan")
            half = precision != "fp32" or on_cuda
            tol = TOL_HALF if half else TOL_FP32
            report["results"].append(
                {
                    "path": path,
                    "edits": n,
                    "precision": precision,
                    "attention": attention,
                    "settings": settings,
                    "seconds_total": sec,
                    "seconds_per_edit": sec / n,
                    "warmup_seconds": warm,
                    "unet_tflops": flops * a.steps * n / sec / 1e12,
                    "peak_memory_mb": mem,
                    "max_abs_diff": diff,
                    "tolerance": tol,
                    "within_tolerance": bool(diff <= tol) if math.isfinite(diff) else None,
                    "warnings": sorted(
                        {
                            str(c.message)
                            for c in [*caught_init, *caught]
                            if not str(c.message).startswith("There are modules")
                        }
                    ),
                }
            )
            print_row(report["results"][-1])
            if a.json:  # rewritten after every row: a run cut short keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
            del run
            unet = backend = ed = None  # noqa: F841  free the device copy before the next path
            if on_cuda:
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
