"""The Stable Diffusion backend on tiny folders built from configs (real CLIP tokenizer)."""

import json
import shutil

import pytest
import torch

from dds.models import StableDiffusionModel
from dds.errors import DDSError
from dds.score import v_to_eps


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


def test_prompt_embedding_shape_and_long_prompt_warns(tiny_backend):
    emb = tiny_backend.encode_prompt(["a red circle", ""])
    assert emb.shape == (2, 77, 16)
    with pytest.warns(UserWarning, match="more than the text encoder's 77"):
        long = tiny_backend.encode_prompt(["cat " * 100])
    assert long.shape == (1, 77, 16)
    assert torch.allclose(tiny_backend.uncond(), emb[1:2])


def test_predict_eps_epsilon_model(tiny_backend):
    z, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    out = tiny_backend.predict_eps(z, t, emb)
    # atol: the CPU call is traced and split by rows (dds.models.trace), which rounds differently
    assert torch.allclose(out, tiny_backend.unet(z, t, encoder_hidden_states=emb).sample,
                          atol=1e-5)


def test_predict_eps_trace_matches_eager(tiny_backend):
    torch.manual_seed(3)
    z = torch.randn(4, 4, 8, 8)
    t = torch.tensor([50, 300, 600, 900])
    emb = tiny_backend.encode_prompt(["a red circle"] * 4)
    assert tiny_backend._unet_call.enabled  # the CPU default
    traced = tiny_backend.predict_eps(z, t, emb)
    eager = tiny_backend.unet(z, t, encoder_hidden_states=emb).sample
    assert len(tiny_backend._unet_call) >= 1
    assert torch.allclose(traced, eager, atol=1e-6)
    # with gradients on, the eager module runs (a trace is for frozen, no-grad calls)
    before = len(tiny_backend._unet_call)
    with torch.enable_grad():
        tiny_backend._unet_call(tiny_backend.unet, z[:3], t[:3], emb[:3])
    assert len(tiny_backend._unet_call) == before


def test_predict_eps_converts_v_prediction(tiny_sd_v):
    b = StableDiffusionModel(tiny_sd_v, dtype="fp32", device="cpu")
    assert b.prediction_type == "v_prediction"
    z, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 16)
    v = b.unet(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(b.predict_eps(z, t, emb), v_to_eps(v, z, t, b.alphas_cumprod),
                          atol=1e-5)  # the CPU call is row-split: rounding differs


def test_alphas_cumprod_from_scheduler_config(tiny_backend):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.allclose(tiny_backend.alphas_cumprod, expected, atol=1e-6)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_loads(tiny_sd, dtype, torch_dtype):
    b = StableDiffusionModel(tiny_sd, dtype=dtype, device="cpu")
    assert b.unet.dtype == torch_dtype and b.vae.dtype == torch.float32
    z = torch.randn(1, 4, 8, 8)
    out = b.predict_eps(z, torch.tensor([500]), b.encode_prompt(["a cat"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


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
    cfg = edit_config(b, lr=0.5)
    assert (cfg.guidance, cfg.lr, cfg.steps) == (3.0, 0.5, 200)
