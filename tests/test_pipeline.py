"""The edit pipeline: a request in, a result out (what dds.edit, the CLI and the web app run)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from dds.errors import DDSError, SettingError
from dds.images import pil_to_tensor
from dds.loop import EditConfig, edit_latents
from dds.pipeline import EditPipeline, EditRequest, image_hash


@pytest.fixture(scope="module")
def pipe(tiny_backend):
    return EditPipeline(tiny_backend)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))


def test_the_result_is_the_loop_on_the_encoded_input(pipe, photo):
    """The pipeline adds no editing of its own: its latents are edit_latents' on the same input."""
    req = EditRequest(photo, "a red circle", "a blue square", {"steps": 3, "seed": 5})
    r = pipe.run(req)
    m = pipe.model
    z_hat = m.encode(pil_to_tensor(r.input))
    # The Stable Diffusion family's DDS schedule (`dds.models.base.FEWER_STEPS`) at 3 steps.
    cfg = EditConfig(steps=3, seed=5, schedule="stratified", step_rule="budget", average_tail=0.2)
    z = edit_latents(m, z_hat, m.encode_prompt(["a red circle"]),
                     m.encode_prompt(["a blue square"]), cfg)
    assert torch.equal(r.latents, z)
    assert (r.steps_run, r.stopped, r.config.steps, r.image.size) == (3, False, 3, (16, 16))


def test_metadata_identifies_input_model_settings_and_device(pipe, photo, tmp_path):
    r = pipe.run(EditRequest(photo, "a red circle", "a blue square", {"steps": 2}))
    md = r.metadata
    assert md["input_sha256"] == image_hash(r.input) != image_hash(r.image)
    assert md["model_id"] == pipe.model.identity() and len(md["model_id"]["hash"]) == 16
    assert (md["device"], md["precision"], md["steps_run"]) == ("cpu", "float32", 2)
    assert md["config"]["steps"] == 2 and md["source"] == "a red circle"
    path = r.save(tmp_path / "out.png")
    with Image.open(path) as im:
        assert json.loads(im.text["dds"]) == md


def test_stop_signal_ends_the_edit_and_the_result_says_so(pipe, photo):
    stop = threading.Event()

    def on_step(info):
        if info.step == 2:
            stop.set()

    r = pipe.run(EditRequest(photo, "a red circle", "a blue square", {"steps": 6}),
                 on_step=on_step, stop=stop)
    assert (r.steps_run, r.stopped, r.metadata["steps_run"]) == (2, True, 2)


def test_every_check_happens_before_any_model_work(tiny_backend, photo, monkeypatch):
    pipe = EditPipeline(tiny_backend)

    def no_work(*a, **k):
        raise AssertionError("the model was used before the request was checked")

    monkeypatch.setattr(tiny_backend, "encode", no_work)
    monkeypatch.setattr(tiny_backend, "encode_prompt", no_work)
    with pytest.raises(DDSError, match="target prompt is empty"):
        pipe.run(EditRequest(photo, "a cat", "  "))
    with pytest.raises(DDSError, match="source prompt is empty"):
        pipe.run(EditRequest(photo, "", "a lion"))
    with pytest.raises(SettingError) as e:
        pipe.run(EditRequest(photo, "a cat", "a lion", size=5))
    assert e.value.field == "size"
    with pytest.raises(SettingError) as e:
        pipe.run(EditRequest(photo, "a cat", "a lion", {"steps": 0}))
    assert e.value.field == "steps"
    # SDS needs no source caption: that request passes every check.
    assert pipe.prepare(EditRequest(photo, "", "a lion", {"method": "sds"})).source == ""


def test_an_aspect_change_over_two_percent_gets_a_note(pipe):
    wide = Image.new("RGB", (100, 61), "white")  # 1.64:1 -> 16x8 at a 16-px long side: 2:1
    p = pipe.prepare(EditRequest(wide, "a", "b", size=16))
    assert p.input.size == (16, 8) and len(p.notes) == 1 and "22.0%" in p.notes[0]
    square = Image.new("RGB", (40, 40), "white")
    assert pipe.prepare(EditRequest(square, "a", "b", size=16)).notes == ()


RECOMMENDS = {"lr": 0.03, "guidance": 7.5,
              "dds": {"schedule": "descending", "steps": 50, "step_rule": "budget"}}


def test_a_recommended_schedule_is_the_default_and_naming_one_sets_it_aside():
    """A model folder's recommended schedule (under the method's name) is what an edit gets by
    default; naming a schedule (`--schedule reference`) gives the reference recipe's steps and
    step rule back while keeping the model's lr and guidance; setting steps alone keeps it."""
    from types import SimpleNamespace

    from dds.pipeline import edit_config

    model = SimpleNamespace(edit_defaults=RECOMMENDS)
    got = edit_config(model)
    assert (got.schedule, got.steps, got.step_rule, got.lr) == ("descending", 50, "budget", 0.03)
    ref = edit_config(model, schedule="reference")
    assert (ref.schedule, ref.steps, ref.step_rule, ref.n_avg, ref.optimizer) == (
        "reference", EditConfig.steps, "constant", 1, "sgd")
    assert (ref.lr, ref.guidance) == (0.03, 7.5)
    assert edit_config(model, schedule="stratified").steps == EditConfig.steps
    assert (edit_config(model, steps=25).schedule, edit_config(model, steps=25).steps) == (
        "descending", 25)
    assert edit_config(model, method="sds").schedule == "reference"  # measured for DDS only
    adam = SimpleNamespace(edit_defaults={**RECOMMENDS, "dds": {
        "schedule": "stratified", "steps": 25, "optimizer": "adam", "lr": 0.01}})
    assert (edit_config(adam).optimizer, edit_config(adam).lr) == ("adam", 0.01)
    back = edit_config(adam, schedule="reference")
    assert (back.optimizer, back.lr, back.steps) == ("sgd", 0.03, EditConfig.steps)


def test_the_built_in_model_and_sd_families_run_dds_in_fewer_stratified_budget_steps():
    """The schedule `dds eval schedules` chose (docs/evidence.md) is the built-in model's DDS
    default (12 steps, each the reference's lr x 200 / 12, the mean of the last 2 latents); the
    SD 1.x/2.x and SDXL families recommend the 50-step one; SDS and `--schedule reference` keep
    the paper's recipe."""
    from types import SimpleNamespace

    from dds.builtin import BUILTIN_DIR
    from dds.methods import step_lr
    from dds.models.base import FEWER_STEPS
    from dds.models.sd3 import SD3Model
    from dds.models.sdxl import SDXLModel
    from dds.models.stable_diffusion import StableDiffusionModel
    from dds.pipeline import edit_config

    shipped = json.loads((BUILTIN_DIR / "dds_edit_defaults.json").read_text())
    want = {"schedule": "stratified", "steps": 50, "step_rule": "budget", "n_avg": 1,
            "optimizer": "sgd", "average_tail": 0.2}
    assert shipped["dds"] == {**want, "steps": 12} and FEWER_STEPS == want
    assert StableDiffusionModel.family_defaults["dds"] == want == SDXLModel.family_defaults["dds"]
    assert "dds" not in SD3Model.family_defaults  # flow models: not measured
    model = SimpleNamespace(edit_defaults={**StableDiffusionModel.family_defaults, **shipped})
    cfg = edit_config(model)
    assert (cfg.schedule, cfg.steps, cfg.step_rule, cfg.lr, cfg.average_tail) == (
        "stratified", 12, "budget", 0.03, 0.2)
    assert step_lr(cfg) == pytest.approx(0.03 * 200 / 12)
    family = edit_config(SimpleNamespace(edit_defaults=StableDiffusionModel.family_defaults))
    assert (family.steps, family.lr, step_lr(family)) == (50, 0.1, pytest.approx(0.4))
    assert edit_config(model, schedule="reference").steps == 200
    assert (edit_config(model, method="sds").schedule, edit_config(model, method="sds").steps) == (
        "reference", 200)


def test_writing_defaults_merges_lr_guidance_and_the_schedule(tmp_path):
    from dds.eval.cli import _write_schedule, write_edit_defaults

    path = tmp_path / "dds_edit_defaults.json"
    path.write_text(json.dumps({"lr": 0.1, "guidance": 7.5, "dds": {
        "schedule": "descending", "steps": 50, "step_rule": "budget", "source_guidance": 5.0}}))
    write_edit_defaults(tmp_path, {"dds": {"schedule": "stratified", "steps": 25}})
    assert json.loads(path.read_text()) == {"lr": 0.1, "guidance": 7.5, "dds": {
        "source_guidance": 5.0, "schedule": "stratified", "steps": 25}}
    write_edit_defaults(tmp_path, {"lr": 0.03, "guidance": 3.0})  # builtin-defaults' choice
    assert json.loads(path.read_text()) == {"lr": 0.03, "guidance": 3.0, "dds": {
        "source_guidance": 5.0, "schedule": "stratified", "steps": 25}}
    before = path.read_text()
    msg = _write_schedule(tmp_path, "dds", {"recommended": None})
    assert "unchanged" in msg and path.read_text() == before
    rec = {"schedule": "descending", "steps": 50, "step_rule": "constant", "n_avg": 1,
           "optimizer": "sgd"}
    _write_schedule(tmp_path, "dds", {"recommended": rec})
    assert json.loads(path.read_text())["dds"] == {"source_guidance": 5.0, **rec}
