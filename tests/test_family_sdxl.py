"""The SDXL family (dds.models.sdxl) on a tiny random folder built from configs, against the
stock `StableDiffusionXLPipeline` loaded from the same folder: conditioning, size ids, the
autoencoder's scaling and the UNet's call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dds.errors import DDSError
from dds.models.sdxl import SDXLModel, add_time_ids
from dds.score import v_to_eps

PROMPTS = ["a red circle on a wooden table", "a photo of a cat " * 30]  # the second is cut


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a complete, tiny, random SDXL folder (two CLIP encoders with the real CLIP
    tokenizer; the second pads with "!" as OpenCLIP-bigG's does) with the stock pipeline."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dds.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 4 + 8,
        cross_attention_dim=32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.13025,
    )
    clip = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, hidden_act="gelu")
    text = CLIPTextModel(CLIPTextConfig(**clip, pad_token_id=49407))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, pad_token_id=0, projection_dim=8))
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def edited_copy(src: Path, dst: Path, edits: dict[str, dict]) -> Path:
    """A copy of a model folder with some JSON settings changed: {file: {key: value}}."""
    shutil.copytree(src, dst)
    for name, changes in edits.items():
        p = dst / name
        p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return dst


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl) -> SDXLModel:
    return SDXLModel(tiny_sdxl, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


@pytest.fixture(scope="session")
def sdxl_variant(tiny_sdxl, tmp_path_factory) -> SDXLModel:
    """The tiny folder as a v-prediction fine-tune that encodes "" for the unconditional
    branch (force_zeros_for_empty_prompt off)."""
    folder = edited_copy(tiny_sdxl, tmp_path_factory.mktemp("tiny-sdxl-v") / "model", {
        "model_index.json": {"force_zeros_for_empty_prompt": False},
        "scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}})
    return SDXLModel(folder, dtype="fp32", device="cpu")


def _pipe_cond(pipe, prompts):
    """The pipeline's (embeds, negative embeds, pooled, negative pooled) for `prompts`."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device=torch.device("cpu"),
                                  do_classifier_free_guidance=True)


# ---- conditioning ------------------------------------------------------------------------
def test_encode_prompt_matches_pipeline(sdxl, pipe):
    embeds, neg, pooled, neg_pooled = _pipe_cond(pipe, PROMPTS)
    cond = sdxl.encode_prompt(PROMPTS)
    assert cond.embeds.shape == (2, 77, 32) and cond.pooled.shape == (2, 8)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, as the pipeline's
    assert sdxl.force_zeros and not neg.any() and not neg_pooled.any()
    uncond = sdxl.uncond()
    assert torch.equal(uncond.expand(2).embeds, neg)
    assert torch.equal(uncond.expand(2).pooled, neg_pooled)
    assert sdxl.prompt_length(PROMPTS[1]) == (len(pipe.tokenizer(PROMPTS[1]).input_ids), 77)
    assert sdxl.tokenizer_2.pad_token_id == 0 != sdxl.tokenizer.pad_token_id  # "!" pads bigG


def test_uncond_encodes_empty_prompt_without_force_zeros(sdxl_variant, pipe):
    from diffusers import StableDiffusionXLPipeline

    stock = StableDiffusionXLPipeline(**pipe.components, force_zeros_for_empty_prompt=False)
    _, neg, _, neg_pooled = _pipe_cond(stock, ["a blue square"])
    assert not sdxl_variant.force_zeros and neg.abs().sum() > 0
    assert torch.equal(sdxl_variant.uncond().embeds, neg)
    assert torch.equal(sdxl_variant.uncond().pooled, neg_pooled)


def test_time_ids_match_pipeline(sdxl, pipe):
    for h, w in [(16, 16), (16, 24), (1024, 768)]:
        ref = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=torch.float32,
                                     text_encoder_projection_dim=8)
        assert torch.equal(add_time_ids(h, w), ref)


# ---- the autoencoder ---------------------------------------------------------------------
def test_vae_scaling_matches_pipeline(sdxl, pipe):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = sdxl.encode(x)
    with torch.no_grad():
        ref_z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ref_x = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert sdxl.scaling_factor == 0.13025 and sdxl.shift_factor == 0.0
    assert torch.equal(z, ref_z) and z.shape == (1, 4, 8, 12)
    assert torch.equal(sdxl.decode(z), ref_x.clamp(-1, 1))


def test_vae_precision_follows_force_upcast(tiny_sdxl, tmp_path):
    from dds.models.registry import load_model

    # force_upcast (SDXL's own VAE overflows in fp16): the autoencoder stays float32
    model = load_model(tiny_sdxl, dtype="bf16", device="cpu")
    assert isinstance(model, SDXLModel) and model.family == "sdxl"
    assert model.vae_dtype == torch.float32 and model.denoiser.dtype == torch.bfloat16
    folder = edited_copy(tiny_sdxl, tmp_path / "m", {"vae/config.json": {"force_upcast": False}})
    model = SDXLModel(folder, dtype="bf16", device="cpu")
    assert model.vae_dtype == torch.bfloat16 and model.vae.dtype == torch.bfloat16
    z = model.encode(torch.zeros(1, 3, 16, 16))
    assert z.dtype == torch.float32 and model.decode(z).dtype == torch.float32


# ---- the denoiser ------------------------------------------------------------------------
def _pipeline_unet_eps(pipe, z, t, prompts):
    """The UNet called as the pipeline calls it (its own conditioning and size ids)."""
    embeds, _, pooled, _ = _pipe_cond(pipe, prompts)
    h, w = z.shape[-2] * pipe.vae_scale_factor, z.shape[-1] * pipe.vae_scale_factor
    ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=embeds.dtype,
                                 text_encoder_projection_dim=8).repeat(z.shape[0], 1)
    with torch.no_grad():
        return pipe.unet(z, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def test_predict_eps_matches_pipeline_unet_call(sdxl, pipe):
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([30, 870])  # not square
    ref = _pipeline_unet_eps(pipe, z, t, PROMPTS)
    cond = sdxl.encode_prompt(PROMPTS)
    eager = sdxl.eps_fn(sdxl.denoiser)
    assert torch.equal(eager(z, t, cond), ref)
    # the size ids follow the latent's size: another size is another conditioning
    square = z[:, :, :, :8]
    assert torch.equal(eager(square, t, cond), _pipeline_unet_eps(pipe, square, t, PROMPTS))
    assert sdxl._call_frozen.enabled  # the CPU default: traced and split by rows
    traced = sdxl.predict_eps(z, t, cond)
    assert len(sdxl._call_frozen) >= 1
    # atol: the traced call is split by rows, which rounds differently
    assert torch.allclose(traced, ref, atol=1e-5)


def test_predict_eps_converts_v_prediction(sdxl_variant, pipe):
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    v = _pipeline_unet_eps(pipe, z, t, PROMPTS)  # the same weights, read as a velocity
    model = sdxl_variant
    eps = model.eps_fn(model.denoiser)(z, t, model.encode_prompt(PROMPTS))
    assert model.prediction_type == "v_prediction"
    assert torch.equal(eps, v_to_eps(v, z, t, model.schedule))


def test_schedule_and_sizes(sdxl, pipe):
    assert torch.equal(sdxl.schedule.alphas_cumprod, pipe.scheduler.alphas_cumprod.float())
    assert sdxl.native_size == 16 and sdxl.latent_channels == 4 and sdxl.vae_scale_factor == 2
    assert sdxl.edit_defaults["guidance"] == 7.5 and sdxl.edit_defaults["lr"] == 0.1
    assert sdxl.identity()["family"] == "sdxl" and not sdxl.guidance_embedded


# ---- folders -----------------------------------------------------------------------------
@pytest.mark.parametrize("part,needle", [
    ("text_encoder_2", "the 'text_encoder_2' folder"),
    ("tokenizer_2/tokenizer.json", "the tokenizer files in 'tokenizer_2/'"),
    ("unet/diffusion_pytorch_model.safetensors", "the weights in 'unet/'"),
])
def test_missing_component_is_one_sentence(tiny_sdxl, tmp_path, part, needle):
    folder = edited_copy(tiny_sdxl, tmp_path / "m", {})
    target = folder / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DDSError) as err:
        SDXLModel(folder, dtype="fp32", device="cpu")
    msg = str(err.value)
    assert needle in msg and "SDXL" in msg and "\n" not in msg


@pytest.mark.parametrize("edits,needle", [
    ({"unet/config.json": {"addition_embed_type": None}}, "not the refiner"),
    ({"vae/config.json": {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}},
     "latents_mean"),
    ({"scheduler/scheduler_config.json": {"prediction_type": "sample"}}, "'sample'"),
])
def test_unsupported_folder_is_one_sentence(tiny_sdxl, tmp_path, edits, needle):
    folder = edited_copy(tiny_sdxl, tmp_path / "m", edits)
    with pytest.raises(DDSError, match=needle) as err:
        SDXLModel(folder, dtype="fp32", device="cpu")
    assert "\n" not in str(err.value)
