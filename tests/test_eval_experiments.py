"""`dds eval` experiments: closed-form checks on an analytic denoiser, quick runs on the tiny
model (resume, files, value ranges) and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dds.errors import DDSError
from dds.eval.experiments import EXPERIMENTS, Context, run_experiment
from dds.eval.experiments.common import Parts, derangement
from dds.eval.experiments.editing import dominated_share, pareto
from dds.eval.experiments.score_stats import cosine_unit, norms_unit
from dds.score import alpha_sigma


class PointMassBackend:
    """Analytic denoiser: the data for caption y is one point mu_y (the embedding reshaped), so
    the optimal eps is (z_t - alpha_t mu_y) / sigma_t and, at guidance 1, the SDS gradient is
    exactly alpha_t / sigma_t (z - mu_y), whatever eps is drawn."""

    device = torch.device("cpu")

    def __init__(self, shape):
        self.shape = shape
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def uncond_embedding(self):
        return torch.zeros(1, 1, int(np.prod(self.shape)))

    def predict_eps(self, z_t, t, emb):
        mu = emb.reshape(z_t.shape)
        a, s = alpha_sigma(self.alphas_cumprod, t)
        return (z_t - a.view(-1, 1, 1, 1) * mu) / s.view(-1, 1, 1, 1)


def _emb(z):
    return z.flatten(1).unsqueeze(1)  # (B,1,D): the point mass at z itself


def test_norms_closed_form_aligned_zero_unaligned_known():
    shape = (2, 4, 4)
    b = PointMassBackend(shape)
    z = torch.randn((5, *shape), generator=torch.Generator().manual_seed(0))
    perm = derangement(5, 0)
    t = 400
    r = norms_unit(b, z, _emb(z), _emb(z[perm]), t, n_noise=3, guidance=1.0,
                   gen=torch.Generator().manual_seed(1), chunk_rows=4)
    a, s = alpha_sigma(b.alphas_cumprod, torch.tensor([t]))
    expect = (a / s) * (z - z[perm]).flatten(1).norm(dim=1)
    assert np.allclose(r["aligned"], 0, atol=1e-4)
    assert np.allclose(r["unaligned"], expect.numpy(), rtol=1e-4)
    assert np.allclose(r["unaligned_noise_std"], 0, atol=1e-3)  # eps cancels exactly


def test_cosine_closed_form():
    shape = (1, 3, 3)
    b = PointMassBackend(shape)
    g = torch.Generator().manual_seed(2)
    z_a, mu_a, z_b, mu_b = (torch.randn((4, *shape), generator=g) for _ in range(4))
    r = cosine_unit(b, z_a, _emb(mu_a), z_b, _emb(mu_b), z_a, _emb(mu_a), t=300, n_noise=2,
                    guidance=1.0, gen=torch.Generator().manual_seed(3), chunk_rows=8)
    expect = torch.nn.functional.cosine_similarity((z_a - mu_a).flatten(1), (z_b - mu_b).flatten(1))
    assert np.allclose(r["related"], expect.numpy(), atol=1e-5)
    assert np.allclose(r["unrelated"], 1.0, atol=1e-5)  # a pair with itself


def test_pareto_and_domination():
    pts = np.array([[0, 1], [1, 0], [0.5, 0.5], [0.2, 0.2]])
    assert pareto(pts).tolist() == [True, True, True, False]
    assert dominated_share(pts[:1], pts[3:]) == 0.0
    assert dominated_share(pts[2:3], pts[3:]) == 1.0


def test_parts_refuse_other_settings(tmp_path):
    p = Parts(tmp_path, {"a": 1})
    assert p.get("u", lambda: {"x": [1.5]}) == {"x": [1.5]} and p.computed == 1
    p2 = Parts(tmp_path, {"a": 1})
    assert p2.get("u", lambda: pytest.fail("recomputed")) == {"x": [1.5]} and p2.reused == 1
    with pytest.raises(DDSError, match="other settings"):
        Parts(tmp_path, {"a": 2})


class FakeJudge:
    """Stands in for the trained judge (not needed to test the plumbing)."""

    def edit_success(self, images, edits):
        return images.mean((1, 2, 3)).numpy() > 0.45


def _ctx(backend, out, **kw):
    return Context(backend=backend, out=out, quick=True, quiet=True, judge=FakeJudge(), **kw)


def _tables(out, slug):
    return (out / f"{slug}.csv").read_text(), json.loads((out / f"{slug}.json").read_text())


def test_score_norms_quick_and_resume(tiny_backend, tmp_path):
    out = tmp_path / "norms"
    small = dict(n_pairs=3, n_noise=2, n_t=3, chunk_rows=6)
    s = run_experiment("score-norms", _ctx(tiny_backend, out), **small)
    for f in ("score_norms.png", "score_norms.csv", "score_norms.json", "report.md"):
        assert (out / f).is_file()
    csv1, rec1 = _tables(out, "score_norms")
    assert rec1["units"]["computed_this_run"] == 3 and rec1["seed"] == 0
    assert rec1["params"]["n_noise"] == 2 and rec1["preset"] == "quick"
    rows = rec1["rows"]
    assert [r["t"] for r in rows] == [50, 350, 650]
    assert all(np.isfinite(r["aligned_mean"]) and r["aligned_mean"] > 0 for r in rows)
    assert isinstance(s["reproduces"], bool) and "**Claim" in (out / "report.md").read_text()
    # a second run finds every unit and gives identical tables
    run_experiment("score-norms", _ctx(tiny_backend, out), **small)
    csv2, rec2 = _tables(out, "score_norms")
    assert rec2["units"] == {"computed_this_run": 0, "resumed": 3}
    assert csv1 == csv2 and rec1["rows"] == rec2["rows"]
    # an interrupted run (one part lost) redoes only that part, with the same numbers
    (out / "parts" / "t-350-b-0.json").unlink()
    run_experiment("score-norms", _ctx(tiny_backend, out), **small)
    csv3, rec3 = _tables(out, "score_norms")
    assert rec3["units"]["computed_this_run"] == 1 and csv3 == csv1


def test_score_cosine_quick(tiny_backend, tmp_path):
    out = tmp_path / "cos"
    run_experiment("score-cosine", _ctx(tiny_backend, out), n_pairs=1, n_noise=2, n_t=2)
    _, rec = _tables(out, "score_cosine")
    for r in rec["rows"]:
        assert -1 <= r["related_mean"] <= 1 and -1 <= r["unrelated_mean"] <= 1
    assert (out / "score_cosine.png").is_file()


class RedrawingBar:
    """A progress bar whose `update` returns True, as tqdm's does whenever it redraws."""

    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k
        return True


def test_sweep_edit_runs_every_step_while_its_bar_redraws(tiny_backend, tmp_path):
    from dds.loop import edit_latents
    from dds.eval.experiments.editing import run_method
    from dds.eval.world_edits import decode01

    ctx = _ctx(tiny_backend, tmp_path)
    es = ctx.editset(1)  # one edit per kind
    bar = RedrawingBar()
    out = run_method(ctx, es, "dds", 7.5, slice(0, 3), {"steps": 4}, bar)
    assert bar.n == 3 * 4  # every step of every edit ran
    full = edit_latents(tiny_backend, es.z_hat[:3], es.emb_source[:3], es.emb_target[:3],
                        ctx.edit_cfg(method="dds", guidance=7.5, steps=4), seeds=[0, 1, 2])
    assert torch.allclose(out, decode01(tiny_backend, full), atol=1e-6)


@pytest.mark.slow  # ~15 s idle, over a minute on a loaded 2-core machine
def test_guidance_sweep_quick(tiny_backend, tmp_path):
    out = tmp_path / "sweep"
    s = run_experiment("guidance-sweep", _ctx(tiny_backend, out), n_edits=1, steps=2,
                       guidances=[1, 7.5, 25], sdedit_strengths=[0.5], inversion_guidances=[3],
                       sampler_steps=2)
    _, rec = _tables(out, "guidance_sweep")
    methods = {(r["method"], r["value"]) for r in rec["rows"]}
    assert methods == {("dds", 1), ("dds", 7.5), ("dds", 25), ("sds", 1), ("sds", 7.5),
                       ("sds", 25), ("sdedit", 0.5), ("ddim-inversion", 3)}
    allr = [r for r in rec["rows"] if r["kind"] == "all"]
    assert all(r["n"] == 3 and 0 <= r["success"] <= 1 and np.isfinite(r["psnr_out"]) for r in allr)
    assert isinstance(s["frontier_reproduces"], bool) and s["guidance_reproduces"] in (True, False)
    assert (out / "guidance_sweep.png").is_file() and (out / "guidance_sweep_quality.png").is_file()
    assert len(list((out / "parts").glob("*-b-0.json"))) == 8


@pytest.mark.slow  # as above
def test_drift_and_convergence_quick(tiny_backend, tmp_path):
    out = tmp_path / "drift"
    s = run_experiment("drift", _ctx(tiny_backend, out), n_edits=1, steps=4, checkpoints=[0, 2])
    _, rec = _tables(out, "drift")
    assert [r["step"] for r in rec["rows"]] == [0, 2, 4]
    # DDS with identical prompts: the two branches see the same input, the gradient is zero
    assert all(r["dds_latent_l2"] == pytest.approx(0.0, abs=1e-5) for r in rec["rows"])
    assert rec["rows"][-1]["sds_latent_l2"] > 0 and s["sds_latent_l2_final"] > 0
    out = tmp_path / "conv"
    s = run_experiment("convergence", _ctx(tiny_backend, out), n_edits=1, steps_list=[1, 3])
    _, rec = _tables(out, "convergence")
    assert [r["steps"] for r in rec["rows"]] == [0, 1, 3]
    assert s["quality_metric"] == "psnr_gt" and (out / "convergence.png").is_file()


def test_checkpoints_equal_separate_runs(tiny_backend, tmp_path):
    """Convergence reads every step count off one long run: the state after k steps of a long
    run equals a k-step run."""
    from dds.pipeline import edit_config
    from dds.loop import edit_latents

    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    emb = tiny_backend.encode_prompt(["a red circle", "a blue circle"])
    seen = {}
    cfg = edit_config(tiny_backend, steps=3, seed=0)
    edit_latents(tiny_backend, z, emb[:1], emb[1:], cfg, callback=lambda s, zz, n: seen.update({s: zz.clone()}))
    short = edit_latents(tiny_backend, z, emb[:1], emb[1:], cfg.with_(steps=2))
    assert torch.allclose(seen[2], short, atol=1e-6)


def test_unknown_setting_and_experiment(tiny_backend, tmp_path):
    with pytest.raises(DDSError, match="no setting"):
        run_experiment("drift", _ctx(tiny_backend, tmp_path), bogus=1)
    with pytest.raises(DDSError, match="unknown experiment"):
        run_experiment("nope", _ctx(tiny_backend, tmp_path))


def test_real_data_needs_metadata(tiny_backend, tmp_path):
    ctx = _ctx(tiny_backend, tmp_path / "o", data=tmp_path)
    with pytest.raises(DDSError, match="metadata.jsonl"):
        run_experiment("score-norms", ctx, n_pairs=2)


def test_real_data_score_norms(tiny_backend, tmp_path):
    from PIL import Image

    rows = []
    for i, c in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (20, 16), c).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {c} square", "target": "a cat"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    run_experiment("score-norms", _ctx(tiny_backend, out, data=tmp_path, size=16), n_pairs=3,
                   n_noise=1, n_t=2)
    _, rec = _tables(out, "score_norms")
    assert rec["data"] == str(tmp_path) and len(rec["rows"]) == 2


def test_presets_cover_the_paper():
    assert EXPERIMENTS["score-norms"].full["n_noise"] == 200
    assert EXPERIMENTS["score-norms"].full["n_t"] == 20
    assert EXPERIMENTS["guidance-sweep"].full["guidances"] == [1, 3, 5, 7.5, 10, 15, 25]
    assert EXPERIMENTS["convergence"].full["steps_list"] == [25, 50, 100, 200, 400]


def test_cli_help_and_errors(capsys):
    import argparse

    from dds.eval.cli import add_parser

    parser = argparse.ArgumentParser(prog="dds")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["eval", "drift", "--quick", "--out", "x", "--seed", "3"])
    assert args.experiment == "drift" and args.quick and args.seed == 3
    assert parser.parse_args(["eval", "all"]).experiment == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "bogus"])
