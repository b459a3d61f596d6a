"""Every family end to end through `dds edit`: DDS, SDS and FlowEdit on tiny SDXL, SD3 and
FLUX.1 folders (random weights, built from configs), and bad folders as one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dds.cli import main
from test_family_flux import make_tiny_flux
from test_family_sd3 import make_tiny_sd3
from test_family_sdxl import make_tiny_sdxl

BUILDERS = {"sdxl": make_tiny_sdxl, "sd3": make_tiny_sd3, "flux": make_tiny_flux}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name / "model") for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("photo") / "in.png"
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", ["dds", "sds", "flowedit"])
def test_each_method_edits_on_each_family(folders, photo, tmp_path, capsys, family, method):
    out = tmp_path / "out.png"
    rc = main(["edit", str(photo), "--source", "a red circle", "--target", "a blue square",
               "--model", str(folders[family]), "--method", method, "--steps", "4",
               "--size", "32", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    im = Image.open(out)
    meta = json.loads(im.text["dds"])
    assert meta["model_id"]["family"] == family
    assert meta["config"]["method"] == method and meta["steps_run"] >= 1
    assert im.size[0] % 2 == 0 and im.size[1] % 2 == 0 and max(im.size) == 32
    edited = np.asarray(im.convert("RGB"), dtype=float)
    assert np.isfinite(edited).all() and edited.std() > 0  # an image, not a blank
    if method == "flowedit":  # FlowEdit's steps are the last n_max of T = --steps
        assert meta["config"]["steps"] == 4 and 1 <= meta["steps_run"] <= 4


def test_flux_defaults_are_its_published_flowedit_settings(folders):
    from dds.models.registry import load_model
    from dds.pipeline import edit_config

    flux = load_model(folders["flux"], device="cpu")
    c = edit_config(flux, method="flowedit")
    assert (c.steps, c.n_max, c.source_guidance, c.guidance) == (28, 24, 1.5, 5.5)
    assert flux.guidance_embedded and edit_config(flux).guidance == 3.5
    # Setting T alone keeps the published share of steps run (24 of 28).
    assert edit_config(flux, method="flowedit", steps=14).n_max == 12


def test_an_unsupported_family_is_one_sentence(folders, photo, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(folders["sd3"], odd)
    index = json.loads((odd / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (odd / "model_index.json").write_text(json.dumps(index))
    rc = main(["edit", str(photo), "--source", "a", "--target", "b", "--model", str(odd),
               "--out", str(tmp_path / "o.png"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "KandinskyV22Pipeline" in err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("family, part", [("sdxl", "text_encoder_2"), ("flux", "transformer")])
def test_a_missing_component_is_one_sentence(folders, photo, tmp_path, capsys, family, part):
    broken = tmp_path / "broken"
    shutil.copytree(folders[family], broken)
    shutil.rmtree(broken / part)
    rc = main(["edit", str(photo), "--source", "a", "--target", "b", "--model", str(broken),
               "--out", str(tmp_path / "o.png"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and part in err and "Traceback" not in err


@pytest.mark.parametrize("method", ["dds", "flowedit"])
def test_the_fast_path_gives_sdxls_edit(folders, method):
    """The fast path (traced, row-split UNet on the CPU) serves SDXL's added conditioning."""
    import torch

    from dds.fast import FastEditor
    from dds.loop import edit_latents
    from dds.models.registry import load_model
    from dds.pipeline import edit_config

    model = load_model(folders["sdxl"], device="cpu")
    z_hat = model.encode(torch.rand(2, 3, 32, 48) * 2 - 1)
    cs = model.encode_prompt(["a red circle", "a green star"])
    ct = model.encode_prompt(["a blue square", "a green cross"])
    # The reference schedule: 4 steps of the family's budget rule would each be 50 reference
    # steps long and magnify the rounding this compares (the schedules have their own tests).
    cfg = edit_config(model, method=method, steps=4, seed=5, schedule="reference")
    slow = edit_latents(model, z_hat, cs, ct, cfg)
    fast = FastEditor(model).edit(z_hat, cs, ct, cfg)
    assert (slow - z_hat).abs().max() > 1e-3  # it edited
    # To rounding: the traced call splits rows over threads (different float blocking), and
    # FlowEdit's velocity divides by alpha_t, which magnifies that rounding at high noise.
    assert (fast - slow).abs().max() <= (1e-5 if method == "dds" else 1e-4)
