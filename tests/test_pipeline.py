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
    z = edit_latents(m, z_hat, m.encode_prompt(["a red circle"]),
                     m.encode_prompt(["a blue square"]), EditConfig(steps=3, seed=5))
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
