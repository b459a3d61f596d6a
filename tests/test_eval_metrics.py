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


def test_t_quantiles_match_the_tables():
    from dds.eval.paired import t_quantile

    for df, t in ((1, 12.7062), (4, 2.7764), (7, 2.3646), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)


def test_paired_t_interval_closed_form():
    """d = a - b = 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445 -> 3 +- 1.963243."""
    import numpy as np

    from dds.eval.paired import paired_difference, paired_t_interval

    a = np.array([11.0, 12.0, 13.0, 14.0, 15.0])
    b = np.array([10.0, 10.0, 10.0, 10.0, 10.0])
    lo, hi = paired_t_interval(a - b)
    assert (lo, hi) == (pytest.approx(1.036757, abs=1e-5), pytest.approx(4.963243, abs=1e-5))
    d = paired_difference("psnr_gain", a, b, ("DDS", "SDS"))
    assert d["interval"] == "paired t" and d["n"] == 5 and d["difference"] == pytest.approx(3.0)
    assert d["low"] == pytest.approx(lo) and d["verdict"] == "DDS better"
    # The same numbers where lower is better: the lower one is the better method.
    assert paired_difference("lpips", a, b, ("DDS", "SDS"))["verdict"] == "SDS better"


def test_paired_proportion_interval_closed_form():
    """Agresti-Min: 3 of 8 pairs discordant for a, none for b: adjusted n10 = 3.5, n01 = 0.5,
    n' = 10; 0.3 +- 1.959964 * sqrt(4 - 0.9) / 10 holds zero; 8 of 8 for a does not."""
    import numpy as np

    from dds.eval.paired import paired_difference, paired_proportion_interval

    a = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    none = np.zeros(8, bool)
    lo, hi = paired_proportion_interval(a, none)
    assert (lo, hi) == (pytest.approx(-0.045087, abs=1e-5), pytest.approx(0.645087, abs=1e-5))
    d = paired_difference("success_pos", a.astype(float), none.astype(float), ("DDS", "SDS"))
    assert d["interval"] == "Agresti-Min" and d["difference"] == pytest.approx(3 / 8)
    assert d["verdict"] == "no difference"
    lo, hi = paired_proportion_interval(~none, none)
    assert (lo, hi) == (pytest.approx(0.8 - 0.316034, abs=1e-5), 1.0)
    assert paired_difference("success", np.ones(8), np.zeros(8), ("DDS", "SDS"))["verdict"] == (
        "DDS better")


def test_zero_difference_reads_no_difference():
    """Identical outcomes (every pair agrees) and differences centred on zero both read 'no
    difference', for a mean and for a proportion, per kind and over all."""
    import numpy as np

    from dds.eval.paired import compare

    a = {"psnr_gain": np.array([1.0, 2.0, 3.0, 4.0]), "success_pos": np.array([1.0, 0, 1, 0])}
    c = compare(a, a, ("psnr_gain", "success_pos"), ["x", "x", "y", "y"], ("DDS", "SDS"))
    assert list(c) == ["x", "y", "all"]
    for row in c.values():
        for d in row.values():
            assert d["difference"] == 0.0 and d["low"] <= 0.0 <= d["high"]
            assert d["verdict"] == "no difference"
    b = {"psnr_gain": a["psnr_gain"] + np.array([0.5, -0.5, 0.5, -0.5]),
         "success_pos": np.array([0.0, 1, 1, 0])}
    c = compare(a, b, ("psnr_gain", "success_pos"), None, ("DDS", "SDS"))
    assert all(d["verdict"] == "no difference" for d in c["all"].values())


def test_psnr_gain_is_zero_for_no_edit_and_position_success_is_registered():
    import numpy as np

    from dds.eval.metrics import WORLD_METRICS, References, get_metric, psnr, score_outputs

    src, truth = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8) * 0.5
    r = References(source=src, truth=truth)
    out = torch.ones(2, 3, 8, 8) * torch.tensor([0.25, 0.5]).view(2, 1, 1, 1)
    g = score_outputs(out, r, ("psnr_gain",))["psnr_gain"]
    base = psnr(src, truth).numpy()
    assert np.allclose(g, psnr(out, truth).numpy() - base)
    assert np.allclose(score_outputs(src, r, ("psnr_gain",))["psnr_gain"], 0.0)
    assert get_metric("psnr_gain").format(1.5) == "+1.50"
    assert get_metric("success_pos").binary and get_metric("success").binary
    assert not get_metric("psnr_gain").binary
    assert WORLD_METRICS[:2] == ("success_pos", "success") and "psnr_gain" in WORLD_METRICS


def test_paired_table_reads_both_means_the_interval_and_the_verdict():
    import numpy as np

    from dds.eval.paired import compare
    from dds.eval.report import paired_table

    a = {"success_pos": np.ones(8)}
    b = {"success_pos": np.zeros(8)}
    t = paired_table(compare(a, b, ("success_pos",), None, ("DDS", "SDS")), ("DDS", "SDS"))
    lines = t.splitlines()
    assert lines[0] == "| edit kind | measure | DDS | SDS | DDS − SDS [95% interval] | reading |"
    assert lines[2] == ("| all (n=8) | success (placed) | 100.0% | 0.0% | +100.0% "
                        "[+48.4%, +100.0%] | DDS better |")


def test_release_targets_read_the_report_and_say_which_are_met():
    from dds.eval.builtin_quality import TARGETS, release_targets, targets_markdown

    def kind(success_pos, psnr_gain):
        return {"success_pos": success_pos, "psnr_gain": psnr_gain}

    def verdicts(success, kept):
        return {"success_pos": {"verdict": success}, "ssim_out": {"verdict": kept}}

    report = {
        "generation_single": {"all_attributes": 0.80},
        "vae": {"psnr_mean": 31.9, "judge_on_reconstructions": {"obj0_shape": 0.97}},
        "editing": {
            "dds": {"object_color": kind(0.95, 2.5), "object_shape": kind(0.69, 2.0),
                    "background_color": kind(0.99, 9.0)},
            "paired": {"by": {"object_color": verdicts("DDS better", "no difference"),
                              "object_shape": verdicts("no difference", "DDS better"),
                              "background_color": verdicts("SDS better", "DDS better"),
                              "all": verdicts("DDS better", "DDS better")}},
        },
        "model_mb": 19.2,
    }
    rows = release_targets(report)
    met = {r["target"]: r["met"] for r in rows}
    assert [met[label] for label, *_ in TARGETS] == [True, True, False, True, False, True,
                                                     True, True]  # >= is met; 31.9 < 32
    assert met["DDS against SDS (paired), object_color"] is True  # ahead on success
    assert met["DDS against SDS (paired), object_shape"] is True  # equal success, kept more
    assert met["DDS against SDS (paired), background_color"] is False
    assert not any("all" in r["target"] for r in rows)
    assert met["model folder size"] is True
    # a report without a measurement says so rather than guessing
    rows = release_targets({"generation_single": {"all_attributes": 0.5}})
    assert [r["met"] for r in rows] == [False] + [None] * (len(TARGETS) - 1) + [None]
    table = targets_markdown(rows)
    assert "| generation, one object, every attribute right | 50.0% | >= 75.0% | **no** |" in table
    assert table.count("not measured") == len(TARGETS)


def test_the_quality_report_measures_the_model_folders_size(tiny_sd):
    from dds.models.stable_diffusion import StableDiffusionModel

    files = [f for f in tiny_sd.rglob("*") if f.is_file()]
    want = sum(f.stat().st_size for f in files) / 1e6
    assert want > 0 and StableDiffusionModel(tiny_sd).folder_mb() == want
