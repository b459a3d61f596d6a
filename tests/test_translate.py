"""The translation network (paper Section 4): network surgery, tasks, data, training,
exact resume after SIGKILL, damaged checkpoints, inference and its CLI, on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds.cli import main
from dds.errors import DDSError
from dds.translate.data import FolderSources, TaskTable, WorldSources, load_tasks, parse_task
from dds.translate.train import (
    TrainConfig,
    guidance,
    lambda_id,
    latest_good,
    train,
    train_levels,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def weights(folder):
    from safetensors.torch import load_file

    return {**load_file(Path(folder) / "unet.safetensors"),
            **{f"task.{k}": v for k, v in load_file(Path(folder) / "tasks.safetensors").items()}}


@pytest.fixture(scope="module")
def trained(translate_cfg, tmp_path_factory):
    return train(translate_cfg(tmp_path_factory.mktemp("tr") / "run"))


# ---- network ----------------------------------------------------------------------------
def test_network_is_identity_at_init_and_time_input_is_the_task_embedding(tiny_sd, tiny_backend):
    from diffusers import UNet2DConditionModel

    from dds.translate.network import TranslationNet

    stock = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    phrases = tiny_backend.encode_prompt(["square", "star"]).embeds  # (2,77,16)
    net = TranslationNet.from_unet(
        UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"), phrases)
    z_hat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([0, 1, 1])
    with torch.no_grad():
        assert torch.equal(net(z_hat, k), z_hat)  # s = 0: exactly the identity
        net.out_gain.fill_(1.0)
        want = z_hat + stock(z_hat, torch.tensor(500), encoder_hidden_states=phrases[k]).sample
        torch.testing.assert_close(net(z_hat, k), want, rtol=1e-5, atol=1e-5)
        # The per-task time embedding really drives the UNet (AdaGN): change it, output changes.
        net.unet.time_embedding.table[1] += 1.0
        out = net(z_hat, k)
        torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[1:], want[1:])


# ---- tasks and data -----------------------------------------------------------------------
def test_task_rules():
    t = parse_task("circle:square")
    assert (t.name, t.phrase) == ("square", "square")
    assert t.target_caption("a red circle on a blue background") == "a red square on a blue background"
    assert t.target_caption("a red star on a blue background") is None
    c = parse_task("red:orange")
    assert c.target_caption("a red star over a blue background") == "an orange star over a blue background"
    f = parse_task("lion=a photo of a lion")
    assert f.target_caption("anything") == "a photo of a lion"
    with pytest.raises(DDSError, match="not understood"):
        parse_task("circle")
    with pytest.raises(DDSError, match="twice"):
        load_tasks(["circle:square", "star:square"])


def test_world_rule_edits_the_scene_and_only_applicable_sources_are_sampled():
    pool = WorldSources(60, 0, 16)
    table = TaskTable.build(pool, load_tasks(["circle:square"]))
    assert table.sources[0] and len(table.sources[0]) < len(pool)
    for i in table.sources[0]:
        assert "circle" in pool.captions[i]
        assert table.targets[0][i] == pool.captions[i].replace("circle", "square")
    for _k, i, y in table.sample(np.random.default_rng(0), 20):
        assert i in table.sources[0] and y == table.targets[0][i]
    with pytest.raises(DDSError, match="applies to none"):
        TaskTable.build(WorldSources(5, 0, 16), load_tasks(["lion=x"]) + load_tasks(["zebra:cat"]))


def make_folder(tmp_path, rows):
    d = tmp_path / "data"
    d.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_bad_data_is_reported_with_its_path_then_skipped_or_refused(tmp_path, capsys):
    d = make_folder(tmp_path, [{"file_name": "ok.png", "text": "a circle"},
                               {"file_name": "broken.png", "text": "a circle"},
                               {"file_name": "ok.png"}])
    with pytest.raises(DDSError, match="broken.png"):
        FolderSources(d, 16, "error")
    pool = FolderSources(d, 16, "skip")
    err = capsys.readouterr().err
    assert len(pool) == 1 and "broken.png" in err and "no caption" in err
    assert pool.image(0).shape == (3, 16, 16)


# ---- schedules ----------------------------------------------------------------------------
def test_schedules():
    cfg = TrainConfig(steps=101, lambda_id_start=2.0, lambda_id_end=0.5, guidance_start=1.0,
                      guidance_warmup=0.5)
    assert lambda_id(0, cfg) == 2.0 and abs(lambda_id(100, cfg) - 0.5) < 1e-12
    assert abs(lambda_id(50, cfg) - 1.25) < 1e-12
    lams = [lambda_id(s, cfg) for s in range(101)]
    assert all(a >= b for a, b in zip(lams, lams[1:], strict=False))
    assert guidance(0, cfg, 7.5) == 1.0 and guidance(60, cfg, 7.5) == 7.5
    assert 1.0 < guidance(25, cfg, 7.5) < 7.5
    no_warmup = TrainConfig(steps=101, guidance_warmup=0.0)
    assert guidance(0, no_warmup, 7.5) == 7.5


def test_timestep_schedules_of_the_trainer():
    lo, hi = 50, 949  # t in [t_min, t_max - 1)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # uniform: the paper's i.i.d. draw, exactly torch.randint's
    cfg = TrainConfig(steps=100, t_min=lo, t_max=hi + 1)
    assert torch.equal(train_levels(g(), cfg, 7, 16), torch.randint(lo, hi, (16,), generator=g()))
    # stratified: the batch's 8 samples fall one in each eighth of the range
    cfg = TrainConfig(steps=100, t_min=lo, t_max=hi + 1, t_schedule="stratified")
    for seed in range(5):
        t = train_levels(torch.Generator().manual_seed(seed), cfg, 0, 8)
        strata = ((t - lo) * 8 // (hi - lo)).sort().values
        assert strata.tolist() == list(range(8)), t
    # descending: the first tenth of the run draws from the noisiest tenth, the last from
    # the least noisy; the windows fall step by step
    cfg = TrainConfig(steps=100, t_min=lo, t_max=hi + 1, t_schedule="descending")
    width = (hi - lo) / 10
    first, last = train_levels(g(), cfg, 0, 64), train_levels(g(), cfg, 99, 64)
    assert first.min() >= lo + 9 * width - 1 and first.max() < hi
    assert last.min() >= lo and last.max() < lo + width
    means = [float(train_levels(g(), cfg, s, 64).float().mean()) for s in range(0, 100, 10)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False)), means
    with pytest.raises(DDSError, match="t-schedule"):
        TrainConfig(t_schedule="sometimes")


# ---- training, checkpoints, resume ------------------------------------------------------------
def test_training_writes_checkpoints_logs_samples_and_model(trained):
    ck = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ck == ["step-0000002", "step-0000004"]
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 5
    assert "guidance" in rows[0] and "lambda_id" in rows[0]
    assert (trained / "samples" / "step-0000004.png").is_file()
    assert (trained / "model" / "vae" / "config.json").is_file()
    # The network moved away from the identity.
    assert weights(trained / "model")["task.out_gain"].abs().sum() > 0


def test_tensorboard_logs_the_schedules_as_in_log_csv(trained):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "tb").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    rows = list(csv.DictReader((trained / "log.csv").open()))
    for key in ("guidance", "lambda_id", "dds_grad_norm"):
        logged = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in logged] == [int(r["step"]) for r in rows]
        assert [v for _, v in logged] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)


# Runs `dds translate-train` in a child process whose checkpoint writer hangs once the step-2
# checkpoint is on disk, so that the test can SIGKILL it there.
HANG_AFTER_CHECKPOINT = """
import sys, time
import dds.translate.train as T

write = T.write_checkpoint

def write_then_hang(run, step, *args, **kw):
    out = write(run, step, *args, **kw)
    if step >= 2:
        print(f"hanging after step {step}", file=sys.stderr, flush=True)
        time.sleep(3600)
    return out

T.write_checkpoint = write_then_hang
sys.exit(T.main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_sd, translate_cfg,
                                                                tmp_path, trained):
    run = tmp_path / "killed"
    cfg = translate_cfg(run)
    cmd = [sys.executable, "-c", HANG_AFTER_CHECKPOINT, "--out", str(run), "--model", str(tiny_sd),
           "--task", "circle:square", "--task", "circle:star", "--world-size", "40",
           "--resolution", "16", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2",
           "--val-every", "2", "--val-images", "2", "--log-every", "1", "--cpu", "--quiet"]
    # The same thread count as the in-process run it is compared with, bit for bit: CPU
    # kernels' rounding (and dds.models.trace's row split) depends on it.
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        for line in proc.stderr:
            if "hanging after step 2" in line or time.time() > deadline:
                break
        assert proc.poll() is None, "the training process ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # Killed after the step-2 checkpoint: the log holds steps 1 and 2 only.
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert latest_good(run).name == "step-0000002"
    # A newer but damaged checkpoint (and a half-written one) must be passed over.
    bad = run / "checkpoints" / "step-0000003"
    bad.mkdir()
    (bad / "unet.safetensors").write_bytes(b"partial")
    (run / "checkpoints" / ".tmp-step-0000003-1").mkdir()
    train(TrainConfig(**{**cfg.to_dict(), "tasks": cfg.tasks, "resume": "latest"}))
    got, want = weights(run / "model"), weights(trained / "model")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_damaged_checkpoint_is_named_in_one_sentence(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    f = run / "checkpoints" / "step-0000004" / "tasks.safetensors"
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    msgs = []
    assert latest_good(run, msgs.append).name == "step-0000002"
    assert len(msgs) == 1 and "step-0000004" in msgs[0] and "checksum" in msgs[0]


def test_refuses_to_overwrite_a_run_or_resume_with_other_settings(translate_cfg, trained, tiny_sd):
    with pytest.raises(DDSError, match="inside the base model's folder"):
        train(translate_cfg(tiny_sd / "runs" / "one"))
    assert not (tiny_sd / "runs").exists()
    with pytest.raises(DDSError, match="--resume latest"):
        train(translate_cfg(trained))
    with pytest.raises(DDSError, match="different lr"):
        train(translate_cfg(trained, lr=1e-3, resume="latest"))


def test_a_run_older_than_a_new_setting_resumes_with_its_default(translate_cfg, trained,
                                                                 tmp_path):
    import shutil

    run = tmp_path / "older"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    del saved["t_schedule"]  # written before the trainer had the setting
    (run / "config.json").write_text(json.dumps(saved))
    assert train(translate_cfg(run, resume="latest")).is_dir()  # uniform: what it ran with
    with pytest.raises(DDSError, match="different t-schedule"):
        train(translate_cfg(run, t_schedule="descending", resume="latest"))


# ---- inference ----------------------------------------------------------------------------
@pytest.fixture
def registered():
    """`dds translate` is in the CLI's registry."""
    from dds import commands

    assert any(f.__name__ == "_translate" for f in commands.REGISTRY)


def test_translate_python_call_and_cli(trained, tmp_path, capsys, registered):
    from dds.translate import Translator, translate

    tr = Translator(trained)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batched = tr.edit_tensor(x, "square")
    one = tr.edit_tensor(x[1:2], "square")
    torch.testing.assert_close(batched[1:2], one, rtol=1e-4, atol=1e-4)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "a.png")
    ims = translate(trained / "model", [tmp_path / "a.png", Image.new("RGB", (32, 32))], "star")
    assert [im.size for im in ims] == [(16, 16), (16, 16)]

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    assert main(["translate", str(folder), "--model", str(trained), "--task", "square",
                 "--out", str(tmp_path / "out"), "--quiet", "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    for argv, words in [
        ([str(tmp_path / "nope.png"), "--task", "square"], "does not exist"),
        ([str(tmp_path / "a.png"), "--task", "lion"], "square, star"),
        ([str(tmp_path / "a.png"), "--task", "square", "--model", str(tmp_path)], "no translation"),
    ]:
        argv = ["translate", *argv] + ([] if "--model" in argv else ["--model", str(trained)])
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_eval_report_pairs_the_network_with_its_baselines_and_compare_pairs_two_reports(
        trained, tmp_path, capsys, registered):
    out = tmp_path / "eval.json"
    assert main(["translate-eval", "--model", str(trained), "--n", "3", "--baselines", "dds",
                 "--dds-steps", "2", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert printed == (tmp_path / "eval.md").read_text() + "\n"
    assert "zero-shot DDS" in printed and "no edit" in printed
    tasks = np.array(rep["edits"]["task"])
    assert tasks.tolist() == ["square"] * 3 + ["star"] * 3
    per = {m: {k: np.array(v, dtype=float) for k, v in d.items()}
           for m, d in rep["per_edit"].items()}
    assert set(per) == {"network", "zero_shot_dds", "no-edit", "round-trip"}
    for task in ("square", "star"):  # the per-task means are the means of that task's edits
        for k in ("psnr_gt", "psnr_gain", "ssim_out", "success_pos"):
            assert rep["tasks"][task]["network"][k] == pytest.approx(per["network"][k][tasks == task].mean())
    # psnr_gain is psnr_gt over the no-edit floor's, edit by edit
    np.testing.assert_allclose(per["network"]["psnr_gain"],
                               per["network"]["psnr_gt"] - per["no-edit"]["psnr_gt"], atol=1e-9)
    (c,) = rep["paired"]
    assert (c["a"], c["b"]) == ("network", "zero_shot_dds")
    d = c["by"]["all"]["psnr_gain"]
    diff = per["network"]["psnr_gain"] - per["zero_shot_dds"]["psnr_gain"]
    assert d["n"] == 6 and d["difference"] == pytest.approx(diff.mean())
    assert d["low"] < diff.mean() < d["high"] or diff.std() == 0

    # two networks on the same edits: B is A with 1 dB more gain on every edit
    shifted = json.loads(out.read_text())
    shifted["per_edit"]["network"]["psnr_gain"] = (per["network"]["psnr_gain"] + 1).tolist()
    (tmp_path / "b.json").write_text(json.dumps(shifted))
    assert main(["translate-compare", str(out), str(tmp_path / "b.json"), "--names", "full,sds",
                 "--out", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())["by"]["all"]
    assert c["psnr_gain"]["difference"] == pytest.approx(-1.0)
    assert c["psnr_gain"]["low"] == pytest.approx(-1.0) and c["psnr_gain"]["verdict"] == "sds better"
    assert c["ssim_out"]["difference"] == 0 and c["ssim_out"]["verdict"] == "no difference"
    assert "| full | sds |" in capsys.readouterr().out

    shifted["edits"]["digest"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(shifted))
    del shifted["per_edit"]
    (tmp_path / "old.json").write_text(json.dumps(shifted))
    for argv, words in [([str(out), str(tmp_path / "other.json")], "different edits"),
                        ([str(out), str(tmp_path / "old.json")], "no per-edit metrics"),
                        ([str(out), str(tmp_path / "none.json")], "does not exist"),
                        ([str(out), str(out), "--names", "x"], "two different names"),
                        ([str(out), str(out), "--names", "x,x"], "two different names")]:
        assert main(["translate-compare", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


# ---- evaluation helpers -------------------------------------------------------------------
def test_collapse_metrics_tell_a_fixed_place_from_following_the_input():
    from dds.eval.world_edits import images_of
    from dds.translate.evaluate import collapse_metrics, world_task_edits

    edits = world_task_edits(parse_task("circle:square"), 12)
    assert len(edits) == 12 and all(e.kind == "object_shape" for e in edits)
    good = collapse_metrics(images_of([e.target for e in edits]), edits)
    assert good["pos_err"] < 0.5 and good["pos_corr_x"] > 0.99
    same = images_of([edits[0].target] * len(edits))  # the same picture for every input
    bad = collapse_metrics(same, edits)
    assert bad["pos_err"] > 3 and bad["mask_iou_pairwise"] > good["mask_iou_pairwise"]


# ---- several processes ------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cpu_processes_with_accumulation(tiny_sd, tmp_path):
    run = tmp_path / "ddp"
    # torchrun starts the processes; accelerate sees WORLD_SIZE=2 and runs multi-CPU (gloo).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "dds.translate.train", "--out", str(run), "--model", str(tiny_sd),
           "--task", "circle:square", "--world-size", "40", "--resolution", "16",
           "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--checkpoint-every", "1",
           "--keep-checkpoints", "1", "--val-images", "1", "--cpu", "--quiet"]
    # The same thread count as the in-process run it is compared with, bit for bit: CPU
    # kernels' rounding (and dds.models.trace's row split) depends on it.
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[-1].split(",")[1] == "8"  # 2 steps x 2 processes x 2 micro-batches x 1


def test_web_app_translation_tab_uses_the_network(trained):
    from PIL import Image

    from dds.translate import Translator
    from dds.ui.app import load_translator

    tab = load_translator(trained)
    net = Translator(trained)
    assert tab.tasks == list(net.tasks)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = tab(im, net.tasks[0])
    assert out.size == im.size
    assert np.array_equal(np.asarray(out), np.asarray(net([im], net.tasks[0])[0]))


def test_a_checkpoint_without_its_vae_uses_the_base_models(trained, tmp_path):
    """Checkpoints hold the network only; its autoencoder then comes from the base model,
    through the model registry (nothing else reads a model's folder)."""
    from dds.errors import DDSError
    from dds.translate import Translator

    last = sorted(p for p in (trained / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    assert not (last / "vae").exists()
    exported, checkpoint = Translator(trained / "model"), Translator(last)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(exported.edit_tensor(x, "square"), checkpoint.edit_tensor(x, "square"))
    with pytest.raises(DDSError, match="has no autoencoder.*--base-model"):
        Translator(last, base_model=tmp_path)
