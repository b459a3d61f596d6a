"""Shared fixtures: tiny Stable Diffusion folders built from configs (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_sd(folder: Path, prediction_type: str = "epsilon", scaling_factor: float = 0.5,
                 seed: int = 0) -> Path:
    """Save a complete, tiny, random SD1.x-format folder with the real CLIP tokenizer."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from dds.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v") / "model", "v_prediction")


@pytest.fixture(scope="session")
def tiny_backend(tiny_sd):
    from dds.models.stable_diffusion import StableDiffusionModel

    return StableDiffusionModel(tiny_sd, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def translate_cfg(tiny_sd):
    """translate_cfg(out, **overrides): a translation-training config on the tiny model that
    trains two tasks in seconds."""
    from dds.translate.train import TrainConfig

    def make(out, **kw):
        d = dict(out=str(out), model=str(tiny_sd), tasks=("circle:square", "circle:star"),
                 world_size=40, resolution=16, steps=4, batch_size=2, checkpoint_every=2,
                 val_every=2, val_images=2, log_every=1, device="cpu", quiet=True)
        return TrainConfig(**{**d, **kw})

    return make
