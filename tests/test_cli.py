"""`dds edit` end to end on a tiny model, and every bad input as one sentence with exit 2."""

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dds.cli import main


def run(capsys, *argv):
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.err


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(p)
    return p


def edit_args(model, *extra):
    return ["edit", *extra, "--model", model, "--steps", "2", "--quiet"]


def test_edit_writes_png_with_settings(tiny_sd, photo, tmp_path, capsys):
    out = tmp_path / "o" / "out.png"
    code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a cat", "--target", "a dog",
                                       "--out", out, "--size", "32", "--save-every", "1"))
    assert code == 0, err
    im = Image.open(out)
    assert im.size == (32, 16)  # 40x24 -> long side 32, multiples of 8, aspect kept, no crop
    meta = json.loads(im.text["dds"])  # the pipeline's metadata
    assert meta["target"] == "a dog" and meta["source"] == "a cat"
    assert meta["config"]["steps"] == 2 and meta["steps_run"] == 2 and meta["size"] == [32, 16]
    assert meta["model"] == "model" and meta["model_id"]["name"] == "model"
    assert (meta["device"], meta["precision"]) == ("cpu", "float32")
    from dds.pipeline import image_hash, prepare

    assert meta["input_sha256"] == image_hash(prepare(Image.open(photo).convert("RGB"), 32))
    snap = tmp_path / "o" / "out-step0001.png"  # --save-every 1: step 1 of 2 (not the last)
    assert Image.open(snap).size == (32, 16) and not (tmp_path / "o" / "out-step0002.png").exists()
    assert not np.array_equal(np.asarray(im), np.asarray(Image.open(photo).resize((32, 16))))


def test_edit_options_of_the_schedule_and_optimizer_reach_the_edit(tiny_sd, photo, tmp_path,
                                                                     capsys):
    outs = {}
    for name, extra in (("ref", []), ("adam", ["--optimizer", "adam", "--lr", "0.01",
                                               "--schedule", "descending", "--n-avg", "2"])):
        out = tmp_path / f"{name}.png"
        code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a cat", "--target",
                                           "a dog", "--size", "32", "--out", out, *extra))
        assert code == 0, err
        outs[name] = Image.open(out)
    cfg = json.loads(outs["adam"].text["dds"])["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["schedule"], cfg["n_avg"]) == (
        "adam", 0.01, "descending", 2)
    assert json.loads(outs["ref"].text["dds"])["config"]["optimizer"] == "sgd"
    assert not np.array_equal(np.asarray(outs["ref"]), np.asarray(outs["adam"]))
    code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a", "--target", "b",
                                       "--method", "flowedit", "--optimizer", "adam"))
    assert code == 2 and "no optimiser" in err and "Traceback" not in err


def test_edit_cli_subprocess_reproducible(tiny_sd, photo, tmp_path):
    outs = []
    for name in ("a.png", "b.png"):
        r = subprocess.run([sys.executable, "-m", "dds.cli", *edit_args(str(tiny_sd), str(photo)),
                            "--source", "noise", "--target", "a red circle", "--seed", "3",
                            "--out", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*outs)


def test_batch_folder_and_job_list(tiny_sd, photo, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.open(photo).save(folder / f"p{i}.png")
    code, err = run(capsys, *edit_args(tiny_sd, folder, "--source", "a", "--target", "b", "--out",
                                       tmp_path / "res"))
    assert code == 0, err
    # the edits, and their records (docs/scale.md)
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "manifest-0.jsonl", "p0-dds.png", "p1-dds.png"]
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,source,target\nimgs/p0.png,a cat,a dog\nimgs/p1.png,a cat,a fox\n")
    code, err = run(capsys, *edit_args(tiny_sd, jobs, "--out", tmp_path / "res2"))
    assert code == 0, err
    assert len(list((tmp_path / "res2").glob("*.png"))) == 2
    # --resume skips finished edits
    code, err = run(capsys, *edit_args(tiny_sd, jobs, "--out", tmp_path / "res2", "--resume"))
    assert code == 0 and "2 of 2 edits already written" in err


def test_output_never_overwrites_input(tiny_sd, photo, capsys):
    code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a", "--target", "b",
                                       "--out", photo))
    assert code == 2 and "is an input image" in err


def _fake_bomb(path, side: int = 30000):
    """A PNG whose header declares side x side pixels (the data is never decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


BAD_IMAGES = {
    "missing": (lambda p: None, "does not exist"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "text": (lambda p: p.write_text("hello"), "not an image"),
    "truncated": (lambda p: p.write_bytes(_png_bytes()[:120]), "damaged or truncated"),
    "tiny": (lambda p: Image.new("RGB", (1, 1)).save(p), "at least 8 pixels"),
    "bomb": (_fake_bomb, "decompression bomb"),
    "bomb-below-pil-limit": (lambda p: _fake_bomb(p, 7000), "decompression bomb"),  # 49M px
    "folder": (lambda p: p.mkdir(), "holds no images"),
}


def _png_bytes():
    import io

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_images_refused(tiny_sd, tmp_path, capsys, kind):
    make, needle = BAD_IMAGES[kind]
    p = tmp_path / "bad.png"
    make(p)
    out = tmp_path / "out.png"
    code, err = run(capsys, *edit_args(tiny_sd, p, "--source", "a", "--target", "b", "--out", out))
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_bomb_check_reads_the_header_and_no_global(tmp_path, monkeypatch):
    """The pixel limit is checked from the declared size, never by switching PIL's process-wide
    limit (two edits may load images at once): with PIL's own check off, still refused."""
    from dds.errors import DDSError
    from dds.images import MAX_PIXELS, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    p = tmp_path / "bomb.png"
    _fake_bomb(p, 7000)
    assert 7000 * 7000 > MAX_PIXELS
    with pytest.raises(DDSError, match="declares more than 40,000,000 pixels"):
        load_image(p)
    assert Image.MAX_IMAGE_PIXELS is None
    ok = tmp_path / "ok.png"
    Image.new("RGB", (16, 16)).save(ok)
    assert load_image(ok).size == (16, 16) and Image.MAX_IMAGE_PIXELS is None


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_unusual_modes_are_converted(tmp_path, mode):
    from dds.images import load_image

    a = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    if mode == "I;16":
        im = Image.fromarray((a * 65535).astype(np.uint16))
        assert im.mode == "I;16"
    else:
        im = Image.fromarray((a * 255).astype(np.uint8), "L").convert(mode)
    im.save(tmp_path / "x.png")
    rgb = load_image(tmp_path / "x.png")
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    arr = np.asarray(rgb).astype(int)
    assert abs(arr[-1, -1, 0] - 255) <= 1 and arr[0, 0, 0] <= 1  # full range kept (16-bit too)


@pytest.mark.parametrize("argv,needle", [
    (["--source", "a", "--target", ""], "target prompt is empty"),
    (["--source", "  ", "--target", "b"], "source prompt is empty"),
    (["--source", "a", "--target", "b", "--steps", "-3"], "--steps = -3 is invalid"),
    (["--source", "a", "--target", "b", "--steps", "0"], "--steps = 0 is invalid"),
    (["--source", "a", "--target", "b", "--steps", "1000000000"], "from 1 to 5000"),
    (["--source", "a", "--target", "b", "--seed", "100000000000000000000"], "--seed = 1000"),
    (["--source", "a", "--target", "b", "--guidance", "nan"], "--guidance = nan is invalid"),
    (["--source", "a", "--target", "b", "--lr", "-1"], "--lr = -1.0 is invalid"),
    (["--source", "a", "--target", "b", "--size", "100000"], "--size = 100000 is invalid"),
    (["--source", "a", "--target", "b", "--steps", "x"], "invalid int value"),
    (["--source", "a", "--target", "b", "--save-every", "0"], "--save-every 0 is invalid"),
])
def test_bad_arguments(tiny_sd, photo, tmp_path, capsys, argv, needle):
    out = tmp_path / "o.png"
    if "x" in argv:
        with pytest.raises(SystemExit) as e:
            main(["edit", str(photo), *argv, "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
    else:
        code, err = run(capsys, "edit", photo, "--model", tiny_sd, *argv, "--out", out)
        assert code == 2
    assert needle in err and err.count("\n") == 1
    assert not out.exists()


def test_long_prompt_warns_and_runs(tiny_sd, photo, tmp_path, capsys):
    code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a", "--target", "cat " * 90,
                                       "--out", tmp_path / "o.png"))
    assert code == 0 and "note: " in err and "text encoder reads the first 77" in err


def test_model_missing_component(tiny_sd, photo, tmp_path, capsys):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(tiny_sd, m)
    shutil.rmtree(m / "vae")
    code, err = run(capsys, *edit_args(m, photo, "--source", "a", "--target", "b",
                                       "--out", tmp_path / "o.png"))
    assert code == 2 and "lacks the 'vae' folder" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dds.cli", "edit", str(tmp_path / "nope.png"),
                        "--source", "a", "--target", "b"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


@pytest.mark.parametrize("flag", ["--lrs", "--guidances"])
def test_defaults_sweep_bad_grid_is_one_sentence(tmp_path, capsys, flag):
    out = tmp_path / "sweep"
    code, err = run(capsys, "eval", "builtin-defaults", flag, "0.1,x", "--out", out)
    assert code == 2
    assert f"{flag} takes a comma list of positive numbers" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_batch_reports_every_bad_row_by_name(tiny_sd, photo, tmp_path, capsys):
    for name in ("a", "b", "d"):
        (tmp_path / f"{name}.png").write_bytes(Path(photo).read_bytes())
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,source,target\na.png,a cat,a dog\nb.png,,a fox\n"
                    "gone.png,a cat,a fox\nd.png,a cat,  \n")
    code, err = run(capsys, *edit_args(tiny_sd, jobs, "--out", tmp_path / "res"))
    assert code == 2
    assert "3 of 4 jobs are invalid; nothing was edited" in err
    lines = err.splitlines()
    assert any(line.strip().startswith("job 2 (b.png): the source prompt is empty")
               for line in lines)
    assert any(line.strip().startswith("job 3 (gone.png):") and "does not exist" in line
               for line in lines)
    assert any(line.strip().startswith("job 4 (d.png): the target prompt is empty")
               for line in lines)
    assert not any("job 1" in line for line in lines)
    assert not (tmp_path / "res").exists()


def test_a_job_list_names_every_row_missing_an_entry(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "a.png", "target": "x"}\n{"target": "y"}\n{"image": "b.png"}\n')
    code, err = run(capsys, "edit", jobs)
    assert code == 2 and "2 of 3 jobs in" in err
    assert "job 2 lacks 'image'" in err and "job 3 lacks 'target'" in err


def test_resume_with_every_output_written_needs_no_model(tiny_sd, photo, tmp_path, capsys):
    out = tmp_path / "o.png"
    code, err = run(capsys, *edit_args(tiny_sd, photo, "--source", "a", "--target", "b",
                                       "--out", out))
    assert code == 0, err
    before = out.read_bytes()
    code, err = run(capsys, "edit", photo, "--source", "a", "--target", "b", "--out", out,
                    "--resume", "--model", tmp_path / "no-such-model")
    assert code == 0 and "1 of 1 edits already written" in err, err
    assert out.read_bytes() == before


def test_exif_orientation_is_applied(tmp_path):
    from dds.images import load_image

    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white, as stored
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone's portrait photo
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.size == (8, 16)  # upright: taller than wide
    top, bottom = np.asarray(shown)[:4].mean(), np.asarray(shown)[-4:].mean()
    assert top > 200 and bottom < 50  # the stored left half is now on top


def test_an_aspect_change_is_noted(tiny_sd, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (100, 61), "gray").save(wide)
    code, err = run(capsys, *edit_args(tiny_sd, wide, "--source", "a", "--target", "b",
                                       "--size", "16", "--out", tmp_path / "o.png"))
    assert code == 0 and "note: wide.png: the working size 16x8 changes" in err
