"""SD3 / SD3.5 against the stock diffusers pipeline on a tiny random folder built from configs.

Every test compares dds's tensors with what `StableDiffusion3Pipeline` computes from the same
folder: conditioning (with and without the T5 encoder), noising, the sampler's noise levels,
the autoencoder's scaling and the transformer's call converted to eps.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from dds.errors import DDSError

PROMPTS = ["a photo of a cat", "a red circle on a wooden table by the sea at night " * 8]


def make_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Save a complete, tiny, random SD3.5-format folder (the MMDiT-X variant: a dual-attention
    layer and RMS-normed q/k) with the real CLIP tokenizers and a test T5 tokenizer.

    Widths differ on purpose (CLIP-L 16, CLIP-G 24, T5 48) so that a swapped or unpadded part
    changes a shape; 16 latent channels with shift and scale factors like SD3's VAE."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dds.tokenizer import clip_tokenizer
    from tiny_t5 import save_t5_tokenizer

    torch.manual_seed(seed)

    def clip(width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))

    t5 = T5EncoderModel(T5Config(
        vocab_size=200, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
        caption_projection_dim=16, pooled_projection_dim=16 + 24, pos_embed_max_size=16,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"  # as SD3's CLIP-G tokenizer pads
    t5_dir = save_t5_tokenizer(folder.parent / "t5-tokenizer")
    from transformers import T5TokenizerFast

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(16), tokenizer=clip_tokenizer(), text_encoder_2=clip(24),
        tokenizer_2=tokenizer_2, text_encoder_3=t5,
        tokenizer_3=T5TokenizerFast.from_pretrained(t5_dir))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    """A copy of a model folder without the named files or folders (weights are linked)."""
    def ignore(_dir, entries):
        return [e for e in entries if e in names]

    shutil.copytree(src, dst, ignore=ignore, copy_function=_link)
    return dst


def _link(src, dst):
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "model")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tiny_sd3, tmp_path_factory) -> Path:
    """The same folder without the T5 encoder, as a user who skipped downloading it has it."""
    return copy_without(tiny_sd3, tmp_path_factory.mktemp("tiny-sd3-no-t5") / "model",
                        "text_encoder_3", "tokenizer_3")


@pytest.fixture(scope="session")
def sd3(tiny_sd3):
    from dds.models.sd3 import SD3Model

    return SD3Model(tiny_sd3, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def sd3_pipe(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


def _pipeline_encode(pipe, prompts):
    with torch.no_grad():
        return pipe.encode_prompt(prompts, None, None, device="cpu",
                                  do_classifier_free_guidance=True)


# ---- conditioning ---------------------------------------------------------------------------
def test_encode_prompt_is_the_pipelines(sd3, sd3_pipe):
    embeds, neg, pooled, neg_pooled = _pipeline_encode(sd3_pipe, PROMPTS)
    cond = sd3.encode_prompt(PROMPTS)
    assert cond.embeds.shape == (2, 77 + 256, 48) and cond.pooled.shape == (2, 40)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.embeds[:, :77, 40:].abs().max() == 0  # CLIP padded to the T5 width
    assert cond.guidance is None
    assert torch.equal(cond[1].embeds, embeds[1:]) and torch.equal(cond[1].pooled, pooled[1:])
    # The pipeline's negative prompt "" for one prompt (a batch of one, as a CPU matmul's
    # rounding can depend on the number of rows).
    _, neg, _, neg_pooled = _pipeline_encode(sd3_pipe, PROMPTS[:1])
    un = sd3.uncond()
    assert len(un) == 1
    assert torch.equal(un.embeds, neg) and torch.equal(un.pooled, neg_pooled)
    assert sd3.prompt_length(PROMPTS[1])[1] == 77 and sd3.prompt_length(PROMPTS[1])[0] > 77


def test_without_t5_the_pipelines_zeros(tiny_sd3_no_t5):
    """A folder without text_encoder_3/ and tokenizer_3/ (its model_index.json still lists
    them) loads through the registry; T5's tokens are the pipeline's zeros."""
    from diffusers import StableDiffusion3Pipeline

    from dds.models.registry import load_model
    from dds.models.sd3 import SD3Model

    model = load_model(tiny_sd3_no_t5, dtype="fp32", device="cpu")
    assert isinstance(model, SD3Model) and model.text_encoder_3 is None
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_no_t5, text_encoder_3=None,
                                                    tokenizer_3=None)
    embeds, neg, pooled, neg_pooled = _pipeline_encode(pipe, PROMPTS)
    cond = model.encode_prompt(PROMPTS)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.embeds[:, 77:].abs().max() == 0
    assert torch.equal(model.uncond().embeds[:, 77:], neg[:1, 77:])


# ---- forward process and sampler ------------------------------------------------------------
def test_schedule_is_the_schedulers(sd3, sd3_pipe):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        retrieve_timesteps,
    )

    sched = sd3.schedule
    assert sched.kind == "flow" and sd3.prediction_type == "flow"
    fresh = copy.deepcopy(sd3_pipe.scheduler)
    assert torch.equal(sched.sigmas, fresh.sigmas.flip(0))  # ascending, shifted by 3
    idx = torch.tensor([0, 1, 500, 998, 999])
    assert torch.equal(sched.timestep(idx), fresh.timesteps.flip(0)[idx])
    for n in (1, 4, 28, 50):
        pipe_sched = copy.deepcopy(sd3_pipe.scheduler)
        timesteps, _ = retrieve_timesteps(pipe_sched, n, "cpu")
        assert torch.equal(sched.sampler(n), pipe_sched.sigmas[:-1])
        assert torch.equal(sched.sampling_timesteps(n), timesteps)
    assert sd3.schedule_for((1, 16, 40, 24)) is sched  # static shift: one schedule


def test_noising_is_scale_noise(sd3, sd3_pipe):
    from dds.score import noise_input

    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    pipe_sched = copy.deepcopy(sd3_pipe.scheduler)
    pipe_sched.set_timesteps(50)
    t = pipe_sched.timesteps[torch.tensor([0, 17, 33, 49])]  # what img2img / FlowEdit noise at
    assert torch.equal(noise_input(z, eps, t, sd3.schedule), pipe_sched.scale_noise(z, t, eps))
    # At the training table's levels t = 1000 s; t / 1000 may differ from s in the last bit.
    fresh = copy.deepcopy(sd3_pipe.scheduler)
    t = sd3.schedule.timestep(torch.tensor([3, 250, 640, 999]))
    assert torch.allclose(noise_input(z, eps, t, sd3.schedule), fresh.scale_noise(z, t, eps),
                          rtol=0, atol=1e-6)


# ---- autoencoder ----------------------------------------------------------------------------
def test_vae_scaling_is_the_pipelines(sd3, sd3_pipe):
    vae = sd3_pipe.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert (sd3.shift_factor, sd3.scaling_factor) == (shift, scale)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = (vae.encode(image).latent_dist.mean - shift) * scale  # as SD3 img2img / FlowEdit
        x = vae.decode(z / scale + shift).sample.clamp(-1, 1)  # as the pipeline's decode
    assert torch.equal(sd3.encode(image), z)
    assert z.shape == (1, 16, 8, 8)
    assert torch.equal(sd3.decode(z), x)


# ---- the transformer ------------------------------------------------------------------------
def test_predict_eps_is_the_transformers_velocity(sd3, sd3_pipe):
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 16, 8, 6, generator=g)
    t = sd3.schedule.sampling_timesteps(50)[torch.tensor([5, 30])]  # (B,) float, t = 1000 s
    embeds, _, pooled, _ = _pipeline_encode(sd3_pipe, PROMPTS)
    with torch.no_grad():
        v = sd3_pipe.transformer(hidden_states=z_t, timestep=t, encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
    expected = z_t + (1 - t / 1000).view(-1, 1, 1, 1) * v  # v = eps - z
    cond = sd3.encode_prompt(PROMPTS)
    eager = sd3.eps_fn(sd3.denoiser)(z_t, t, cond)
    assert torch.equal(eager, expected)
    traced = sd3.predict_eps(z_t, t, cond)  # traced on the CPU by default
    assert sd3._call_frozen.enabled and len(sd3._call_frozen) > 0
    assert torch.allclose(traced, eager, rtol=0, atol=1e-5)
    one = sd3.predict_eps(z_t[:1], t[0], cond[:1])  # a 0-dim t is broadcast
    assert torch.allclose(one, eager[:1], rtol=0, atol=1e-5)


# ---- the folder -----------------------------------------------------------------------------
def test_model_attributes(sd3):
    assert (sd3.family, sd3.native_size, sd3.latent_channels, sd3.vae_scale_factor) == (
        "sd3", 16, 16, 2)
    assert (sd3.size_multiple, sd3.max_image_side) == (4, 64)
    assert not sd3.guidance_embedded
    assert sd3.edit_defaults["flowedit"]["n_max"] == 33
    assert sd3.identity()["prediction"] == "flow"


@pytest.mark.parametrize("missing, named", [
    ("transformer", "the 'transformer' folder"),
    ("tokenizer_2", "the 'tokenizer_2' folder"),
    ("diffusion_pytorch_model.safetensors", "the weights in 'transformer/'"),
    ("tokenizer_3", "lacks the 'tokenizer_3' folder"),
])
def test_missing_component_is_one_sentence(tiny_sd3, tmp_path, missing, named):
    from dds.models.sd3 import SD3Model

    folder = tiny_sd3
    if missing == "diffusion_pytorch_model.safetensors":  # only the transformer's weights
        folder = copy_without(tiny_sd3, tmp_path / "m")
        (folder / "transformer" / missing).unlink()
    else:
        folder = copy_without(tiny_sd3, tmp_path / "m", missing)
    with pytest.raises(DDSError) as e:
        SD3Model(folder, dtype="fp32", device="cpu")
    msg = str(e.value)
    assert named in msg and "\n" not in msg


def test_dynamic_shift_follows_the_pipelines_mu(sd3):
    """A scheduler configured for the resolution-dependent shift: the pipeline's mu from the
    number of image patches, and its sampler with that mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
        retrieve_timesteps,
    )

    sched = FlowMatchEulerDiscreteScheduler.from_config(
        {**sd3.scheduler.config, "use_dynamic_shifting": True})
    model = copy.copy(sd3)  # the same model with that scheduler
    model.scheduler = sched
    for shape in [(1, 16, 8, 8), (1, 16, 40, 24)]:
        c = sched.config  # read as the pipeline reads it
        mu = calculate_shift((shape[2] // 2) * (shape[3] // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                             c.get("max_shift", 1.16))
        schedule = model.schedule_for(shape)
        assert schedule.sigmas[-1] == sched.time_shift(mu, 1.0, torch.tensor(1.0))
        s = copy.deepcopy(sched)
        retrieve_timesteps(s, 28, "cpu", mu=mu)
        assert torch.equal(schedule.sampler(28), s.sigmas[:-1])
