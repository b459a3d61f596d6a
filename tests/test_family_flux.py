"""FLUX.1 (dev and schnell): dds's model against the stock FluxPipeline on tiny random folders.

Every test compares `dds.models.flux.FluxModel` with what diffusers' own `FluxPipeline` (loaded
from the same folder) computes: prompt encoding, packing and positions, the size-dependent
schedule and noising, the autoencoder's scaling, and the transformer's call converted to eps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dds.errors import DDSError
from tiny_t5 import save_t5_tokenizer

PROMPTS = ["a photo of a cat", "a red circle on a wooden table"]


def tiny_flux_transformer(guidance_embeds: bool = True):
    """A tiny random FLUX transformer (diffusers' test sizes) for 16-channel latents."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8],
    )


def make_tiny_flux(folder: Path, seed: int = 0) -> Path:
    """Save a complete, tiny, random FLUX.1-dev-format folder (guidance embedded) with the real
    CLIP tokenizer and a test T5 tokenizer; sizes as diffusers' tests."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from dds.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ))
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    tokenizer_2 = T5TokenizerFast.from_pretrained(
        save_t5_tokenizer(Path(folder).parent / "t5-tokenizer"))
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose weight files are links to the original's (cheap)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for p in src.rglob("*.safetensors"):
        (dst / p.relative_to(src)).symlink_to(p)
    return dst


def make_tiny_flux_schnell(dev: Path, folder: Path, seed: int = 1) -> Path:
    """A FLUX.1-schnell-format folder: `dev`'s with a transformer without guidance embeds."""
    copy_model(dev, folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(seed)
    tiny_flux_transformer(guidance_embeds=False).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tiny_flux, tmp_path_factory) -> Path:
    return make_tiny_flux_schnell(tiny_flux, tmp_path_factory.mktemp("tiny-flux-schnell") / "m")


@pytest.fixture(scope="session")
def flux(tiny_flux):
    from dds.models.flux import FluxModel

    return FluxModel(tiny_flux, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux)


def _fresh_scheduler(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def _encode(pipe, prompts, **kw):
    """The pipeline's encode_prompt as its __call__ runs it: without gradients (T5 computes
    with other kernels, and other rounding, when autograd records)."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device="cpu", **kw)


def _mu(pipe, h: int, w: int) -> float:
    """The pipeline's mu for (h, w) latents: its calculate_shift on the packed token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    return calculate_shift((h // 2) * (w // 2), c.get("base_image_seq_len", 256),
                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                           c.get("max_shift", 1.15))


# ---- conditioning -------------------------------------------------------------------------
def test_encode_prompt_matches_pipeline(flux, flux_pipe):
    embeds, pooled, txt_ids = _encode(flux_pipe, PROMPTS, max_sequence_length=512)
    cond = flux.encode_prompt(PROMPTS)
    assert cond.embeds.shape == (2, 512, 32) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.embeds, embeds)
    assert torch.equal(cond.pooled, pooled)
    assert torch.equal(cond.guidance, torch.full((2,), 3.5))

    from dds.models.flux import text_ids

    assert torch.equal(text_ids(cond.embeds.shape[1]), txt_ids)
    e0, p0, _ = _encode(flux_pipe, "")
    assert torch.equal(flux.uncond().embeds, e0) and torch.equal(flux.uncond().pooled, p0)


def test_prompt_length_is_clips(flux):
    n, limit = flux.prompt_length("a photo of a cat")
    assert (n, limit) == (7, 77)
    assert flux.prompt_length("cat " * 100) == (102, 77)


def test_packing_and_positions_match_pipeline(flux_pipe):
    from dds.models.flux import image_ids, pack_latents, unpack_latents

    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(z)
    assert torch.equal(packed, flux_pipe._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), z)
    vsf = flux_pipe.vae_scale_factor
    assert torch.equal(unpack_latents(packed, 6, 10),
                       flux_pipe._unpack_latents(packed, 6 * vsf, 10 * vsf, vsf))
    assert torch.equal(image_ids(6, 10), flux_pipe._prepare_latent_image_ids(2, 3, 5, "cpu",
                                                                            torch.float32))


# ---- schedule and noising -----------------------------------------------------------------
@pytest.mark.parametrize("hw", [(8, 8), (32, 48), (128, 128)])
def test_sampler_matches_retrieve_timesteps(flux, flux_pipe, hw):
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    schedule = flux.schedule_for((1, 16, *hw))
    for n in (1, 4, 28, 50):
        sched = _fresh_scheduler(flux_pipe)
        retrieve_timesteps(sched, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=_mu(flux_pipe, *hw))
        assert torch.equal(schedule.sampler(n), sched.sigmas[:-1])
        assert torch.equal(schedule.sampling_timesteps(n), sched.timesteps)


def test_training_sigmas_are_the_shifted_training_levels(flux, flux_pipe):
    from dds.models.base import shift_sigmas

    sched = _fresh_scheduler(flux_pipe)
    mu = _mu(flux_pipe, 32, 48)
    sigmas = flux.schedule_for((1, 16, 32, 48)).sigmas
    train = sched.sigmas.numpy()  # the scheduler's unshifted training levels, descending
    sched.set_timesteps(sigmas=train, mu=mu)
    assert sigmas.shape == (1000,) and torch.all(sigmas[1:] > sigmas[:-1])
    assert torch.equal(sigmas, sched.sigmas[:-1].flip(0))
    s = torch.from_numpy(train)
    assert np.array_equal(shift_sigmas(train, mu=mu), sched.time_shift(mu, 1.0, train))
    torch.testing.assert_close(shift_sigmas(s, mu=mu).flip(0), sigmas)


def test_native_schedule_is_the_native_size(flux):
    assert flux.native_size == 128 * flux.vae_scale_factor
    native = flux.schedule_for((1, 16, 128, 128))
    assert flux.schedule is native
    assert not torch.equal(flux.schedule_for((1, 16, 16, 16)).sigmas, native.sigmas)


def test_noise_input_matches_scale_noise(flux, flux_pipe):
    from dds.score import noise_input

    schedule = flux.schedule_for((2, 16, 8, 12))
    sched = _fresh_scheduler(flux_pipe)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=_mu(flux_pipe, 8, 12))
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    for i in range(28):
        t = sched.timesteps[i].expand(2)
        want = sched.scale_noise(z, t, eps)
        assert torch.equal(noise_input(z, eps, t, schedule), want), i
    idx = torch.tensor([0, 999])
    t = schedule.timestep(idx)
    torch.testing.assert_close(t / 1000, schedule.sigmas[idx])


# ---- autoencoder ---------------------------------------------------------------------------
def test_vae_scaling_matches_pipeline(flux, flux_pipe):
    vae = flux_pipe.vae
    assert flux.latent_channels == 16 and flux.vae_scale_factor == 2
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(img).latent_dist.mean
        z = flux.encode(img)
        assert torch.equal(z, (mean - vae.config.shift_factor) * vae.config.scaling_factor)
        want = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert torch.equal(flux.decode(z), want.clamp(-1, 1))


# ---- the transformer's call ---------------------------------------------------------------
def _reference_eps(pipe, z_t, t, embeds, pooled, txt_ids, guidance):
    """The pipeline's own transformer call on packed latents, unpacked, as eps."""
    b, c, h, w = z_t.shape
    vsf = pipe.vae_scale_factor
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=pipe._pack_latents(z_t, b, c, h, w), timestep=t / 1000,
            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=txt_ids, img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                    z_t.dtype),
            return_dict=False)[0]
    v = pipe._unpack_latents(v, h * vsf, w * vsf, vsf)
    return z_t + (1 - t / 1000).reshape(-1, 1, 1, 1) * v


def _inputs(seed=3, shape=(2, 16, 8, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.tensor([640.0, 128.5])


def test_predict_eps_matches_transformer_call(flux, flux_pipe):
    z_t, t = _inputs()
    embeds, pooled, txt_ids = _encode(flux_pipe, PROMPTS)
    want = _reference_eps(flux_pipe, z_t, t, embeds, pooled, txt_ids, torch.full((2,), 3.5))
    cond = flux.encode_prompt(PROMPTS)
    eager = flux.eps_fn(flux.denoiser)(z_t, t, cond)
    assert torch.equal(eager, want)
    traced = flux.predict_eps(z_t, t, cond)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    assert len(flux._call_frozen) >= 1  # the call was traced, not left eager


def test_guidance_is_an_input_of_dev(flux, flux_pipe):
    z_t, t = _inputs(4)
    cond = flux.encode_prompt(PROMPTS)
    assert flux.guidance_embedded
    eps_5 = flux.eps_fn(flux.denoiser)(z_t, t, cond.with_guidance(5.5))
    embeds, pooled, txt_ids = _encode(flux_pipe, PROMPTS)
    want = _reference_eps(flux_pipe, z_t, t, embeds, pooled, txt_ids, torch.full((2,), 5.5))
    assert torch.equal(eps_5, want)
    assert not torch.allclose(eps_5, flux.eps_fn(flux.denoiser)(z_t, t, cond))


def test_schnell_has_no_guidance_input(tiny_flux_schnell):
    from diffusers import FluxPipeline

    from dds.models.flux import FluxModel

    model = FluxModel(tiny_flux_schnell, dtype="fp32", device="cpu")
    pipe = FluxPipeline.from_pretrained(tiny_flux_schnell)
    assert not model.guidance_embedded
    cond = model.encode_prompt(PROMPTS)
    assert cond.guidance is None
    assert model.edit_defaults["guidance"] == 1.0
    z_t, t = _inputs(5, (2, 16, 4, 4))
    embeds, pooled, txt_ids = _encode(pipe, PROMPTS)
    want = _reference_eps(pipe, z_t, t, embeds, pooled, txt_ids, None)
    assert torch.equal(model.eps_fn(model.denoiser)(z_t, t, cond), want)


def test_odd_latents_are_refused_in_one_sentence(flux):
    cond = flux.encode_prompt(PROMPTS[:1])
    with pytest.raises(DDSError, match="multiples of 16") as e:
        flux.predict_eps(torch.zeros(1, 16, 7, 8), torch.tensor([500.0]), cond)
    assert "\n" not in str(e.value)
    with pytest.raises(DDSError, match="even"):
        flux.schedule_for((1, 16, 8, 9))


# ---- the folder ----------------------------------------------------------------------------
def test_dev_defaults_and_identity(flux):
    assert flux.family == "flux" and flux.prediction_type == "flow"
    assert flux.edit_defaults["guidance"] == 3.5 and flux.edit_defaults["lr"] == 0.1
    assert flux.edit_defaults["flowedit"] == {"steps": 28, "n_max": 24, "source_guidance": 1.5,
                                              "guidance": 5.5}
    assert flux.identity()["family"] == "flux"


def test_load_model_picks_flux(tiny_flux):
    from dds.models.flux import FluxModel
    from dds.models.registry import load_model

    assert isinstance(load_model(tiny_flux, dtype="fp32", device="cpu"), FluxModel)


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2", "transformer"])
def test_missing_component_is_one_sentence(tiny_flux, tmp_path, part):
    from dds.models.flux import FluxModel

    folder = copy_model(tiny_flux, tmp_path / "model")
    shutil.rmtree(folder / part)
    with pytest.raises(DDSError, match=part) as e:
        FluxModel(folder, dtype="fp32", device="cpu")
    assert "\n" not in str(e.value) and "FLUX.1" in str(e.value)


def test_unmodelled_scheduler_options_are_refused(tiny_flux, tmp_path):
    import json

    from dds.models.flux import FluxModel

    folder = copy_model(tiny_flux, tmp_path / "model")
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_karras_sigmas": True}))
    with pytest.raises(DDSError, match="use_karras_sigmas"):
        FluxModel(folder, dtype="fp32", device="cpu")
