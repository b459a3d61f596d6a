"""The model interface (dds.models): the schedule and conditioning objects, the Stable Diffusion
model on tiny folders built from configs (real CLIP tokenizer), and the registry."""

import json
import shutil

import pytest
import torch

from dds.errors import DDSError
from dds.models import Conditioning, Model, NoiseSchedule, is_builtin, load_model
from dds.models.registry import BUILTIN_DIR, BUILTIN_LABEL
from dds.models.stable_diffusion import StableDiffusionModel
from dds.score import v_to_eps


def _cond(b: int, seed: int = 0, pooled: bool = True) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(b, 77, 16, generator=g),
                        torch.randn(b, 8, generator=g) if pooled else None)


# ---- NoiseSchedule and Conditioning ------------------------------------------------------
def test_alpha_sigma_closed_form():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - betas, 0)
    sched = NoiseSchedule(a_bar.float())
    t = torch.tensor([0, 1, 499, 999])
    alpha, sigma = sched.alpha_sigma(t)
    for i, ti in enumerate(t.tolist()):  # a_bar_t = prod_{s<=t} (1 - beta_s)
        prod = 1.0
        for b in betas[: ti + 1].tolist():
            prod *= 1 - b
        assert alpha[i].item() == pytest.approx(prod**0.5, rel=1e-6)
        assert sigma[i].item() == pytest.approx((1 - prod) ** 0.5, abs=1e-5)  # f32 1 - a_bar
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(4), atol=1e-6)
    assert sched.num_timesteps == 1000 and sched.a_bar(3).item() == pytest.approx(
        float(a_bar[3]), rel=1e-6)
    a0, s0 = sched.alpha_sigma(torch.tensor(5))  # a 0-d t
    assert a0.shape == () and a0.item() == pytest.approx(float(a_bar[5]) ** 0.5, rel=1e-6)


def test_conditioning_ops_keep_every_field():
    a, b = _cond(2, 1), _cond(3, 2)
    c = Conditioning.cat([a, b])
    assert len(c) == 5 and c.embeds.shape == (5, 77, 16) and c.pooled.shape == (5, 8)
    assert torch.equal(c.embeds[2:], b.embeds) and torch.equal(c.pooled[:2], a.pooled)
    row = c[3]
    assert len(row) == 1 and torch.equal(row.pooled, b.pooled[1:2])
    assert torch.equal(row.embeds, b.embeds[1:2])
    part = c[1:4]
    assert torch.equal(part.pooled, c.pooled[1:4]) and torch.equal(part.embeds, c.embeds[1:4])
    e = row.expand(4)
    assert e.embeds.shape == (4, 77, 16) and e.pooled.shape == (4, 8)
    assert torch.equal(e.pooled[3], row.pooled[0]) and torch.equal(e.embeds[2], row.embeds[0])
    r = a.repeat(3)
    assert len(r) == 6 and torch.equal(r.pooled[4], a.pooled[0])
    assert torch.equal(r.embeds[5], a.embeds[1])
    h = a.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and h.pooled.dtype == torch.float16
    assert h.float().pooled.dtype == torch.float32
    # without a pooled embedding, the field stays None through every operation
    n = Conditioning.cat([_cond(1, pooled=False), _cond(2, pooled=False)])
    assert n.pooled is None and n[1].pooled is None and n.expand(3).pooled is None


def test_conditioning_subclass_fields_are_carried():
    from dataclasses import dataclass

    @dataclass(frozen=True, eq=False)
    class Masked(Conditioning):
        mask: torch.Tensor | None = None

    c = Masked(torch.randn(2, 4, 3), mask=torch.tensor([[1.0], [2.0]]))
    both = Conditioning.cat([c, c[1]])
    assert isinstance(both, Masked) and both.mask.flatten().tolist() == [1.0, 2.0, 2.0]
    assert c[0].expand(3).mask.flatten().tolist() == [1.0, 1.0, 1.0]
    assert c.repeat(2).mask.flatten().tolist() == [1.0, 2.0, 1.0, 2.0]


# ---- the Stable Diffusion model ----------------------------------------------------------
def test_sd_model_is_a_model(tiny_backend):
    assert isinstance(tiny_backend, Model)


def test_tokenizer_is_real_clip(tiny_backend):
    ids = tiny_backend.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_encode_uses_config_scaling_factor(tiny_backend):
    assert tiny_backend.scaling_factor == 0.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = tiny_backend.encode(x)
    assert z.shape == (2, 4, 8, 8)
    mean = tiny_backend.vae.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * 0.5)
    assert tiny_backend.decode(z).shape == (2, 3, 16, 16)
    assert tiny_backend.vae_scale_factor == 2 and tiny_backend.native_size == 16


def test_prompt_embedding_shape_and_long_prompt_length(tiny_backend):
    emb = tiny_backend.encode_prompt(["a red circle", ""])
    assert isinstance(emb, Conditioning) and emb.pooled is None
    assert emb.embeds.shape == (2, 77, 16)
    long = tiny_backend.encode_prompt(["cat " * 100])
    assert long.embeds.shape == (1, 77, 16)  # cut to what the text encoder reads
    assert tiny_backend.prompt_length("cat " * 100) == (102, 77)  # 100 words + start and end
    assert tiny_backend.prompt_length("a red circle") == (5, 77)
    assert len(tiny_backend.uncond()) == 1
    assert torch.allclose(tiny_backend.uncond().embeds, emb[1].embeds)
    assert tiny_backend.uncond() is tiny_backend.uncond()  # cached


def test_predict_eps_epsilon_model(tiny_backend):
    z, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    out = tiny_backend.predict_eps(z, t, Conditioning(emb))
    # atol: the CPU call is traced and split by rows (dds.models.trace), which rounds differently
    assert torch.allclose(out, tiny_backend.unet(z, t, encoder_hidden_states=emb).sample,
                          atol=1e-5)


def test_predict_eps_trace_matches_eager(tiny_backend):
    torch.manual_seed(3)
    z = torch.randn(4, 4, 8, 8)
    t = torch.tensor([50, 300, 600, 900])
    cond = tiny_backend.encode_prompt(["a red circle"] * 4)
    assert tiny_backend._call_frozen.enabled  # the CPU default
    traced = tiny_backend.predict_eps(z, t, cond)
    eager = tiny_backend.unet(z, t, encoder_hidden_states=cond.embeds).sample
    assert len(tiny_backend._call_frozen) >= 1
    assert torch.allclose(traced, eager, atol=1e-6)
    # with gradients on, the eager module runs (a trace is for frozen, no-grad calls)
    before = len(tiny_backend._call_frozen)
    with torch.enable_grad():
        tiny_backend._call_frozen(tiny_backend.unet, z[:3], t[:3], cond[:3])
    assert len(tiny_backend._call_frozen) == before


def test_predict_eps_converts_v_prediction(tiny_sd_v):
    b = StableDiffusionModel(tiny_sd_v, dtype="fp32", device="cpu")
    assert b.prediction_type == "v_prediction"
    z, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    v = b.unet(z, t, encoder_hidden_states=emb).sample
    eps = b.predict_eps(z, t, Conditioning(emb))
    assert torch.allclose(eps, v_to_eps(v, z, t, b.schedule),
                          atol=1e-5)  # the CPU call is row-split: rounding differs
    assert (eps - v).abs().max() > 1e-2  # converted, not passed through


def test_schedule_from_scheduler_config(tiny_backend):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert isinstance(tiny_backend.schedule, NoiseSchedule)
    assert torch.allclose(tiny_backend.schedule.alphas_cumprod, expected, atol=1e-6)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_loads(tiny_sd, dtype, torch_dtype):
    b = StableDiffusionModel(tiny_sd, dtype=dtype, device="cpu")
    assert b.unet.dtype == torch_dtype and b.vae.dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    out = b.predict_eps(z, torch.tensor([500]), b.encode_prompt(["a cat"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert b.uncond().dtype == torch_dtype


@pytest.mark.parametrize("remove,needle", [
    ("unet", "'unet' folder"),
    ("vae/diffusion_pytorch_model.safetensors", "weights in 'vae/'"),
    ("tokenizer/vocab.json tokenizer/tokenizer.json", "tokenizer files"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ("text_encoder/config.json", "text_encoder/config.json"),
])
def test_incomplete_folder_is_named(tiny_sd, tmp_path, remove, needle):
    broken = tmp_path / "m"
    shutil.copytree(tiny_sd, broken)
    for name in remove.split():
        target = broken / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    with pytest.raises(DDSError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        StableDiffusionModel(broken, device="cpu")


def test_unknown_model_id_is_one_sentence(tmp_path):
    with pytest.raises(DDSError, match="local Hugging Face cache"):
        StableDiffusionModel("nobody/no-such-model", device="cpu")


def test_model_folder_recommended_defaults(tiny_sd, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_sd, m)
    (m / "dds_edit_defaults.json").write_text(json.dumps({"guidance": 3.0, "lr": 0.2}))
    from dds.pipeline import edit_config

    b = StableDiffusionModel(m, device="cpu")
    cfg = edit_config(b, lr=0.5)  # the folder's guidance, the caller's lr, the family's schedule
    assert (cfg.guidance, cfg.lr, cfg.steps, cfg.schedule, cfg.average_tail) == (
        3.0, 0.5, 50, "stratified", 0.2)
    assert edit_config(b, schedule="reference").steps == 200


# ---- copies of the denoiser, and predicting through them --------------------------------
def _first_weight(module) -> torch.Tensor:
    return next(module.parameters())


def test_copy_denoiser_is_independent(tiny_backend):
    own = _first_weight(tiny_backend.denoiser)
    before = own.detach().clone()
    frozen = tiny_backend.copy_denoiser()
    assert frozen is not tiny_backend.denoiser
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = tiny_backend.copy_denoiser(trainable=True)
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training
    with torch.no_grad():
        _first_weight(trainable).add_(1.0)
        _first_weight(frozen).mul_(3.0)
    assert torch.equal(own, before)
    assert not any(p.requires_grad for p in tiny_backend.denoiser.parameters())
    half = tiny_backend.copy_denoiser(torch.bfloat16)
    assert _first_weight(half).dtype == torch.bfloat16 and own.dtype == torch.float32


@pytest.mark.parametrize("which", ["epsilon", "v_prediction"])
def test_eps_fn_of_a_copy_is_predict_eps(tiny_backend, tiny_sd_v, which):
    model = tiny_backend if which == "epsilon" else StableDiffusionModel(
        tiny_sd_v, dtype="fp32", device="cpu")
    g = torch.Generator().manual_seed(7)
    z, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([20, 400, 950])
    cond = model.encode_prompt(["a red circle", "a blue square", ""])
    copy = model.copy_denoiser()
    eps = model.predict_eps(z, t, cond)
    # atol: predict_eps runs the traced, row-split call on the CPU; eps_fn the eager module
    assert torch.allclose(model.eps_fn(copy)(z, t, cond), eps, atol=1e-5)
    assert torch.equal(model.eps_fn(copy, call=model._call_frozen)(z, t, cond), eps)
    with torch.no_grad():
        for p in copy.parameters():
            p.mul_(0.5)
    assert (model.eps_fn(copy)(z, t, cond) - eps).abs().max() > 1e-3  # it is the copy's output
    assert torch.equal(model.predict_eps(z, t, cond), eps)  # the model's own is unchanged


def test_fast_denoiser_shares_or_copies(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor

    m = StableDiffusionModel(tiny_sd, dtype="fp32", device="cpu")
    assert m.fast_denoiser() is m.denoiser  # already fp32 with fused attention
    assert m.attention_kernels(m.denoiser) == ["AttnProcessor2_0"]
    half = m.fast_denoiser(torch.bfloat16)
    assert half is not m.denoiser and _first_weight(half).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in half.parameters()) and not half.training
    private = m.fast_denoiser(private=True)
    assert private is not m.denoiser
    m.denoiser.set_attn_processor(AttnProcessor())  # a model running the plain attention
    fused = m.fast_denoiser()
    assert fused is not m.denoiser and m.attention_kernels(fused) == ["AttnProcessor2_0"]
    assert m.attention_kernels(m.denoiser) == ["AttnProcessor"]  # the model's own stays
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    cond = m.encode_prompt(["a cat", "a dog"])
    assert torch.allclose(m.eps_fn(fused)(z, t, cond), m.eps_fn(m.denoiser)(z, t, cond),
                          atol=1e-5)


# ---- identity and the registry -----------------------------------------------------------
def test_identity_hash_follows_the_configs(tiny_sd, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_sd, m)
    first = StableDiffusionModel(m, device="cpu").identity()
    assert first["family"] == "stable-diffusion" and first["name"] == "m"
    assert first["prediction"] == "epsilon" and len(first["hash"]) == 16
    assert StableDiffusionModel(m, device="cpu").identity() == first  # stable
    cfg_file = m / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["beta_end"] = 0.0121
    cfg_file.write_text(json.dumps(cfg))
    second = StableDiffusionModel(m, device="cpu").identity()
    assert second["hash"] != first["hash"] and second["name"] == first["name"]


def test_load_model_labels_the_builtin_model(tiny_sd):
    if not (BUILTIN_DIR / "model_index.json").is_file():
        pytest.skip("the built-in model is not in this checkout")
    for spec in (None, BUILTIN_DIR, str(BUILTIN_DIR / "unet" / "..")):
        m = load_model(spec, device="cpu")
        assert m.label == BUILTIN_LABEL and is_builtin(m), spec
        assert m.identity()["name"] == BUILTIN_LABEL
    other = load_model(tiny_sd, device="cpu")
    assert other.label == "model" and not is_builtin(other)
