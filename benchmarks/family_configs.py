"""The released SDXL, SD3 and FLUX.1 architectures as diffusers folders with random weights.

The cost of an edit does not depend on the weights, so `bench_edit.py --model sdxl|sd3|flux`
times the real denoiser (and autoencoder) with random ones.  The dicts below are the values of
the released models' `config.json` files; keys left out have diffusers' defaults, which are the
released values.  The text encoders have the released output widths (what the denoiser reads)
but one layer each: they run once per edit, outside the timed loop.

`--layers N` builds a truncated denoiser for smoke runs on small machines: SDXL's transformer
depth per UNet level capped at N, SD3's first N joint blocks, FLUX's first N double-stream and
N single-stream blocks.  Everything else (widths, heads, the autoencoder) stays as released.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# ---- Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0) ----------------
SDXL_UNET = dict(  # unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 size ids x 256 + text_encoder_2's 1280
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_VAE = dict(  # vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
SDXL_SCHEDULER = dict(  # scheduler/scheduler_config.json (EulerDiscreteScheduler)
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
)

# ---- Stable Diffusion 3 medium (stabilityai/stable-diffusion-3-medium-diffusers) -----------
SD3_TRANSFORMER = dict(  # transformer/config.json: SD3Transformer2DModel's defaults, overridden
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD3_VAE = dict(  # vae/config.json
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # FlowMatchEulerDiscreteScheduler

# ---- FLUX.1-dev (black-forest-labs/FLUX.1-dev) ----------------------------------------------
FLUX_TRANSFORMER = dict(  # transformer/config.json: FluxTransformer2DModel's defaults + guidance
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)  # vae/config.json
FLUX_SCHEDULER = dict(  # scheduler/scheduler_config.json
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

SHARD = "2GB"  # weight-file shards: saving holds one shard's bytes in memory at a time
SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Family:
    """One released model: its denoiser and autoencoder configs and how to write a folder."""

    name: str  # the --model value
    released: str  # the released model the configs reproduce
    denoiser: str  # the diffusers class of the denoiser
    denoiser_config: dict
    vae_config: dict
    methods: tuple[str, ...]  # the editing methods timed by default
    default_dtype_cuda: str  # the dtype `load_model(dtype="auto")` picks on a GPU


FAMILIES = {
    "sdxl": Family("sdxl", "Stable Diffusion XL base 1.0", "UNet2DConditionModel",
                   SDXL_UNET, SDXL_VAE, ("dds",), "fp16"),
    "sd3": Family("sd3", "Stable Diffusion 3 medium", "SD3Transformer2DModel",
                  SD3_TRANSFORMER, SD3_VAE, ("dds", "flowedit"), "fp16"),
    "flux": Family("flux", "FLUX.1-dev", "FluxTransformer2DModel",
                   FLUX_TRANSFORMER, FLUX_VAE, ("dds", "flowedit"), "bf16"),
}


def denoiser_config(fam: Family, layers: int | None) -> tuple[dict, str | None]:
    """The denoiser's config, truncated to `layers` blocks when given, and a line saying how
    (None: the released depth)."""
    cfg = dict(fam.denoiser_config)
    if layers is None or layers >= max_depth(fam):
        return cfg, None
    if fam.name == "sdxl":
        full = cfg["transformer_layers_per_block"]
        cfg["transformer_layers_per_block"] = tuple(min(d, layers) for d in full)
        return cfg, (f"TRUNCATED: transformer blocks per UNet level {list(full)} -> "
                     f"{list(cfg['transformer_layers_per_block'])}")
    if fam.name == "sd3":
        cfg["num_layers"] = min(layers, cfg["num_layers"])
        return cfg, f"TRUNCATED: {cfg['num_layers']} of {SD3_TRANSFORMER['num_layers']} blocks"
    cfg["num_layers"] = min(layers, cfg["num_layers"])
    cfg["num_single_layers"] = min(layers, cfg["num_single_layers"])
    return cfg, (f"TRUNCATED: {cfg['num_layers']} of {FLUX_TRANSFORMER['num_layers']} "
                 f"double-stream and {cfg['num_single_layers']} of "
                 f"{FLUX_TRANSFORMER['num_single_layers']} single-stream blocks")


def max_depth(fam: Family) -> int:
    """The largest --layers that truncates anything (more is the released model)."""
    cfg = fam.denoiser_config
    if fam.name == "sdxl":
        return max(cfg["transformer_layers_per_block"])
    return max(cfg["num_layers"], cfg.get("num_single_layers", 0))


def _cls(name: str):
    import diffusers

    return getattr(diffusers, name)


def parameter_count(fam: Family, config: dict) -> tuple[int, int]:
    """(denoiser parameters and buffers, autoencoder and text encoders' parameters), counted
    on the meta device: nothing is allocated."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        den = _cls(fam.denoiser)(**config)
        rest = [AutoencoderKL(**fam.vae_config), *_text_encoders(fam.name)]
    n_den = sum(p.numel() for p in den.parameters()) + sum(b.numel() for b in den.buffers())
    n_rest = sum(p.numel() for m in rest for p in m.parameters())
    return n_den, n_rest


# ---- text encoders: released output widths, one layer -------------------------------------
def _clip(width: int, heads: int, projection: int | None, act: str):
    """A one-layer CLIP text encoder of the released width (with a projection if given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=1, num_attention_heads=heads,
                         max_position_embeddings=77, hidden_act=act, projection_dim=projection
                         or width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5():
    """A one-layer T5 encoder of T5-XXL's width (4096); the vocabulary is the test tokenizer's
    (`tests/tiny_t5.py`, trained at run time: no download)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=200, d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def _text_encoders(name: str) -> list:
    """The family's text encoders in the pipeline's order: CLIP-L (768), OpenCLIP-bigG (1280,
    projected to 1280), T5-XXL (4096)."""
    if name == "sdxl":
        return [_clip(768, 12, None, "quick_gelu"), _clip(1280, 20, 1280, "gelu")]
    if name == "sd3":
        return [_clip(768, 12, 768, "quick_gelu"), _clip(1280, 20, 1280, "gelu"), _t5()]
    return [_clip(768, 12, None, "quick_gelu"), _t5()]


def _t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_t5 import save_t5_tokenizer

    return T5TokenizerFast.from_pretrained(save_t5_tokenizer(folder))


def _pipeline(fam: Family, denoiser, vae, encoders: list, scratch: Path):
    """The stock diffusers pipeline of the family over these components."""
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )

    from dds.tokenizer import clip_tokenizer

    clip_g = clip_tokenizer()
    clip_g.pad_token = "!"  # OpenCLIP-bigG's tokenizer pads with "!"
    if fam.name == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=clip_tokenizer(), tokenizer_2=clip_g, unet=denoiser,
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    t5_tokenizer = _t5_tokenizer(scratch / "t5-tokenizer")
    if fam.name == "sd3":
        return StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
            vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer(),
            text_encoder_2=encoders[1], tokenizer_2=clip_g, text_encoder_3=encoders[2],
            tokenizer_3=t5_tokenizer)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
        text_encoder=encoders[0], tokenizer=clip_tokenizer(), text_encoder_2=encoders[1],
        tokenizer_2=t5_tokenizer, transformer=denoiser)


def write_folder(fam: Family, folder: Path, config: dict, device: torch.device,
                 dtype: torch.dtype, seed: int = 0) -> Path:
    """Build the family with random weights (the denoiser on `device`, where initialising
    billions of parameters is fastest, then cast to `dtype`) and save it with the stock
    pipeline's `save_pretrained` in `dtype`.  Written beside `folder` and renamed into place,
    so a run cut short leaves no half folder behind."""
    import shutil

    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(seed)
    with torch.device(device):
        denoiser = _cls(fam.denoiser)(**config)
    vae = AutoencoderKL(**fam.vae_config)
    encoders = _text_encoders(fam.name)
    if dtype != torch.float32:
        denoiser, encoders = denoiser.to(dtype), [e.to(dtype) for e in encoders]
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting and optional-processor notices
    transformers_logging.set_verbosity_error()
    try:
        pipe = _pipeline(fam, denoiser, vae, encoders, partial / "_scratch")
        pipe.save_pretrained(partial, safe_serialization=True, max_shard_size=SHARD)
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
    shutil.rmtree(partial / "_scratch", ignore_errors=True)
    del pipe, denoiser, vae, encoders
    partial.rename(folder)
    return folder
