"""The fast editing path makes the same edit as `edit_latents`; the benchmark script runs."""

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dds.fast import FastEditor, _clone_cond, _copy_cond, fast_edit_latents
from dds.loop import EditConfig, edit_latents
from dds.models.base import Conditioning

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_edit.py"


@pytest.fixture(scope="module")
def inputs(tiny_backend):
    torch.manual_seed(1)
    z_hat = tiny_backend.encode(torch.rand(2, 3, 16, 16) * 2 - 1)  # (2,4,8,8)
    emb_s = tiny_backend.encode_prompt(["a red circle", "a green star"])
    emb_t = tiny_backend.encode_prompt(["a blue square", "a green cross"])
    return z_hat, emb_s, emb_t


@pytest.mark.parametrize("method", ["dds", "sds"])
def test_same_edit_as_edit_latents(tiny_backend, inputs, method):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(method=method, steps=5, seed=4, weight_a=0.5)
    ref = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg)
    assert (ref - z_hat).abs().max() > 1e-2  # it moved
    # A batch of two edits.
    fast = fast_edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg, precision="fp32")
    assert torch.allclose(fast, ref, atol=1e-5)
    # One edit alone, with the second edit's seed: the same as its row of the batch.
    one = fast_edit_latents(
        tiny_backend, z_hat[1:], emb_s[1:], emb_t[1:], cfg, seeds=[5], precision="fp32"
    )
    assert torch.allclose(one, ref[1:], atol=1e-5)


def test_trace_is_the_cpu_default_and_changes_nothing(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(steps=4, seed=2)
    traced = FastEditor(tiny_backend, precision="fp32")
    assert traced.trace  # CPU, nothing compiled: the UNet call is traced
    eager = FastEditor(tiny_backend, precision="fp32", trace=False)
    a = traced.edit(z_hat, emb_s, emb_t, cfg)
    b = eager.edit(z_hat, emb_s, emb_t, cfg)
    assert len(traced._traced) == 1 and not eager._traced  # one trace for the one shape
    assert (a - z_hat).abs().max() > 1e-3
    assert torch.allclose(a, b, atol=1e-5)
    # A new batch size is a new shape: traced again, still the same edit.
    one = traced.edit(z_hat[:1], emb_s[:1], emb_t[:1], cfg)
    assert len(traced._traced) == 2
    assert torch.allclose(one, b[:1], atol=1e-5)


def test_bf16_close(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(steps=5, seed=4)
    ref = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg)
    ed = FastEditor(tiny_backend, precision="bf16")
    out = ed.edit(z_hat, emb_s, emb_t, cfg)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1
    assert next(tiny_backend.denoiser.parameters()).dtype == torch.float32  # model left alone
    assert ed.unet is not tiny_backend.denoiser


def test_fast_uses_sdpa_and_caches_prompts(tiny_backend, monkeypatch):
    ed = FastEditor(tiny_backend)
    assert ed.attention == ["AttnProcessor2_0"]  # torch's fused scaled_dot_product_attention
    assert ed.unet is tiny_backend.denoiser  # fp32 on the CPU: the model's own, shared
    calls = []
    encode = tiny_backend.encode_prompt
    monkeypatch.setattr(tiny_backend, "encode_prompt", lambda p: calls.append(list(p)) or encode(p))
    emb = ed.prompt_embedding(["a cat", "a dog", "a cat"])
    ed.prompt_embedding(["a dog"])
    assert calls == [["a cat", "a dog"]]
    assert isinstance(emb, Conditioning) and len(emb) == 3
    assert torch.equal(emb[0].embeds, emb[2].embeds)
    assert torch.allclose(emb[:2].embeds, encode(["a cat", "a dog"]).embeds)
    assert not torch.allclose(emb[0].embeds, emb[1].embeds)


def test_channels_last_leaves_the_model_alone(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(steps=2, seed=1)
    ed = FastEditor(tiny_backend, precision="fp32", channels_last=True, trace=False)
    assert ed.unet is not tiny_backend.denoiser  # a private copy changes memory format
    conv = next(m for m in tiny_backend.denoiser.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # the model's own weights stay in the default format
    assert torch.allclose(ed.edit(z_hat, emb_s, emb_t, cfg),
                          edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg), atol=1e-5)


def test_graph_buffers_copy_every_conditioning_field():
    g = torch.Generator().manual_seed(0)
    a = Conditioning(torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, generator=g))
    b = Conditioning(torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, generator=g))
    buf = _clone_cond(a)
    assert torch.equal(buf.embeds, a.embeds) and torch.equal(buf.pooled, a.pooled)
    assert buf.embeds.data_ptr() != a.embeds.data_ptr()
    assert buf.pooled.data_ptr() != a.pooled.data_ptr()
    ptrs = (buf.embeds.data_ptr(), buf.pooled.data_ptr())
    _copy_cond(buf, b)  # in place: the captured addresses stay
    assert (buf.embeds.data_ptr(), buf.pooled.data_ptr()) == ptrs
    assert torch.equal(buf.embeds, b.embeds) and torch.equal(buf.pooled, b.pooled)
    assert not torch.equal(buf.embeds, a.embeds)


def test_cuda_graphs_fall_back_on_cpu(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ed = FastEditor(tiny_backend, cuda_graphs=True, compile=False)
    assert not ed.cuda_graphs and len(caught) == 1
    cfg = EditConfig(steps=2, seed=0)
    assert torch.allclose(
        ed.edit(z_hat, emb_s, emb_t, cfg),
        edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg),
        atol=1e-5,
    )


@pytest.mark.slow
def test_benchmark_script(tmp_path, monkeypatch, tiny_sd):
    """The benchmark runs end to end and its rows agree (40 s on two cores: `make slow`)."""
    spec = importlib.util.spec_from_file_location("bench_edit", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_edit", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--steps",
            "2",
            "--device",
            "cpu",
            "--model",
            str(tiny_sd),
            "--batch",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    for key in (
        "device",
        "model",
        "steps",
        "batch",
        "unet_flops_per_call",
        "memory",
        "reference_precision",
        "results",
    ):
        assert key in data
    assert data["unet_flops_per_call"] > 0
    rows = {(r["path"], r["edits"]) for r in data["results"]}
    assert rows == {(p, n) for p in ("reference", "default", "fast") for n in (1, 2)}
    for r in data["results"]:
        for key in (
            "seconds_per_edit",
            "unet_tflops",
            "peak_memory_mb",
            "max_abs_diff",
            "tolerance",
        ):
            assert math.isfinite(r[key]), (r["path"], key)
        assert r["within_tolerance"] is True
