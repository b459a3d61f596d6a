"""The built-in model's tokenizer, trainer, checkpoints/resume and exported diffusers folder."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dds.builtin import configs as C
from dds.builtin import train as T
from dds.errors import DDSError


def tiny_cfg() -> C.TrainConfig:
    return C.with_overrides(C.tiny(), vae_steps=4, unet_steps=4, ckpt_every=2, threads=1)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("builtin")
    res = T.train_builtin(tiny_cfg(), root / "run", root / "model", progress=False)
    return root / "run", root / "model", res


def test_clip_tokenizer_matches_openai_ids():
    from dds.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77 and tok.pad_token_id == 49407


def test_tiny_run_writes_checkpoints_logs_and_pipeline_folder(full_run):
    run_dir, model_dir, res = full_run
    assert res["finished"]
    assert (run_dir / "vae.pt").is_file() and (run_dir / "unet.pt").is_file()
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["text"] * 2 + ["vae"] * 4 + ["unet"] * 4
    assert [int(r["step"]) for r in rows] == [1, 2] + [1, 2, 3, 4] * 2
    assert any(p.name.startswith("vae_") for p in (run_dir / "samples").glob("*.png"))
    assert any(p.name.startswith("unet_") for p in (run_dir / "samples").glob("*.png"))

    for sub in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (model_dir / sub).is_dir()
    # The judge's learning curve: one reading every judge_every steps, the last one of the
    # exported model (measured again here, independently of the training loop).
    with open(run_dir / "eval.csv", newline="") as f:
        readings = list(csv.DictReader(f))
    assert [int(r["step"]) for r in readings] == [2, 4]
    from dds.eval.builtin_quality import eval_generation
    from dds.models.stable_diffusion import StableDiffusionModel
    from dds.world import Judge

    cfg = tiny_cfg()
    again = eval_generation(StableDiffusionModel(model_dir), Judge.load(), cfg.judge_prompts,
                            1, cfg.judge_steps, batch_size=cfg.judge_prompts, quiet=True)
    for k in ("all_attributes", "objects", "object_shape", "object_color", "background"):
        assert float(readings[-1][k]) == pytest.approx(again[k], abs=1e-4), k
    assert res["unet"]["judge_final"]["step"] == "4"
    # ... and the caption gap beside it, recomputed on the exported model.
    from dds.eval.caption_gap import caption_gaps, gap_scenes

    with open(run_dir / "gap.csv", newline="") as f:
        gaps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in gaps] == [2, 4]
    scenes, caps = gap_scenes(2 * cfg.judge_prompts, 10_000)
    rows = caption_gaps(StableDiffusionModel(model_dir), scenes,
                        {k: caps[k] for k in ("own", *T.GAP_WORDS)}, T.GAP_T, 10_000)
    for r in (r for r in rows if r["region"] == "object"):
        for w in T.GAP_WORDS:
            assert float(gaps[-1][f"{w}_{r['t']}"]) == pytest.approx(r[w]["gap_x1000"], abs=2e-3)
            assert float(gaps[-1][f"{w}_{r['t']}_ci"]) == pytest.approx(r[w]["ci95"], abs=2e-3)
    assert res["unet"]["caption_gap_final"]["step"] == "4"
    # ... and the swap direction, recomputed on the exported model.
    from dds.eval.caption_gap import gap_edits, swap_directions

    with open(run_dir / "swap.csv", newline="") as f:
        swaps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in swaps] == [2, 4]
    _, edits = gap_edits(2 * cfg.judge_prompts, 10_000)
    rows = swap_directions(StableDiffusionModel(model_dir), {w: edits[w] for w in T.GAP_WORDS},
                           T.GAP_T, 10_000, turns=T.SWAP_TURNS)
    checked = 0
    for r in (r for r in rows if r["reference"] == T.SWAP_REFERENCE[r["word"]]):
        for k, name in (("cosine", "cos"), ("gain", "share")):
            got = swaps[-1][f"{r['word']}_{name}_{r['t']}"]
            assert float(got) == pytest.approx(r[k]["mean"], abs=2e-4)
            checked += 1
    assert checked == 2 * 2 * len(T.GAP_T)
    assert res["unet"]["swap_direction_final"]["step"] == "4"
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    training = json.loads((model_dir / "training.json").read_text())
    assert training["seed"] == 0 and training["vae"]["steps"] == 4
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(training["scaling_factor"])
    assert vae_cfg["scaling_factor"] != 1.0

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.tokenizer("a photo of a cat").input_ids[1:3] == [320, 1125]
    out = pipe(
        "a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()

    i2i = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir)
    init = torch.rand(1, 3, 64, 64)
    out = i2i(
        "a blue circle on a blue background",
        image=init,
        strength=0.5,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    vae = torch.load(run_dir / "vae.pt", map_location="cpu", weights_only=False)
    unet = torch.load(run_dir / "unet.pt", map_location="cpu", weights_only=False)
    return {
        "vae": vae["model"],
        "unet": unet["unet"],
        "text_encoder": unet["text_encoder"],
        "ema_unet": unet["ema"]["shadow"]["unet"],
        "ema_text": unet["ema"]["shadow"]["text_encoder"],
    }


def test_killed_runs_resume_to_identical_weights(full_run, tmp_path):
    run_dir, _, _ = full_run
    cfg = tiny_cfg()
    run2 = tmp_path / "run"
    # killed in the VAE stage (stage 0 done; after VAE step 3, last checkpoint at step 2) ...
    r = T.train_builtin(cfg, run2, tmp_path / "m", progress=False, stop_after=3)
    assert not r["finished"] and r["stage"] == "vae"
    # ... and again in the UNet stage (after step 2, checkpoint at step 2) ...
    r = T.train_builtin(cfg, run2, tmp_path / "m", progress=False, stop_after=4)
    assert not r["finished"] and r["stage"] == "unet"
    assert not (tmp_path / "m").exists()
    # ... then resumed to the end.
    r = T.train_builtin(cfg, run2, tmp_path / "m", progress=False)
    assert r["finished"]
    a, b = _weights(run_dir), _weights(run2)
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    with open(run2 / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] + [1, 2, 3, 4] * 2
    for name in ("eval.csv", "gap.csv"):
        with open(run2 / name, newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4], name


def test_resume_refuses_a_different_model(full_run):
    from dds.errors import DDSError

    run_dir, _, _ = full_run
    other = C.with_overrides(tiny_cfg(), seed=1)
    with pytest.raises(DDSError):
        T.train_builtin(other, run_dir, None, progress=False, stop_after=0)


def test_command_line_parses():
    from dds.builtin import BUILTIN_DIR

    p = T.build_parser()
    # without --out the model goes into the run folder, never into the installed package
    default = p.parse_args(["--run-dir", "runs/x"])
    assert T.export_dir(default.run_dir, default.out) == Path("runs/x/model")
    assert BUILTIN_DIR.resolve() not in Path("runs/x/model").resolve().parents
    assert T.export_dir("runs/x", BUILTIN_DIR) == BUILTIN_DIR
    a = p.parse_args(["--tiny", "--vae-steps", "3", "--no-resume", "--threads", "1",
                      "--judge-every", "0"])
    assert a.tiny and a.vae_steps == 3 and a.no_resume and a.threads == 1
    assert a.judge_every == 0


def test_presets_name_the_recipes_and_keep_latent_sizes_consistent():
    p = T.build_parser()
    # no --preset: the third release's recipe (the shipped fourth release names its preset)
    assert T.config_from_args(p.parse_args([])) == C.default() == C.third()
    fourth = T.config_from_args(p.parse_args(["--preset", "fourth", "--unet-steps", "7"]))
    assert fourth.name == "fourth" and fourth.unet_steps == 7
    assert fourth.vae.block_out_channels == (32, 64) and fourth.unet.sample_size == 32
    for cfg in (C.default(), C.fourth(), C.tiny()):
        latent = cfg.image_size // 2 ** (len(cfg.vae.block_out_channels) - 1)
        assert latent == cfg.unet.sample_size, cfg.name
        assert len(cfg.unet.down_block_types) == len(cfg.unet.block_out_channels)
        assert len(cfg.unet.up_block_types) == len(cfg.unet.block_out_channels)
    # the fourth's cross-attention sits at 8x8 and 4x4, as the third's does
    attn = [32 // 2**i for i, b in enumerate(C.fourth().unet.down_block_types) if "CrossAttn" in b]
    assert attn == [8, 4]
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "fifth"])
    # the GPU recipe trains the same networks as the fourth, on more scenes per step
    gpu = T.config_from_args(p.parse_args(["--preset", "fourth-gpu", "--unet-steps", "9"]))
    assert (gpu.vae, gpu.unet, gpu.text) == (C.fourth().vae, C.fourth().unet, C.fourth().text)
    assert gpu.unet_steps == 9 and gpu.batch_size > C.fourth().batch_size


def test_step_batches_from_worker_processes_are_the_steps_own():
    """Rendered ahead by worker processes, step s still gets batch_at(cfg, stage, s), also
    after a jump (a resumed run starts mid-stage)."""
    cfg = tiny_cfg()
    ahead = T.StepBatches(cfg, "unet", 3, total=9, workers=2)
    for step in (0, 1, 2, 5, 6):
        got, want = ahead.get(step), T.batch_at(cfg, "unet", step, 3)
        assert got["caption"] == want["caption"]
        assert torch.equal(got["image"], want["image"])
    assert not torch.equal(T.batch_at(cfg, "unet", 1, 3)["image"],
                           T.batch_at(cfg, "unet", 2, 3)["image"])


def test_a_time_limit_exports_the_step_reached_and_resumes_to_the_same_weights(
        full_run, tmp_path):
    """--time-limit: the call stops at a step boundary, checkpoints there and (in the UNet
    stage) exports that step's EMA weights as a loadable folder; the same command then resumes
    to the weights of an uninterrupted run."""
    run_dir, _, _ = full_run
    cfg, run2, out = tiny_cfg(), tmp_path / "run", tmp_path / "m"
    r = T.train_builtin(cfg, run2, out, progress=False, stop_after=cfg.vae_steps + 3)
    assert not r["finished"] and r["stage"] == "unet"  # UNet checkpoint at step 2, step 3 lost
    r = T.train_builtin(cfg, run2, out, progress=False, time_limit=1e-9)  # past at once
    assert not r["finished"] and r["unet"]["stopped_at"].startswith("step 2 of 4")
    record = json.loads((out / "training.json").read_text())
    assert record["unet"]["steps"] == 2 and "stopped_at" in record["unet"]
    ck = torch.load(run2 / "unet.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    for k, v in ck["ema"]["shadow"]["unet"].items():
        assert torch.equal(exported[k], v.to(exported[k].dtype)), k
    r = T.train_builtin(cfg, run2, out, progress=False)
    assert r["finished"] and "stopped_at" not in r["unet"]
    a, b = _weights(run_dir), _weights(run2)
    for part in a:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    with pytest.raises(DDSError, match="--time-limit 0"):
        T.config_from_args(T.build_parser().parse_args(["--time-limit", "0"]))


def test_a_reused_batch_serves_consecutive_steps():
    """With reuse k, steps s .. s+k-1 share batch_at(cfg, stage, s // k): the same from worker
    processes as in place, also after a jump into the middle of a reuse group."""
    cfg = tiny_cfg()
    for workers in (0, 2):
        ahead = T.StepBatches(cfg, "unet", 3, total=10, workers=workers, reuse=3)
        assert ahead.rendered == 4  # steps 0-2, 3-5, 6-8, 9
        for step in (0, 1, 2, 3, 7, 8, 9, 4):
            got, want = ahead.get(step), T.batch_at(cfg, "unet", step // 3, 3)
            assert got["caption"] == want["caption"], (workers, step)
            assert torch.equal(got["image"], want["image"]), (workers, step)
    with pytest.raises(DDSError, match="at least one step"):
        T.StepBatches(cfg, "unet", 3, total=10, reuse=0)
    p = T.build_parser()
    assert T.config_from_args(p.parse_args(["--batch-reuse", "4"])).batch_reuse == 4
    assert C.third().batch_reuse == C.fourth().batch_reuse == 1
    with pytest.raises(DDSError, match="--batch-reuse 0"):
        T.config_from_args(p.parse_args(["--batch-reuse", "0"]))


def test_device_choice():
    assert T.train_device("cpu") == torch.device("cpu")
    assert T.train_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(T.DDSError, match="not one of"):
        T.train_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(T.DDSError, match="no CUDA device"):
            T.train_device("cuda")
    a = T.build_parser().parse_args(["--device", "cpu", "--data-workers", "3"])
    assert (a.device, a.data_workers) == ("cpu", 3)


def test_weighted_mse_closed_forms():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    se = (pred - target).square()
    assert torch.allclose(T.weighted_mse(pred, target, None), se.mean())
    assert torch.allclose(T.weighted_mse(pred, target, torch.full((2, 1, 4, 4), 3.0)), se.mean())
    w = torch.ones(2, 1, 4, 4)
    w[..., :2] = 3.0  # the left half of every map weighs three times the right half
    want = (3 * se[..., :2].mean() + se[..., 2:].mean()) / 4
    assert torch.allclose(T.weighted_mse(pred, target, w), want)


def test_timestep_weights_closed_forms():
    a_bar = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01])
    snr = a_bar.double() / (1 - a_bar.double())  # 99, 9, 1, 1/9, 1/99
    assert torch.equal(T.timestep_weights(a_bar, "none"), torch.ones(5))
    torch.testing.assert_close(T.timestep_weights(a_bar, "min-snr", 5.0),
                               torch.tensor([5 / 99, 5 / 9, 1, 1, 1]))
    torch.testing.assert_close(T.timestep_weights(a_bar, "p2"), (1 / (1 + snr)).float())
    assert T.timestep_weights(a_bar, "p2")[2] == pytest.approx(0.5)
    with pytest.raises(DDSError, match="none, min-snr, p2"):
        T.timestep_weights(a_bar, "snr")


def test_a_run_seeded_from_an_exported_model_trains_only_its_unet(full_run, tmp_path, capsys):
    from diffusers import AutoencoderKL

    _, model_dir, _ = full_run
    cfg = C.with_overrides(tiny_cfg(), timestep_weighting="p2")
    run = tmp_path / "run"
    assert T.seed_from_model(cfg, run, model_dir) == ["text.pt", "vae.pt"]
    assert T.seed_from_model(cfg, run, model_dir) == []  # kept: the run resumes
    r = T.train_builtin(cfg, run, tmp_path / "m", progress=False)
    assert r["finished"] and r["vae"]["seeded_from"] == str(model_dir)
    with open(run / "log.csv", newline="") as f:
        assert [row["stage"] for row in csv.DictReader(f)] == ["unet"] * 4
    a, b = (AutoencoderKL.from_pretrained(d / "vae") for d in (model_dir, tmp_path / "m"))
    assert a.config.scaling_factor == b.config.scaling_factor
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    # a folder of another architecture, or no model at all, is one sentence
    with pytest.raises(DDSError, match="not the architecture of this recipe"):
        T.seed_from_model(C.fourth(), tmp_path / "other", model_dir)
    with pytest.raises(DDSError, match="not an exported model folder"):
        T.seed_from_model(cfg, tmp_path / "x", tmp_path)


def test_object_weights_follow_the_object_masks():
    from dds.world import sample_scene
    from dds.world.scene import object_masks

    scenes = [sample_scene(np.random.default_rng([3, k]), n_objects=1 + k % 2) for k in range(4)]
    w = T.object_weights(scenes, 64, 16, 5.0)
    assert w.shape == (4, 1, 16, 16) and float(w.min()) == 1.0
    for k, s in enumerate(scenes):
        cover = object_masks(s, 64).max(axis=0)
        # average pooling keeps the mean coverage, and a latent cell is 4x4 pixels
        assert float((w[k] - 1).mean() / 5) == pytest.approx(float(cover.mean()), abs=1e-6)
        cells = cover.reshape(16, 4, 16, 4).mean(axis=(1, 3))
        assert np.allclose((w[k, 0].numpy() - 1) / 5, cells, atol=1e-6)
        assert float(w[k].max()) == pytest.approx(6.0, abs=1e-6)  # some cell inside an object


def test_caption_labels_name_what_the_caption_says():
    from dds.errors import DDSError
    from dds.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, TEXTURES

    assert list(T.caption_heads().values()) == [2, 5, 8, 6, 9, 6, 6]
    got = T.caption_labels([
        "a red circle on a blue striped background",
        "a photo of a green star and a yellow square on a white checkered background",
        "a purple triangle on a yellow background",
    ]).tolist()
    assert got[0] == [0, SHAPES.index("circle"), COLOR_NAMES.index("red"), 5, 8,
                      BACKGROUND_NAMES.index("blue"), TEXTURES.index("stripes")]
    assert got[1] == [1, SHAPES.index("star"), COLOR_NAMES.index("green"),
                      SHAPES.index("square"), COLOR_NAMES.index("yellow"),
                      BACKGROUND_NAMES.index("white"), TEXTURES.index("checks")]
    assert got[2][5:] == [BACKGROUND_NAMES.index("yellow"), 5]  # texture not named
    with pytest.raises(DDSError, match="templates"):
        T.caption_labels(["a cat on a mat"])


def test_pretrained_text_encoder_is_kept_frozen_through_the_unet_stage(tmp_path):
    cfg = C.with_overrides(tiny_cfg(), text_pretrain_steps=3, text_lr=0.0, judge_every=0)
    r = T.train_builtin(cfg, tmp_path / "run", tmp_path / "model", progress=False)
    assert r["finished"] and r["text"]["steps"] == 3
    stage0 = torch.load(tmp_path / "run" / "text.pt", weights_only=False)["text_encoder"]
    fresh = C.build_text_encoder(cfg.text).state_dict()
    w = _weights(tmp_path / "run")
    exported = w["text_encoder"]
    changed = [k for k in stage0 if not torch.equal(stage0[k], fresh[k])]
    assert "embeddings.token_embedding.weight" in changed  # stage 0 trained it
    for k, v in stage0.items():
        assert torch.equal(exported[k], v), k  # and the UNet stage left it alone
        assert torch.allclose(w["ema_text"][k], v, atol=1e-6), k
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        stages = [row["stage"] for row in csv.DictReader(f)]
    assert stages == ["text"] * 3 + ["vae"] * 4 + ["unet"] * 4


@pytest.mark.slow
def test_second_release_recipe_trains_the_text_encoder_with_the_unet(tmp_path):
    """Without stage 0 (the second release's recipe, no longer the default) the encoder starts
    fresh; with text_lr > 0 the UNet stage moves it, with text_lr 0 it leaves the same seeded
    start untouched."""
    words = "embeddings.token_embedding.weight"
    enc = {}
    for lr in (0.0, 1.5e-3):
        cfg = C.with_overrides(tiny_cfg(), text_pretrain_steps=0, text_lr=lr, judge_every=0)
        run = tmp_path / f"run-{lr}"
        assert T.train_builtin(cfg, run, tmp_path / f"model-{lr}", progress=False)["finished"]
        assert not (run / "text.pt").exists()
        enc[lr] = _weights(run)["text_encoder"][words]
        with open(run / "log.csv", newline="") as f:
            assert [row["stage"] for row in csv.DictReader(f)] == ["vae"] * 4 + ["unet"] * 4
    moved = (enc[1.5e-3] - enc[0.0]).abs().amax(dim=1)
    # the rows of the words in captions move; the others only feel weight decay
    assert moved.max() > 100 * moved.median() > 0


def test_vae_loss_weights_object_pixels():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    vae = C.build_vae(cfg.vae)
    x01 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    plain, rec = T.vae_loss(vae, x01, 0.0, torch.Generator().manual_seed(2))
    flat, _ = T.vae_loss(vae, x01, 0.0, torch.Generator().manual_seed(2),
                         torch.full((2, 1, 64, 64), 4.0))
    assert torch.allclose(plain, flat)
    w = torch.ones(2, 1, 64, 64)
    w[:, :, :16] = 6.0  # the top quarter of each image weighs six times the rest
    weighted, _ = T.vae_loss(vae, x01, 0.0, torch.Generator().manual_seed(2), w)
    err = rec - (2 * x01 - 1)
    per_pixel = (err.abs() + err.square()).mean(dim=1)
    want = (6 * per_pixel[:, :16].sum() + per_pixel[:, 16:].sum()) / (6 * 16 + 48) / 64 / 2
    assert torch.allclose(weighted, want, rtol=1e-5)


def test_log_drops_one_stage_and_keeps_the_others(tmp_path):
    log = T.loss_log(tmp_path)
    for stage, step in [("vae", 1), ("vae", 2), ("unet", 1), ("text", 1)]:
        log.write(T.loss_row(stage, step, 0.5, 1e-3, 1.0))
    T.drop_stage(log, "text")
    assert [(r["stage"], r["step"]) for r in log.rows()] == [("vae", "1"), ("vae", "2"),
                                                             ("unet", "1")]
    assert log.rows()[0]["loss"] == "0.500000" and log.rows()[0]["lr"] == "0.001"
    # a resume at VAE step 1 keeps the earlier stages' rows and VAE step 1, nothing later
    log.write(T.loss_row("text", 2, 0.25, 1e-3, 2.0))
    T.truncate_after(log, "vae", 1)
    assert [(r["stage"], r["step"]) for r in log.rows()] == [("vae", "1"), ("text", "2")]


def test_staged_folder_replaces_all_or_nothing(tmp_path):
    from dds.training.toolkit import problem, staged_folder

    final = tmp_path / "out"
    with staged_folder(final) as d:
        (d / "a.txt").write_text("1")
    assert problem(final) is None and (final / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), staged_folder(final) as d:
        (d / "a.txt").write_text("2")
        raise RuntimeError("killed half-way")
    assert (final / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no leftover
    (final / "a.txt").write_text("x")
    assert "checksum" in problem(final)
    with staged_folder(final, manifest=False) as d:
        (d / "b.txt").write_text("3")
    assert [p.name for p in final.iterdir()] == ["b.txt"]


def test_warmup_cosine_and_ema_updates():
    from dds.training.toolkit import EMA, warmup_cosine

    assert warmup_cosine(0, 104, 2.0, 4) == 0.5 and warmup_cosine(3, 104, 2.0, 4) == 2.0
    assert warmup_cosine(4, 104, 2.0, 4) == 2.0
    assert warmup_cosine(54, 104, 2.0, 4) == pytest.approx(2.0 * 0.55)
    assert warmup_cosine(104, 104, 2.0, 4) == pytest.approx(0.2)
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA({"m": lin}, decay=0.999)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update({"m": lin}, 0)  # the first update keeps 0.1 of the shadow (warm-up)
    assert float(ema.shadow["m"]["weight"]) == pytest.approx(0.9)
    ema.update({"m": lin}, 10_000)  # later ones at most `decay`
    assert float(ema.shadow["m"]["weight"]) == pytest.approx(1 - 0.1 * 0.999)


def test_half_storage_halves_the_folder_and_loads_as_float32(full_run, tmp_path):
    """fp16 storage: every weight file holds the float32 weights rounded to float16, and the
    folder still loads as float32 modules, in dds and in the stock diffusers pipeline."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from dds.models.stable_diffusion import StableDiffusionModel

    _, model_dir, _ = full_run
    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    T.store_half(half)
    for path in sorted(model_dir.rglob("*.safetensors")):
        full, rounded = load_file(path), load_file(half / path.relative_to(model_dir))
        assert rounded.keys() == full.keys()
        for k, v in full.items():
            assert rounded[k].dtype == torch.float16
            assert torch.equal(rounded[k], v.half())
        assert (half / path.relative_to(model_dir)).stat().st_size < 0.6 * path.stat().st_size
    m = StableDiffusionModel(half, device="cpu")
    assert {next(x.parameters()).dtype for x in (m.unet, m.vae, m.text_encoder)} == {torch.float32}
    w = load_file(half / "unet" / "diffusion_pytorch_model.safetensors")
    name, v = next(iter(w.items()))
    assert torch.equal(m.unet.state_dict()[name], v.float())  # the stored value, upcast
    pipe = StableDiffusionPipeline.from_pretrained(half)
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.isfinite(out.images).all()


def test_an_exported_release_is_measured_on_the_world(full_run, tiny_sd, tmp_path, capsys):
    """A folder the built-in trainer exported knows the world (its edits, truths and judge
    apply); another folder does not, and `dds eval` then asks for data in one sentence."""
    from dds.cli import main
    from dds.models import get_model, knows_world
    from dds.models.stable_diffusion import StableDiffusionModel

    _, model_dir, _ = full_run
    assert knows_world(StableDiffusionModel(model_dir)) and knows_world(get_model(None))
    assert not knows_world(StableDiffusionModel(tiny_sd))
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    record = json.loads((other / "training.json").read_text())
    (other / "training.json").write_text(json.dumps({**record, "command": "my-trainer"}))
    assert not knows_world(StableDiffusionModel(other))
    assert main(["eval", "drift", "--model", str(other), "--quick", "--quiet",
                 "--out", str(tmp_path / "no")]) == 2
    assert "not trained on the built-in world" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_attention_grids_place_cross_attention_by_grid_side():
    """--attention-grids: the fourth's own layout reads back as (8, 4); adding 16 puts
    cross-attention in the second level down and the third block up, and the UNet built from it
    has attention exactly on those grids."""
    assert C.with_attention_grids(C.UNET4, (8, 4)) == C.UNET4
    u = C.with_attention_grids(C.UNET4, (16, 8, 4))
    assert u.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "CrossAttnDownBlock2D")
    assert u.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                "CrossAttnUpBlock2D", "UpBlock2D")
    small = replace(u, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    unet = C.build_unet(small, cross_attention_dim=8)
    sides = []
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            mod.register_forward_hook(lambda m, a, o: sides.append(int(o.shape[1] ** 0.5)))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 32, 32), torch.tensor([10]), torch.zeros(1, 3, 8))
    assert sorted(set(sides)) == [4, 8, 16]
    p = T.build_parser()
    cfg = T.config_from_args(p.parse_args(["--preset", "fourth", "--attention-grids", "16,8,4"]))
    assert cfg.unet == u and cfg.vae == C.fourth().vae
    with pytest.raises(DDSError, match="no UNet level runs on a 2x2 grid"):
        T.config_from_args(p.parse_args(["--preset", "fourth", "--attention-grids", "8,2"]))
    with pytest.raises(DDSError, match="whole numbers"):
        T.config_from_args(p.parse_args(["--preset", "fourth", "--attention-grids", "8,x"]))
