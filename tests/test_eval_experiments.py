"""`dds eval` experiments: closed-form checks on an analytic denoiser, quick runs on the tiny
model (resume, files, value ranges) and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dds.errors import DDSError
from dds.eval.experiments import EXPERIMENTS, Context, run_experiment
from dds.eval.experiments.common import derangement
from dds.eval.experiments.editing import dominated_share, pareto
from dds.eval.experiments.score_stats import cosine_unit, draws_share, norms_unit
from dds.eval.runner import Runner
from dds.models.base import NoiseSchedule
from dds.score import alpha_sigma


class PointMassBackend:
    """Analytic denoiser: the data for caption y is one point mu_y (the embedding reshaped), so
    the optimal eps is (z_t - alpha_t mu_y) / sigma_t and, at guidance 1, the SDS gradient is
    exactly alpha_t / sigma_t (z - mu_y), whatever eps is drawn."""

    device = torch.device("cpu")

    def __init__(self, shape):
        self.shape = shape
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
        self.schedule = NoiseSchedule(torch.cumprod(1 - betas, 0))

    def uncond(self):
        return torch.zeros(1, 1, int(np.prod(self.shape)))

    def schedule_for(self, shape):
        return self.schedule

    def predict_eps(self, z_t, t, emb):
        mu = emb.reshape(z_t.shape)
        a, s = alpha_sigma(self.schedule, t)
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
    a, s = alpha_sigma(b.schedule, torch.tensor([t]))
    expect = (a / s) * (z - z[perm]).flatten(1).norm(dim=1)
    assert np.allclose(r["aligned"], 0, atol=1e-4)
    assert np.allclose(r["unaligned"], expect.numpy(), rtol=1e-4)
    assert np.allclose(r["unaligned_noise_std"], 0, atol=1e-3)  # eps cancels exactly


def test_draws_share_matches_simulated_variance_split():
    """Pairs whose true values spread with std 2 and whose single draws have std 3: with n draws
    per pair, the draws' share of the spread between pairs is (9/n) / (4 + 9/n)."""
    rng = np.random.default_rng(0)
    pairs, n = 4000, 10
    truth = rng.normal(5.0, 2.0, size=pairs)
    draws = truth[:, None] + rng.normal(0.0, 3.0, size=(pairs, n))
    share = draws_share(draws.mean(1), draws.std(1), n)
    assert share == pytest.approx(0.9 / 4.9, rel=0.08)
    assert draws_share(truth, np.zeros(pairs), n) == 0.0  # exact estimates: no share


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


def test_runner_keeps_units_and_refuses_other_settings(tmp_path):
    p = Runner(tmp_path, {"a": 1})
    assert p.unit("u", lambda: {"x": [1.5]}) == {"x": [1.5]} and p.computed == 1
    p2 = Runner(tmp_path, {"a": 1})
    seen = []
    assert p2.unit("u", lambda: pytest.fail("recomputed"), lambda: seen.append(1)) == {"x": [1.5]}
    assert p2.reused == 1 and seen == [1]
    with pytest.raises(DDSError, match="other settings"):
        Runner(tmp_path, {"a": 2})


def test_runner_batches_join_units_and_resume(tmp_path):
    calls = []

    def compute(sl):
        calls.append(sl.start)
        return {"v": np.arange(sl.start, sl.stop, dtype=np.float32) / 3}

    from dds.eval.runner import batches

    r = Runner(tmp_path, {})
    first = r.batches(("m", 0.5), batches(5, 2), compute)
    assert sorted(p.name for p in r.dir.glob("m-*")) == ["m-0.5-b-0.json", "m-0.5-b-1.json",
                                                        "m-0.5-b-2.json"]
    (r.dir / "m-0.5-b-1.json").unlink()
    again = Runner(tmp_path, {}).batches(("m", 0.5), batches(5, 2), compute)
    assert calls == [0, 2, 4, 2]  # only the lost unit is recomputed
    assert np.array_equal(first["v"], again["v"])
    assert np.array_equal(first["v"], (np.arange(5, dtype=np.float32) / 3).astype(float))
    # a run that keeps nothing (no --out) gives the stored run's numbers, float for float
    from dds.eval.runner import MemoryRunner

    kept_nothing = MemoryRunner().batches(("m", 0.5), batches(5, 2), compute)
    assert np.array_equal(first["v"], kept_nothing["v"])


class FakeJudge:
    """Stands in for the trained judge (not needed to test the plumbing)."""

    def edit_success(self, images, edits):
        return images.mean((1, 2, 3)).numpy() > 0.45

    def edit_success_placed(self, images, edits):
        """The real placement rule on top of the fake attribute reading, as the judge does."""
        from dds.world.placement import edit_placed

        return self.edit_success(images, edits) & edit_placed(images, edits)


def _ctx(model, out, **kw):
    return Context(model=model, out=out, quick=True, quiet=True, judge=FakeJudge(), **kw)


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
    # the report says which settings left the preset (quick: 12 pairs, 8 draws, 10 t, 96 rows)
    assert rec1["changed_from_preset"] == {
        "n_pairs": {"preset": 12, "used": 3}, "n_noise": {"preset": 8, "used": 2},
        "n_t": {"preset": 10, "used": 3}, "chunk_rows": {"preset": 96, "used": 6}}
    assert "changed from the preset: n_pairs 12 -> 3, n_noise 8 -> 2" in (out / "report.md").read_text()
    rows = rec1["rows"]
    assert [r["t"] for r in rows] == [50, 350, 650]
    assert all(np.isfinite(r["aligned_mean"]) and r["aligned_mean"] > 0 for r in rows)
    assert all(0 <= r["aligned_draws_share"] and 0 <= r["unaligned_draws_share"] for r in rows)
    assert rec1["summary"]["draws_share_max"] == max(
        max(r["aligned_draws_share"], r["unaligned_draws_share"]) for r in rows)
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
    from dds.eval.experiments.editing import run_method
    from dds.eval.world_edits import decode01
    from dds.loop import edit_latents

    ctx = _ctx(tiny_backend, tmp_path)
    es = ctx.editset(1)  # one edit per kind
    bar = RedrawingBar()
    out = run_method(ctx, es, "dds", 7.5, slice(0, 3), {"steps": 4}, bar)
    assert bar.n == 3 * 4  # every step of every edit ran
    full = edit_latents(tiny_backend, es.z_hat[:3], es.cond_source[:3], es.cond_target[:3],
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
                       ("sds", 25), ("sdedit", 0.5), ("ddim-inversion", 3), ("no-edit", None),
                       ("round-trip", None)}
    allr = [r for r in rec["rows"] if r["kind"] == "all"]
    floor = {r["method"]: r for r in allr if r["value"] is None}
    assert floor["no-edit"]["psnr_out"] == pytest.approx(100.0)  # the source itself: capped
    assert floor["no-edit"]["ssim_out"] == pytest.approx(1.0, abs=1e-6)
    assert floor["round-trip"]["psnr_out"] < 100.0
    assert s["floors"]["no-edit"]["psnr_out"] == pytest.approx(100.0)
    report = (out / "report.md").read_text()
    assert "| no edit |" in report and "| autoencoder round trip |" in report
    assert all(r["n"] == 3 and 0 <= r["success"] <= 1 and np.isfinite(r["psnr_out"]) for r in allr)
    assert isinstance(s["frontier_reproduces"], bool) and s["guidance_reproduces"] in (True, False)
    assert (out / "guidance_sweep.png").is_file() and (out / "guidance_sweep_quality.png").is_file()
    assert len(list((out / "parts").glob("*-b-0.json"))) == 8
    assert len(list((out / "parts").glob("floor-*-rows-0.json"))) == 2


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
    # the round trip floor is the source latent decoded: convergence's step 0
    assert s["floors"]["round-trip"]["psnr_gt"] == pytest.approx(rec["rows"][0]["psnr_gt"])


@pytest.mark.slow  # ~10 s idle, half a minute on a loaded 2-core machine
def test_schedules_quick_reports_each_setting_against_the_reference(tiny_backend, tmp_path):
    from dds.eval.experiments.schedules import Setting, matches, recommendation, settings_of

    out = tmp_path / "sched"
    s = run_experiment("schedules", _ctx(tiny_backend, out), n_edits=1, batch=8,
                       reference_steps=4, budgets=[2], schedules=["reference", "descending"],
                       step_rules=["constant"], n_avg=[1, 2])
    _, rec = _tables(out, "schedules")
    rows = {r["setting"]: r for r in rec["rows"]}
    assert set(rows) == {"reference-constant-n1-s4", "reference-constant-n1-s2",
                         "reference-constant-n2-s1", "descending-constant-n1-s2",
                         "descending-constant-n2-s1", "reference-constant-n1-s2-adam0.01",
                         "descending-constant-n1-s2-adam0.01"}  # the preset's Adam
    assert all(r["calls"] == 2 for k, r in rows.items() if not k.endswith("s4"))
    assert rows["reference-constant-n1-s2-adam0.01"]["optimizer"] == "adam"
    ref = rows["reference-constant-n1-s4"]
    assert ref["psnr_gain_diff"] == 0 and ref["matches_reference"]
    # The first 2 of the reference's 4 steps are the reference schedule at 2 steps: its paired
    # difference is what separate runs give.
    assert rows["reference-constant-n1-s2"]["psnr_gain"] == pytest.approx(
        ref["psnr_gain"] - ref["psnr_gain_diff"] + rows["reference-constant-n1-s2"][
            "psnr_gain_diff"])
    assert set(s["winners"]) == {"2"} and (out / "schedules.png").is_file()
    at2 = [r for k, r in rows.items() if r["calls"] == 2]
    assert rows[s["best"]["2"]] == max(at2, key=lambda r: (r["success_pos"], r["psnr_gain"]))
    assert s["winners"]["2"] in (None, s["best"]["2"]) or rows[s["winners"]["2"]][
        "matches_reference"]
    assert s["reference_calls"] == 4
    # a grown grid (another step rule) reuses every unit already stored and adds its own
    stored = {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*-b-*.json")}
    s2 = run_experiment("schedules", _ctx(tiny_backend, out), n_edits=1, batch=8,
                        reference_steps=4, budgets=[2], schedules=["reference", "descending"],
                        step_rules=["constant", "decay"], n_avg=[1, 2])
    after = {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*-b-*.json")}
    assert {k: after[k] for k in stored} == stored
    assert sorted(set(after) - set(stored)) == [
        "descending-decay-n1-s2-b-0.json", "descending-decay-n2-s1-b-0.json",
        "reference-decay-n1-s2-b-0.json", "reference-decay-n2-s1-b-0.json"]
    assert s2["reference_calls"] == 4
    # --write's recommendation: the winner at the fewest calls, as EditConfig fields
    win = rows.get(s["winners"]["2"])
    assert s["recommended"] == (None if win is None else {
        "schedule": win["schedule"], "steps": win["steps"], "step_rule": win["step_rule"],
        "n_avg": win["n_avg"], "optimizer": win["optimizer"], "average_tail": win["average_tail"],
        **({"lr": win["lr"]} if win["lr"] is not None else {})})
    # the rule: worse outside the interval on any compared metric -> no match
    bad = {"success_pos": {"verdict": "no difference"}, "psnr_gain": {"verdict": "reference better"}}
    assert not matches(bad) and matches({"x": {"verdict": "setting better"}})
    ref_s, grid = settings_of(dict(reference_steps=200, budgets=[50], schedules=["descending"],
                                   step_rules=["budget"], n_avg=[1, 2]))
    assert ref_s == Setting("reference", "constant", 1, 200)
    assert [(g.steps, g.n_avg, g.calls) for g in grid] == [(50, 1, 50), (25, 2, 50)]
    _, grid = settings_of(dict(reference_steps=200, budgets=[25, 50], schedules=["reference"],
                               step_rules=["constant"], n_avg=[1], optimizers={"adam": 0.01}))
    assert [g.key for g in grid] == ["reference-constant-n1-s25", "reference-constant-n1-s50",
                                     "reference-constant-n1-s25-adam0.01",
                                     "reference-constant-n1-s50-adam0.01"]
    assert grid[-1].curve == "reference, constant lr, adam lr 0.01" and grid[-1].calls == 50
    _, grid = settings_of(dict(reference_steps=200, budgets=[25], schedules=["stratified"],
                               step_rules=[], n_avg=[1], optimizers={"adam": 0.01},
                               optimizer_rules=["constant", "budget"]))
    assert [g.key for g in grid] == ["stratified-constant-n1-s25-adam0.01",
                                     "stratified-budget-n1-s25-adam0.01"]
    from dds.loop import EditConfig
    from dds.methods import step_lr

    budget_adam = EditConfig().with_(optimizer="adam", step_rule="budget", lr=0.01, steps=25)
    assert step_lr(budget_adam) == pytest.approx(0.01 * 200 / 25)
    _, grid = settings_of(dict(reference_steps=200, budgets=[25], schedules=["stratified"],
                               step_rules=["constant"], n_avg=[1], tails=[0.2]))
    assert [g.key for g in grid] == ["stratified-constant-n1-s25",
                                     "stratified-budget-n1-s25-tail0.2"]
    assert grid[-1].curve == "stratified, budget lr, mean of last 20%"
    assert recommendation(grid[-1])["average_tail"] == 0.2


def test_checkpoints_equal_separate_runs(tiny_backend, tmp_path):
    """Convergence reads every step count off one long run: the state after k steps of a long
    run equals a k-step run."""
    from dds.loop import edit_latents
    from dds.pipeline import edit_config

    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    emb = tiny_backend.encode_prompt(["a red circle", "a blue circle"])
    seen = {}
    # The paper's schedule, as the experiment runs it (`Context.edit_cfg`), not the family's.
    cfg = edit_config(tiny_backend, steps=3, seed=0, schedule="reference")
    edit_latents(tiny_backend, z, emb[:1], emb[1:], cfg,
                 on_step=lambda info: seen.update({info.step: info.z.clone()}))
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
    # fewer steps: paired against the reference on 300 edits, at the goal's budgets (<= 50)
    assert EXPERIMENTS["schedules"].full["n_edits"] >= 100
    assert {25, 50} <= set(EXPERIMENTS["schedules"].full["budgets"])


def test_cli_help_and_errors(capsys):
    parser = _eval_parser()
    args = parser.parse_args(["eval", "drift", "--quick", "--out", "x", "--seed", "3"])
    assert args.experiment == "drift" and args.quick and args.seed == 3
    assert parser.parse_args(["eval", "all"]).experiment == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "bogus"])


def test_floors_no_edit_scores_the_source_itself(tiny_backend):
    """'no edit' is the source scored as the output: full preservation (PSNR capped at 100 dB,
    SSIM 1) and no success; 'autoencoder round trip' is decode(encode(source)) scored."""
    from dds.eval.floors import measure_floors
    from dds.eval.runner import MemoryRunner, batches
    from dds.eval.world_edits import decode01, held_out_edits, images_of, prepare, score
    from dds.world import Judge

    edits = held_out_edits(2)
    judge = Judge.load()
    src = images_of([e.source for e in edits])
    p = prepare(tiny_backend, edits)
    f = measure_floors(MemoryRunner(), tiny_backend, src, p.z_hat,
                       lambda x, sl: score(x, edits[sl], judge), batches(len(edits), 4))
    none, trip = f["no-edit"], f["round-trip"]
    assert none["success"].tolist() == [0.0] * len(edits)  # the judge reads the old value
    assert np.allclose(none["psnr_out"], 100.0) and np.allclose(none["ssim_out"], 1.0, atol=1e-6)
    for k, v in score(src, edits, judge).items():
        assert np.allclose(none[k], v), k
    for k, v in score(decode01(tiny_backend, p.z_hat), edits, judge).items():
        assert np.allclose(trip[k], v, atol=1e-5), k
    assert np.all(trip["psnr_out"] < 100.0)


def test_editing_table_shows_the_floors_and_marks_the_best_method():
    from dds.eval.builtin_quality import editing_table
    from dds.eval.paired import PAIRED, compare_methods

    def row(success, psnr_out):
        return {"success_pos": success / 2, "success": success, "psnr_gt": 20.0,
                "psnr_gain": 1.0, "psnr_out": psnr_out, "ssim_out": 0.5, "n": 2}

    editing = {"dds": {"all": row(0.5, 30.0)}, "sds": {"all": row(1.0, 20.0)},
               "no-edit": {"all": row(0.0, 100.0)}, "round-trip": {"all": row(0.0, 35.0)}}
    lines = editing_table(editing).splitlines()
    assert lines[0] == ("| edit kind | method | success (placed) ↑ | success (attribute) ↑ | "
                        "PSNR to ground truth ↑ | PSNR gain ↑ | PSNR outside edit ↑ | "
                        "SSIM outside edit ↑ |")
    assert lines[2] == ("| all (n=2) | DDS | 25.0% | 50.0% | **20.00** | **+1.00** | **30.00** | "
                        "**0.500** |")
    assert lines[3] == ("| all (n=2) | SDS | **50.0%** | **100.0%** | **20.00** | **+1.00** | "
                        "20.00 | **0.500** |")
    assert lines[4] == "| all (n=2) | no edit | 0.0% | 0.0% | 20.00 | +1.00 | 100.00 | 0.500 |"
    assert lines[5] == ("| all (n=2) | autoencoder round trip | 0.0% | 0.0% | 20.00 | +1.00 | "
                        "35.00 | 0.500 |")
    assert len(lines) == 6  # no comparison without per-edit values
    per = {"dds": {"success_pos": np.array([1.0, 1.0]), "psnr_gain": np.array([2.0, 3.0])},
           "sds": {"success_pos": np.array([0.0, 1.0]), "psnr_gain": np.array([1.0, 1.5])}}
    editing[PAIRED] = compare_methods(per, ["k", "k"], ("success_pos", "psnr_gain"))
    lines = editing_table(editing).splitlines()
    assert lines[5] == ("| all (n=2) | autoencoder round trip | 0.0% | 0.0% | 20.00 | +1.00 | "
                        "35.00 | 0.500 |")  # the comparison is not a method row
    assert "| k (n=2) | PSNR gain | +2.50 | +1.25 | +1.25 [" in "\n".join(lines)
    assert lines[-1].startswith("| all (n=2) | PSNR gain |") and lines[-1].endswith(
        "| no difference |")  # two edits: t(0.975, 1) = 12.7 makes the interval wide


def test_guidance_sweep_compares_dds_and_sds_at_each_guidance():
    from types import SimpleNamespace

    from dds.eval.experiments.editing import paired_by_guidance

    up = {"success_pos": np.ones(6), "psnr_gain": np.arange(6.0) + 1.0}
    down = {"success_pos": np.zeros(6), "psnr_gain": np.arange(6.0)}
    per = {("dds", 3.0): up, ("sds", 3.0): down, ("dds", 7.5): down, ("sds", 7.5): down,
           ("dds", 15.0): up, ("sdedit", 0.5): down}
    es = SimpleNamespace(compared=("success_pos", "psnr_gain"))
    c = paired_by_guidance(es, per)
    assert list(c) == ["guidance 3.0", "guidance 7.5"]  # 15 has no SDS run to pair with
    assert c["guidance 3.0"]["psnr_gain"]["verdict"] == "DDS better"  # d = 1 on every edit
    assert c["guidance 3.0"]["success_pos"]["verdict"] == "DDS better"
    assert {d["verdict"] for d in c["guidance 7.5"].values()} == {"no difference"}


def test_seeds_are_named_once_with_their_values():
    """The held-out and validation seeds keep their values: the same scenes as before."""
    import inspect

    from dds.eval import seeds
    from dds.eval.builtin_quality import eval_editing, eval_generation, eval_vae
    from dds.eval.experiments.common import world_scenes
    from dds.eval.world_edits import held_out_edits
    from dds.translate.data import parse_task
    from dds.translate.evaluate import world_task_edits
    from dds.world import caption

    assert (seeds.HELD_OUT_SEED, seeds.VALIDATION_SEED, seeds.TRANSLATION_TEST_SEED) == (
        10_000, 20_000, 20_000)
    for fn in (eval_editing, eval_generation, eval_vae, held_out_edits):
        assert inspect.signature(fn).parameters["seed"].default == 10_000
    assert held_out_edits(1)[0].source_caption == "an orange square over a blue background"
    assert held_out_edits(1)[2].target_caption == ("a yellow background with a pink cross and "
                                                   "a purple triangle")
    assert held_out_edits(1, seed=seeds.VALIDATION_SEED)[1].target_caption == (
        "a green background with a purple star")
    assert caption(world_scenes(2, 0)[1]) == "a white triangle on a yellow dotted background"
    assert derangement(5, 0).tolist() == [2, 3, 4, 0, 1]
    assert world_task_edits(parse_task("circle:square"), 2)[1].source_caption == (
        "a white square and an orange circle on a blue gradient background")


def _eval_parser():
    import argparse

    from dds.eval.cli import add_parser

    parser = argparse.ArgumentParser(prog="dds")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_builtin_defaults_write_needs_a_named_folder(tmp_path):
    """--write never falls back to the built-in model's folder inside the package."""
    from dds.eval.cli import _defaults_target

    parse = _eval_parser().parse_args
    args = parse(["eval", "builtin-defaults", "--quick", "--write"])
    assert args.write == ""
    with pytest.raises(DDSError, match="--write needs a folder"):
        args.func(args)  # refused before any model is loaded
    args = parse(["eval", "builtin-defaults", "--write", str(tmp_path / "missing")])
    with pytest.raises(DDSError, match="is not a folder"):
        args.func(args)
    assert _defaults_target(parse(["eval", "builtin-defaults", "--write", str(tmp_path)])) == tmp_path
    assert _defaults_target(parse(["eval", "builtin-defaults", "--write",
                                   "--model", str(tmp_path)])) == tmp_path
    assert _defaults_target(parse(["eval", "builtin-defaults"])) is None
    assert _defaults_target(parse(["eval", "schedules", "--write", str(tmp_path)])) == tmp_path
    args = parse(["eval", "drift", "--write", str(tmp_path)])
    with pytest.raises(DDSError, match="drift chooses nothing"):
        args.func(args)  # refused before any model is loaded


def test_set_overrides_a_preset_in_its_own_types():
    from dds.eval.cli import preset_overrides

    got = preset_overrides(["schedules"], ["budgets=12,16", "schedules=stratified",
                                           "step-rules=budget", "optimizers=", "tails=0.2",
                                           "n_edits=50"])
    assert got == {"schedules": {"budgets": [12, 16], "schedules": ["stratified"],
                                 "step_rules": ["budget"], "optimizers": {}, "tails": [0.2],
                                 "n_edits": 50}}
    assert type(got["schedules"]["budgets"][0]) is int
    got = preset_overrides(["schedules", "guidance-sweep"], ["optimizers=adam:0.005,momentum:1",
                                                             "guidances=1,7.5"])
    assert got == {"schedules": {"optimizers": {"adam": 0.005, "momentum": 1.0}},
                   "guidance-sweep": {"guidances": [1.0, 7.5]}}
    # with `all`, a key goes to every experiment that has it
    got = preset_overrides(list(EXPERIMENTS), ["n_edits=3"])
    assert {n for n, o in got.items() if o} == {n for n, e in EXPERIMENTS.items()
                                                 if "n_edits" in e.full}
    for bad, why in [("budget=16", "names no setting of schedules"),
                     ("budgets", "names no setting"), ("budgets=16,x", "is invalid"),
                     ("n_edits=-3", "not negative"), ("optimizers=adam", "NAME:VALUE")]:
        with pytest.raises(DDSError, match=why):
            preset_overrides(["schedules"], [bad])


def test_a_setting_that_cannot_run_is_refused_before_any_unit(tiny_backend, tmp_path):
    out = tmp_path / "sched"
    with pytest.raises(DDSError, match="cosine-constant-n1-s2 cannot run: schedule 'cosine'"):
        run_experiment("schedules", _ctx(tiny_backend, out), n_edits=1, batch=8,
                       reference_steps=4, budgets=[2], schedules=["reference", "cosine"],
                       step_rules=["constant"], n_avg=[1])
    assert not list(out.glob("parts/*-b-*.json"))
    args = _eval_parser().parse_args(["eval", "builtin-quality", "--set", "n_edits=3"])
    with pytest.raises(DDSError, match="--set changes a Section 5"):
        args.func(args)


def test_section5_experiments_edit_on_the_papers_schedule(tmp_path):
    """A model's recommended schedule is the users' default, not the paper's experiments':
    their editing settings stay the reference recipe's steps and uniform t."""
    from types import SimpleNamespace

    from dds.loop import EditConfig

    model = SimpleNamespace(edit_defaults={"lr": 0.03, "dds": {"schedule": "descending",
                                                                "steps": 50}})
    cfg = Context(model=model, out=tmp_path, quiet=True).edit_cfg()
    assert (cfg.schedule, cfg.steps, cfg.lr) == ("reference", EditConfig.steps, 0.03)
    cfg = Context(model=model, out=tmp_path, quiet=True).edit_cfg(schedule="descending", steps=9)
    assert (cfg.schedule, cfg.steps) == ("descending", 9)


def test_plots_leave_the_process_matplotlib_state_alone(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "import dds, dds.eval.plots as plots\n"
        f"plots.band_lines({str(tmp_path / 'a.png')!r}, [1, 2], {{'x': ([1, 2], [0.1, 0.1])}},"
        " 'x', 'y', 't')\n"
        "print('matplotlib.pyplot' in sys.modules, "
        "dict.__getitem__(matplotlib.rcParams, 'backend') == before)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["False", "True"]
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_log_axes_label_only_the_measured_settings(tmp_path, monkeypatch):
    # A log axis labels its minor ticks too (3x10^1, 4x10^1, ...) unless they are switched off;
    # both plots of settings must label exactly the settings measured.
    from dds.eval import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    pts = [(25, 1.0), (50, 2.0), (100, 2.5), (200, 2.4), (400, 2.0)]
    plots.metric_vs_setting(tmp_path / "a.png", {"m": pts, "n": pts}, "steps", "y", "t",
                            separate=True, vline=200)
    plots.curves_by_panel(tmp_path / "b.png", {"m: a": pts}, ["m"], xlabel="calls")
    for fig in figs:
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels()] == ["25", "50", "100", "200", "400"]
            assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text()]


def test_success_by_target_value_splits_each_kind_by_the_value_asked_for():
    from types import SimpleNamespace

    from dds.eval.builtin_quality import BY_VALUE, by_target_value, editing_table

    edits = [SimpleNamespace(kind=k, new_value=v) for k, v in [
        ("object_color", "green"), ("object_color", "red"), ("object_color", "green"),
        ("object_shape", "star"), ("object_color", "red"), ("object_color", "red")]]
    per = {"dds": {"success_pos": np.array([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]),
                   "success": np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
                   "psnr_gain": np.ones(6)},
           "sds": {"success_pos": np.array([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
                   "success": np.ones(6), "psnr_gain": np.ones(6)}}
    by = by_target_value(per, edits)
    assert list(by) == ["object_color", "object_shape"]
    assert list(by["object_color"]) == ["green", "red"]
    green, red = by["object_color"]["green"], by["object_color"]["red"]
    assert (green["n"], red["n"], by["object_shape"]["star"]["n"]) == (2, 3, 1)
    assert green["dds"] == {"success_pos": 0.0, "success": 0.5}  # no PSNR: success only
    assert red["dds"]["success_pos"] == pytest.approx(2 / 3) and green["sds"]["success_pos"] == 1.0
    row = {"success_pos": 0.5, "success": 0.5, "psnr_gt": 20.0, "psnr_gain": 1.0,
           "psnr_out": 30.0, "ssim_out": 0.5, "n": 6}
    text = editing_table({"dds": {"all": row}, "sds": {"all": row}, BY_VALUE: by})
    assert "| edit kind | changed to | n | DDS: placed (attribute) | SDS: placed (attribute) |" in text
    assert "| object_color | green | 2 | 0.0% (50.0%) | 100.0% (100.0%) |" in text
    assert "| object_color | red | 3 | 66.7% (100.0%) | 0.0% (100.0%) |" in text
    assert "BY_VALUE" not in text and "| by_value |" not in text  # not a method row
