"""`dds edit` at dataset scale (dds.jobs): batches give the edits one by one gives, two processes
give the outputs one gives, every job is recorded, failures stay with their job, reruns resume,
every input kind reads, and the bar counts every process's records.

The tiny test model at 16x16 keeps each edit to milliseconds; the two-process test starts two
interpreters (about 20 s on two loaded cores)."""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds.cli import main
from dds.jobs.inputs import JobOptions, job_seed, read_jobs
from dds.jobs.manifest import ShardWriter, merge, read_records, shard_path
from dds.jobs.plan import make_batches, shard

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_batch.py"
FAST = ["--size", "16", "--steps", "2", "--quiet"]


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def records(folder) -> dict:
    return read_records(Path(folder))


@pytest.fixture
def photos(tmp_path):
    """A folder of four 32x32 photos (16x16 at --size 16, as world scenes: every test's
    batches then reuse the same traced denoiser shapes, built once per process)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


# ---- seeds and the plan ---------------------------------------------------------------------
def test_a_jobs_seed_is_a_function_of_the_job(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{name}.png")
    rows = ["a.png,x,y", "b.png,x,z", "c.png,x,w"]
    lists = []
    for i, order in enumerate((rows, rows[::-1])):
        f = tmp_path / f"jobs{i}.csv"
        f.write_text("image,source,target\n" + "\n".join(order) + "\n")
        jl = read_jobs(str(f), JobOptions(out=str(tmp_path / "out"), seed=5))
        lists.append({j.key: j.seed for j in jl.jobs})
    assert lists[0] == lists[1]  # reordering rows changes no job's seed
    assert lists[0]["a-dds.png"] == job_seed(5, "a-dds.png") != job_seed(6, "a-dds.png")
    assert len(set(lists[0].values())) == 3
    f = tmp_path / "seeded.jsonl"  # an explicit seed column wins
    f.write_text('{"image": "a.png", "source": "x", "target": "y", "seed": 7}\n')
    assert read_jobs(str(f), JobOptions(out=str(tmp_path / "o"))).jobs[0].seed == 7


def test_the_plan_does_not_depend_on_the_number_of_processes(tmp_path):
    jl = read_jobs("world:10", JobOptions(out=str(tmp_path / "o")))
    sizes = [(16, 16) if j.index % 3 else (16, 8) for j in jl.jobs]
    batches = make_batches(jl.jobs, sizes, 3)
    assert [[j.index for j in b] for b in batches] == [[0, 3, 6], [1, 2, 4], [5, 7, 8], [9]]
    for n in (1, 2, 3, 5):
        shards = [shard(batches, r, n) for r in range(n)]
        # every batch is run once, whole, by exactly one process
        assert sorted(id(b) for s in shards for b in s) == sorted(id(b) for b in batches)


# ---- batches, processes ---------------------------------------------------------------------
def test_batched_edits_are_the_one_by_one_edits(tiny_sd, photos, tmp_path, capsys):
    """B edits in one denoiser call per step give each edit its own result: the same seeds,
    and pixels equal to float rounding (a batch of 4 or 1 rounds differently on a CPU)."""
    outs = {}
    for b in (4, 1):
        out = tmp_path / f"b{b}"
        code, err = run(capsys, "edit", photos, "--source", "a photo", "--target", "a red circle",
                        "--model", tiny_sd, "--batch-size", b, "--out", out, *FAST)
        assert code == 0, err
        outs[b] = out
    r4, r1 = records(outs[4]), records(outs[1])
    assert sorted(r["runtime"]["batch"] for r in r4.values()) == [4, 4, 4, 4]
    assert {r["runtime"]["batch"] for r in r1.values()} == {1}
    for key in r4:
        assert r4[key]["seed"] == r1[key]["seed"] == job_seed(0, key)
        assert np.abs(pixels(outs[4] / key) - pixels(outs[1] / key)).max() <= 2
    # the single-image command with the job's seed makes the same edit (the step-by-step loop)
    seed = r4["p0-dds.png"]["seed"]
    code, err = run(capsys, "edit", photos / "p0.png", "--source", "a photo", "--target",
                    "a red circle", "--model", tiny_sd, "--seed", seed, "--out",
                    tmp_path / "one.png", *FAST)
    assert code == 0, err
    assert np.abs(pixels(tmp_path / "one.png") - pixels(outs[4] / "p0-dds.png")).max() <= 2
    meta = json.loads(Image.open(outs[4] / "p0-dds.png").text["dds"])
    assert meta["config"]["seed"] == seed and meta["batch"] == 4 and meta["size"] == [16, 16]


def test_two_processes_give_the_outputs_of_one(tiny_sd, tmp_path, capsys):
    """world:6 in batches of 2: one process, then two (accelerate's launcher), the same bits."""
    args = ["world:6", "--model", tiny_sd, "--batch-size", "2", "--threads", "1", *FAST]
    code, err = run(capsys, "edit", *args, "--out", tmp_path / "one")
    assert code == 0, err
    r = subprocess.run([sys.executable, "-m", "dds.cli", "edit", *map(str, args), "--processes",
                        "2", "--out", str(tmp_path / "two")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 of 6 edits done" in r.stderr and "Traceback" not in r.stderr
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 6
    assert {rec["runtime"]["rank"] for rec in two.values()} == {0, 1}
    assert {rec["runtime"]["processes"] for rec in two.values()} == {2}
    for key in one:
        assert one[key]["seed"] == two[key]["seed"]
        assert np.array_equal(pixels(tmp_path / "one" / key), pixels(tmp_path / "two" / key))
        assert one[key]["metrics"] == two[key]["metrics"]  # the world's truth is known
        assert set(one[key]["metrics"]) >= {"success", "success_pos", "psnr_gt", "ssim_out"}
    # the shards merge into one manifest, and a rerun finds everything done
    assert sorted(p.name for p in (tmp_path / "two").glob("manifest*")) == [
        "manifest-0.jsonl", "manifest-1.jsonl"]
    code, err = run(capsys, "edit", "--merge-manifests", tmp_path / "two")
    assert code == 0 and "merged 6 job records" in err
    assert [p.name for p in (tmp_path / "two").glob("manifest*")] == ["manifest.jsonl"]
    lines = (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(6))
    code, err = run(capsys, "edit", *args, "--out", tmp_path / "two", "--resume")
    assert code == 0 and "6 of 6 edits already written" in err


# ---- failures, resume -----------------------------------------------------------------------
def _truncated_png(path: Path) -> None:
    """A PNG whose header reads but whose pixels end early: found only when it is decoded."""
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(b, "PNG")
    path.write_bytes(b.getvalue()[:400])


def test_a_failing_job_fails_alone_and_reruns_retry_it(tiny_sd, photos, tmp_path, capsys,
                                                        monkeypatch):
    from dds.errors import DivergedError
    from dds.fast import FastEditor

    Image.open(photos / "p0.png").save(photos / "p4.png")
    _truncated_png(photos / "p5.png")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,source,target,seed\n" + "".join(
        f"photos/p{i}.png,a photo,a red circle,{i}\n" for i in range(6)))
    real, calls = FastEditor.edit, []

    def edit(self, z_hat, cs, ct, cfg, seeds=None):
        calls.append(list(seeds))
        if 2 in seeds:  # job 3 diverges, alone or in its batch
            raise DivergedError("the edit diverged by step 2 (the latents became infinite or "
                                "exploded); lower the guidance or the learning rate (lr) and try again")
        return real(self, z_hat, cs, ct, cfg, seeds=seeds)

    monkeypatch.setattr(FastEditor, "edit", edit)
    out = tmp_path / "res"
    argv = ["edit", jobs, "--model", tiny_sd, "--batch-size", "4", "--out", out, *FAST]
    code, err = run(capsys, *argv)
    assert code == 1, err  # not every job succeeded
    assert calls == [[0, 1, 2, 3], [0], [1], [2], [3], [4]]  # the batch again, one by one
    recs = records(out)
    status = {k: r["status"] for k, r in recs.items()}
    assert status == {f"p{i}-dds.png": "ok" if i not in (2, 5) else "failed" for i in range(6)}
    assert "diverged by step 2" in recs["p2-dds.png"]["error"]
    assert "damaged or truncated" in recs["p5-dds.png"]["error"]
    assert not (out / "p2-dds.png").exists() and (out / "p3-dds.png").exists()
    assert "4 of 6 edits done" in err and "2 failed" in err
    before = (out / "p0-dds.png").read_bytes()
    # --resume: the finished edits are skipped, the failed ones tried again
    calls.clear()
    code, err = run(capsys, *argv, "--resume")
    assert code == 1 and "resuming: 4 of 6 edits already written" in err
    assert calls == [[2]] and (out / "p0-dds.png").read_bytes() == before
    # --skip-failed leaves them: nothing to edit, no model, still not a success
    calls.clear()
    code, err = run(capsys, *argv, "--resume", "--skip-failed")
    assert code == 1 and "leaving 2 failed edits alone" in err and calls == []
    # other settings than the finished edits' are refused before anything runs
    code, err = run(capsys, *[a if a != "2" else "3" for a in map(str, argv)], "--resume")
    assert code == 2 and "were made with other settings (steps 3 now, 2 then)" in err


def test_an_output_written_but_not_recorded_is_found(tiny_sd, photos, tmp_path, capsys):
    """A process killed between writing an output and recording it: --resume records it."""
    out = tmp_path / "res"
    argv = ["edit", photos, "--source", "a", "--target", "b", "--model", tiny_sd, "--out", out,
            *FAST]
    assert run(capsys, *argv)[0] == 0
    (out / "manifest-0.jsonl").unlink()
    code, err = run(capsys, *argv, "--resume")
    assert code == 0 and "4 of 4 edits already written" in err
    assert all(r.get("recovered") and r["status"] == "ok" for r in records(out).values())


# ---- inputs ---------------------------------------------------------------------------------
def test_an_imagefolder_with_its_own_column_names(tiny_sd, photos, tmp_path, capsys):
    root = tmp_path / "ds"
    for sub in ("a", "b"):  # one file name in two folders: the outputs keep the folders
        (root / "images" / sub).mkdir(parents=True)
        Image.open(photos / "p0.png").save(root / "images" / sub / "x.png")
    (root / "metadata.jsonl").write_text(
        '{"path": "images/a/x.png", "caption": "a photo", "edited": "a red circle"}\n'
        '{"path": "images/b/x.png", "caption": "a photo", "edited": "a blue star"}\n')
    out = tmp_path / "res"
    code, err = run(capsys, "edit", root, "--image-column", "path", "--source-column", "caption",
                    "--target-column", "edited", "--model", tiny_sd, "--out", out,
                    "--batch-size", "1", *FAST)
    assert code == 0, err
    assert (out / "images/a/x-dds.png").is_file() and (out / "images/b/x-dds.png").is_file()
    assert {r["target"] for r in records(out).values()} == {"a red circle", "a blue star"}
    # the trainer's layout (file_name, text) with one --target for every row
    (root / "metadata.jsonl").write_text('{"file_name": "images/a/x.png", "text": "a photo"}\n')
    code, err = run(capsys, "edit", root, "--target", "a cat", "--model", tiny_sd, "--out",
                    tmp_path / "res2", "--batch-size", "1", *FAST)
    assert code == 0, err
    assert records(tmp_path / "res2")["images/a/x-dds.png"]["source"] == "a photo"
    # a row missing a column is named, and nothing runs
    (root / "metadata.jsonl").write_text('{"path": "images/a/x.png", "caption": "a photo"}\n')
    code, err = run(capsys, "edit", root, "--image-column", "path", "--model", tiny_sd,
                    "--out", tmp_path / "res3", *FAST)
    assert code == 2 and "job 1 lacks 'target'" in err and not (tmp_path / "res3").exists()


def test_world_jobs_export_with_their_truth_and_are_scored(tiny_sd, tmp_path, capsys):
    folder = tmp_path / "world"
    code, err = run(capsys, "edit", "world:3:5", "--export-jobs", folder)
    assert code == 0, err
    meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == [f"images/{i:06d}.png" for i in range(3)]
    assert all((folder / m["truth"]).is_file() and m["edit"]["kind"] for m in meta)
    out = tmp_path / "res"  # one batch of three: each edit's round trip is its own input's
    code, err = run(capsys, "edit", folder, "--model", tiny_sd, "--out", out, "--batch-size", "3",
                    *FAST)
    assert code == 0, err
    recs = records(out)
    assert all(r["runtime"]["batch"] == 3 and r["runtime"]["engine"] == "fast" for r in recs.values())
    assert all(set(r["metrics"]) == {"success_pos", "success", "psnr_gt", "psnr_gain",
                                     "psnr_out", "ssim_out"} for r in recs.values())
    assert "truth known for 3 edits; mean success (placed)" in err
    # beside each output, the floors: the source itself (no edit) and its autoencoder round trip
    from dds.images import load_image, pil_to_tensor, prepare, tensor_to_pil
    from dds.models import load_model

    model = load_model(str(tiny_sd))
    for i, r in enumerate(recs.values()):
        none, rt = r["floors"]["no-edit"], r["floors"]["round-trip"]
        # (the saved source is the exact render rounded to 8 bits: a gain within 0.05 dB of 0)
        assert none["success"] == 0 and none["ssim_out"] == pytest.approx(1, abs=1e-3)
        assert none["psnr_gain"] == pytest.approx(0, abs=0.05)
        assert none["psnr_gt"] == pytest.approx(
            r["metrics"]["psnr_gt"] - r["metrics"]["psnr_gain"] + none["psnr_gain"], abs=1e-4)
        m = meta[i]  # the round trip computed here: encode, decode, back to the truth's 64x64
        with torch.no_grad():
            x = model.decode(model.encode(pil_to_tensor(prepare(load_image(folder / m["file_name"]), 16))))
        back = np.asarray(tensor_to_pil(x).resize((64, 64), Image.Resampling.LANCZOS)) / 255.0
        truth = np.asarray(load_image(folder / m["truth"])) / 255.0
        # (the scorer's truth is the exact render, the file's is rounded to 8 bits)
        assert rt["psnr_gt"] == pytest.approx(10 * np.log10(1 / np.mean((back - truth) ** 2)), abs=0.02)
        exact_source_psnr = none["psnr_gt"] - none["psnr_gain"]  # the gains' common origin
        assert rt["psnr_gain"] == pytest.approx(rt["psnr_gt"] - exact_source_psnr, abs=1e-4)
    mean_rt = np.mean([r["floors"]["round-trip"]["psnr_gt"] for r in recs.values()])
    assert "floor, autoencoder round trip: mean success (placed)" in err
    assert f"PSNR to ground truth {mean_rt:.2f}" in err.split("round trip:")[1]
    # a truth image alone (no world edit): PSNR to it, and outside where it equals the source
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,source,target,truth\n" + "".join(
        f"world/{m['file_name']},{m['text']},{m['target']},world/{m['truth']}\n" for m in meta))
    code, err = run(capsys, "edit", jobs, "--model", tiny_sd, "--out", tmp_path / "res2",
                    "--batch-size", "1", *FAST)
    assert code == 0, err
    for r in records(tmp_path / "res2").values():
        assert set(r["metrics"]) == {"psnr_gt", "psnr_gain", "psnr_out", "ssim_out"}
        assert all(np.isfinite(v) for v in r["metrics"].values())
        assert r["floors"]["no-edit"]["psnr_gain"] == 0
        assert set(r["floors"]["round-trip"]) == set(r["metrics"])


@pytest.mark.parametrize("argv,needle", [
    (["edit"], "INPUT is missing"),
    (["edit", "world:0"], "is not understood; write world:N"),
    (["edit", "world:2", "--batch-size", "0"], "--batch-size 0 is invalid"),
    (["edit", "world:2", "--save-every", "1", "--batch-size", "2"], "drop --batch-size or"),
    (["edit", "IMAGE", "--source", "a", "--target", "b", "--processes", "2"],
     "one image is one edit"),
    (["edit", "LIST", "--export-jobs", "x"], "--export-jobs writes the jobs of world:N"),
    (["edit", "--merge-manifests", "NOWHERE"], "holds no manifest"),
])
def test_dataset_arguments_refused_in_one_sentence(tmp_path, capsys, argv, needle):
    Image.new("RGB", (16, 16)).save(tmp_path / "i.png")
    (tmp_path / "l.csv").write_text("image,source,target\ni.png,a,b\n")
    subs = {"IMAGE": tmp_path / "i.png", "LIST": tmp_path / "l.csv", "NOWHERE": tmp_path / "no"}
    code, err = run(capsys, *[subs.get(a, a) for a in argv])
    assert code == 2 and needle in err and err.count("\n") == 1, err


# ---- the manifest and the bar ---------------------------------------------------------------
def test_manifest_shards_survive_a_torn_line_and_merge(tmp_path):
    w = ShardWriter(shard_path(tmp_path, 0))
    w.write({"key": "a", "index": 1, "status": "failed", "finished": 1.0})
    w.close()
    with open(shard_path(tmp_path, 0), "ab") as f:
        f.write(b'{"key": "b", "sta')  # a writer killed mid-line
    w = ShardWriter(shard_path(tmp_path, 0))
    w.write({"key": "b", "index": 0, "status": "ok", "finished": 2.0})
    w.close()
    ShardWriter(shard_path(tmp_path, 3)).write({"key": "a", "index": 1, "status": "ok",
                                                 "finished": 3.0})
    recs = read_records(tmp_path)
    assert {k: r["status"] for k, r in recs.items()} == {"a": "ok", "b": "ok"}  # latest wins
    path, _ = merge(tmp_path)
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["b", "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_the_bar_counts_the_records_of_every_process(tmp_path):
    from dds.jobs.run import Progress

    old = ShardWriter(shard_path(tmp_path, 0))
    old.write({"key": "x", "status": "ok"})  # before the run: not counted
    old.close()
    bar = Progress(tmp_path, total=4, quiet=True)
    writers = [ShardWriter(shard_path(tmp_path, r)) for r in (0, 1)]
    writers[0].write({"key": "a", "status": "ok"})
    writers[1].write({"key": "b", "status": "failed"})
    writers[1].write({"key": "r", "status": "ok", "recovered": True})  # not this run's edit
    assert bar.poll() == 2 and (bar.ok, bar.failed) == (1, 1)
    with open(shard_path(tmp_path, 1), "ab") as f:
        f.write(b'{"key": "c", "status": "ok"')  # half a line: not yet
    assert bar.poll() == 2
    with open(shard_path(tmp_path, 1), "ab") as f:
        f.write(b"}\n")
    assert bar.poll() == 3
    bar.stop()
    for w in writers:
        w.close()


# ---- the benchmark --------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_benchmark_runs(tmp_path, monkeypatch, tiny_sd):
    """bench_batch.py end to end on the tiny model (`make slow`; about two minutes)."""
    spec = importlib.util.spec_from_file_location("bench_batch", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_batch", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--model", str(tiny_sd), "--size", "16", "--edits", "4", "--steps", "2",
                         "--json", str(out), "--scratch", str(tmp_path / "scratch")])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    names = [r["name"] for r in data["cpu"]]
    assert names == ["sequential loop", "1 process x B=1", "1 process x B=8", "2 processes x B=8"]
    for r in data["cpu"]:
        assert r["edits"] == 4 and r["edits_per_s"] >= 0 and r["max_pixel_diff"] <= 2
    # the GPU rows' code, on the CPU with the tiny model
    gpu = bench.main(["--no-cpu", "--gpu", "--gpu-device", "cpu", "--gpu-model", str(tiny_sd),
                      "--gpu-size", "16", "--gpu-steps", "2", "--gpu-batches", "1,2",
                      "--scratch", str(tmp_path / "scratch-gpu")])
    assert [(r["batch"], r["edits"]) for r in gpu["gpu"]] == [(1, 3), (2, 6)]
    assert all(r["edits_per_s"] > 0 for r in gpu["gpu"])
