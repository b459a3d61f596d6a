"""CLIP score and LPIPS: properties on tiny random models (no weights are downloaded)."""

from __future__ import annotations

import pytest
import torch

from dds.errors import DDSError
from dds.eval.clip_score import clip_score, image_embeddings, load_clip, text_embeddings
from dds.eval.lpips import (
    LPIPS,
    alexnet_features,
    load_lpips,
    lpips_distance,
    packaged_linear_weights,
)


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    trunk = alexnet_features().state_dict()
    lin = None
    p = packaged_linear_weights()
    if p is not None:
        lin = torch.load(p, map_location="cpu", weights_only=True)
    return LPIPS(trunk, lin)


def _images(n, seed, size=64):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def test_lpips_properties(lpips_model):
    x, y = _images(3, 1), _images(3, 2)
    d_xx = lpips_distance(lpips_model, x, x)
    assert torch.allclose(d_xx, torch.zeros(3), atol=1e-6)
    d_xy, d_yx = lpips_distance(lpips_model, x, y), lpips_distance(lpips_model, y, x)
    assert torch.allclose(d_xy, d_yx, atol=1e-6)  # symmetric
    assert (d_xy > 0).all() and torch.isfinite(d_xy).all()
    assert torch.equal(d_xy, lpips_distance(lpips_model, x, y))  # deterministic
    one = torch.cat([lpips_distance(lpips_model, x[i:i + 1], y[i:i + 1]) for i in range(3)])
    assert torch.allclose(one, d_xy, atol=1e-5)  # a batch equals images one by one
    # closer images are closer: a slight perturbation vs an unrelated image
    near = (x + 0.02 * (y - x)).clamp(0, 1)
    assert (lpips_distance(lpips_model, x, near) < d_xy).all()


def test_lpips_unit_normalised_range(lpips_model):
    """Each layer's term is a mean of w . (a - b)^2 with unit a, b: at most 4 * sum(w)."""
    bound = 4 * sum(float(lin.weight.clamp_min(0).sum()) for lin in lpips_model.lins)
    d = lpips_distance(lpips_model, _images(2, 3), 1 - _images(2, 3))
    assert (d >= 0).all() and (d <= bound).all()


def test_lpips_loads_a_torchvision_layout_trunk(tmp_path):
    torch.manual_seed(1)
    feats = alexnet_features()
    sd = {f"features.{k}": v for k, v in feats.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(2, 2)  # a full alexnet state dict also works
    path = tmp_path / "alexnet.pth"
    torch.save(sd, path)
    model = load_lpips(path, allow_uniform=True)
    assert torch.equal(model.features[0].weight, feats[0].weight)
    x = _images(1, 4)
    assert float(lpips_distance(model, x, x)[0]) == pytest.approx(0.0, abs=1e-6)


def test_lpips_missing_weights_is_one_sentence(tmp_path):
    with pytest.raises(DDSError, match="--lpips-trunk"):
        load_lpips(None)
    with pytest.raises(DDSError, match="not found"):
        load_lpips(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1)}, bad)
    with pytest.raises(DDSError, match="features"):
        load_lpips(bad)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from dds.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    model = CLIPModel(cfg).eval()
    tok = clip_tokenizer()
    folder = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_clip_score_range_and_hand_computation(tiny_clip):
    model, tok, _ = tiny_clip
    x = _images(3, 5, size=48)
    texts = ["a red circle", "a blue star on a white background", "a cat"]
    s = clip_score(model, tok, x, texts)
    assert s.shape == (3,) and (s >= 0).all() and (s <= 100).all()
    ei, et = image_embeddings(model, x), text_embeddings(model, tok, texts)
    cos = (ei / ei.norm(dim=-1, keepdim=True) * (et / et.norm(dim=-1, keepdim=True))).sum(-1)
    assert torch.allclose(s, (100 * cos).clamp_min(0), atol=1e-4)
    # a batch equals pairs one by one, and the score is deterministic
    one = torch.cat([clip_score(model, tok, x[i:i + 1], texts[i:i + 1]) for i in range(3)])
    assert torch.allclose(one, s, atol=1e-4)
    assert torch.equal(s, clip_score(model, tok, x, texts))


def test_clip_score_clips_at_zero(tiny_clip):
    model, tok, _ = tiny_clip
    x = _images(8, 6, size=32)
    texts = [f"prompt number {i}" for i in range(8)]
    ei, et = image_embeddings(model, x), text_embeddings(model, tok, texts)
    raw = 100 * torch.nn.functional.cosine_similarity(ei, et, dim=-1)
    s = clip_score(model, tok, x, texts)
    assert torch.allclose(s, raw.clamp_min(0), atol=1e-4)
    neg = raw < 0
    if neg.any():  # with a random model some pairs are negative: they must read 0
        assert (s[neg] == 0).all()


def test_load_clip_from_folder_and_missing(tiny_clip, tmp_path):
    model, tok, folder = tiny_clip
    m2, t2 = load_clip(folder)
    x = _images(1, 7, size=32)
    assert torch.allclose(clip_score(m2, t2, x, ["a cat"]), clip_score(model, tok, x, ["a cat"]),
                          atol=1e-5)
    with pytest.raises(DDSError, match="--clip"):
        load_clip(None)
    with pytest.raises(DDSError, match="config.json"):
        load_clip(tmp_path)


def test_registry_direction_drives_tables_and_the_frontier():
    """A metric registered once is read everywhere: its function scores, its direction decides
    the best cell of a table, the arrow of its column and the sign on the frontier."""
    from types import SimpleNamespace

    import numpy as np

    from dds.eval.experiments.editing import _points
    from dds.eval.metrics import (
        METRICS,
        Metric,
        References,
        get_metric,
        register_metric,
        score_outputs,
    )
    from dds.eval.report import metric_table

    assert get_metric("lpips").higher_is_better is False
    assert all(get_metric(k).higher_is_better for k in ("success", "psnr_gt", "psnr_out", "ssim_out"))
    with pytest.raises(ValueError, match="twice"):
        register_metric(METRICS["psnr_out"])
    with pytest.raises(DDSError, match="unknown metric"):
        get_metric("nope")
    register_metric(Metric("toy_err", lambda x, r: (x - r.source).abs().flatten(1).mean(1).numpy(),
                           False, "toy error", "toy", ".1f"))
    try:
        x = torch.ones(2, 3, 4, 4) * torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
        v = score_outputs(x, References(source=torch.zeros(2, 3, 4, 4)), ("toy_err",))
        assert v["toy_err"].tolist() == [0.5, 1.0]
        t = metric_table([(("x",), {"toy_err": 0.5}), (("y",), {"toy_err": 1.0}),
                          (("no edit",), {"toy_err": 0.0})], ["m"], ["toy_err"],
                         unranked={"no edit"}).splitlines()
        assert t[0] == "| m | toy ↓ |"
        assert t[2:] == ["| x | **0.5** |", "| y | 1.0 |", "| no edit | 0.0 |"]
        es = SimpleNamespace(preservation="toy_err", fidelity="success")
        pts = _points(es, [{"method": "dds", "toy_err": 0.5, "success": 1.0}])
        assert np.array_equal(pts["dds"], [[-0.5, 1.0]])  # lower error = further right
    finally:
        METRICS.pop("toy_err")


def test_references_slice_every_row_field():
    from dds.eval.metrics import References

    r = References(source=torch.arange(4.0), targets=["a", "b", "c", "d"], clip=("m", "t"))
    s = r[1:3]
    assert s.source.tolist() == [1.0, 2.0] and s.targets == ["b", "c"] and s.clip == ("m", "t")
