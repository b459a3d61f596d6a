"""The web app's logic without a browser: live previews, cancel, bad inputs as one sentence,
bundled examples, the `dds ui` parser, and several edits at once through Gradio's queue."""

from __future__ import annotations

import json
import socket
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dds.errors import DDSError
from dds.pipeline import image_hash
from dds.ui.app import EditSession, bundled_examples, photo_examples, world_examples
from dds.ui.session import HISTORY_COLUMNS

SIZE = 32


@pytest.fixture(scope="module")
def session(tiny_sd, tmp_path_factory):
    return EditSession(str(tiny_sd), defaults={"size": SIZE, "steps": 6},
                       out_dir=tmp_path_factory.mktemp("ui-out"))


@pytest.fixture
def photo():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))


def one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text and "Traceback" not in text and text.endswith(".")


def test_examples_world_and_photos():
    scenes = world_examples(3)
    assert len(scenes) == 3
    for e in scenes:
        assert e.kind == "scene" and e.image.mode == "RGB" and e.targets
        assert all(t != e.source for t in e.targets)
        # a colour/shape/background edit changes one word of the caption
        diffs = [sum(a != b for a, b in zip(e.source.split(), t.split(), strict=False))
                 for t in e.targets if len(t.split()) == len(e.source.split())]
        assert 1 in diffs
    photos = photo_examples()
    assert any("Grace Hopper" in p.name for p in photos)  # matplotlib ships it
    assert bundled_examples(builtin=True)[0].kind == "scene"
    assert bundled_examples(builtin=False)[0].kind == "photo"


def test_edit_yields_previews_and_a_result(session, photo):
    threads, bomb_limit = torch.get_num_threads(), Image.MAX_IMAGE_PIXELS
    ups = list(session.run(photo, "noise", "a red circle", steps=8, preview_every=2))
    # an edit changes no process-wide setting (several may run at once)
    assert (torch.get_num_threads(), Image.MAX_IMAGE_PIXELS) == (threads, bomb_limit)
    previews = [u.preview for u in ups if u.preview is not None and not u.done]
    assert len(previews) >= 2
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(previews, previews[1:], strict=False))
    last = ups[-1]
    assert last.done and not last.stopped and last.step == 8 and last.total == 8
    assert last.result.size == last.input.size == (SIZE, 16)
    assert np.abs(np.asarray(last.result, np.int16) - np.asarray(last.input, np.int16)).mean() > 1
    assert not session.running("default")


class Wrapped:
    """The tiny model behind a wrapper that a test can watch or hold."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


class HeldDecode(Wrapped):
    """Holds the `at`-th decode (the preview of step `at`) until `release` is set, and says
    so through `holding`."""

    def __init__(self, inner, at: int):
        super().__init__(inner)
        self.at, self.decodes = at, 0
        self.holding, self.release = threading.Event(), threading.Event()

    def decode(self, z):
        self.decodes += 1
        if self.decodes == self.at:
            self.holding.set()
            if not self.release.wait(120):
                raise RuntimeError("the test never released the held step")
        return self._inner.decode(z)


def test_kept_input_appears_whole(tiny_backend, photo, tmp_path, monkeypatch):
    """Pages that share an input image share its kept copy: one may serve the file while
    another writes it, so it must appear under its name only once complete."""
    session = EditSession(tiny_backend, defaults={"size": SIZE}, out_dir=tmp_path)
    seen = []
    real_save = Image.Image.save

    def watched(im, fp, *a, **k):
        seen.append((Path(fp), sorted(p.name for p in tmp_path.glob("dds-input-*.png"))))
        return real_save(im, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", watched)
    path = session.save_input(photo)
    assert [names for _, names in seen] == [[]]  # nothing under the final name mid-write
    assert seen[0][0] != path
    assert session.save_input(photo) == path and len(seen) == 1  # kept once
    monkeypatch.undo()
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                          np.asarray(photo.convert("RGB")))


def test_cancel_stops_after_the_current_step_and_keeps_latest(tiny_backend, photo, tmp_path):
    model = HeldDecode(tiny_backend, at=3)
    # The reference recipe, whose first 3 steps of any edit are a 3-step edit (the family's
    # stratified budget schedule spreads its strata and step size over the whole edit).
    model.edit_defaults = {}
    session = EditSession(model, defaults={"size": SIZE}, out_dir=tmp_path)
    seen = []
    for u in session.run(photo, "noise", "a red circle", steps=5000, key="k", preview_every=1):
        seen.append(u)
        if u.step == 1:
            assert model.holding.wait(120), "the edit never reached step 3"
            assert session.cancel("k")  # while step 3 runs
            model.release.set()
    last = seen[-1]
    assert last.done and last.stopped and last.step == 3 and last.edit.steps_run == 3
    assert not session.cancel("k")  # nothing runs any more
    # The kept result is the latest latent: exactly what a 3-step edit gives.
    (three,) = [u for u in session.run(photo, "noise", "a red circle", steps=3, key="k")
                if u.done]
    assert not three.stopped
    assert np.array_equal(np.asarray(last.result), np.asarray(three.result))


def test_page_edit_records_history_and_png(session, photo):
    outs = list(session.page_edit(photo, "noise", "a red circle", "dds", 7.5, 4, 0.1, 3, SIZE,
                                  [], key="p"))
    final = outs[-1]
    assert final["running"] is False and final["message"].startswith("Edit done")
    before, after = final["result"]
    assert before.size == after.size == (SIZE, 16)
    im = Image.open(final["download"])
    meta = json.loads(im.text["dds"])  # the pipeline's metadata, plus the page's outcome
    assert meta["target"] == "a red circle" and meta["source"] == "noise"
    assert meta["config"]["seed"] == 3 and meta["config"]["steps"] == 4
    assert meta["steps_run"] == 4 and meta["size"] == [SIZE, 16]
    assert meta["model"] == "model" and meta["model_id"]["name"] == "model"
    assert meta["input_sha256"] == image_hash(before)
    assert meta["outcome"] == final["history"][0]["outcome"] and meta["outcome"].startswith("done")
    # what identifies the output: input hash, model version, device and precision
    ident = session.model.identity()
    assert meta["model_id"]["hash"] == ident["hash"] and len(ident["hash"]) >= 12
    assert meta["device"] == "cpu" and meta["precision"] == "float32"
    assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(after))
    (h,) = final["history"]
    assert h["steps"] == 4 and h["seed"] == 3 and h["method"] == "dds" and h["size"] == SIZE
    # the row keeps its result and its original input (restoring a row restores the image)
    assert h["result"] == final["download"]
    assert np.array_equal(np.asarray(Image.open(h["input"]).convert("RGB")), np.asarray(photo))
    # a note that is not an error (the 40x24 input is worked on at 32x16) reaches the page
    assert "**Note:** The working size 32x16 changes the image's aspect ratio" in final["message"]
    assert any("Note:" in o.get("message", "") for o in outs if o.get("running"))


def test_schedule_from_the_page(session, photo):
    """The page starts at the model's recommended schedule (the SD families': 50 stratified
    steps, budget step, mean of the last fifth); picking another gives that schedule with the
    reference recipe's steps, step size and result; an edit records what it ran."""
    from dds.models.base import FEWER_STEPS
    from dds.ui.session import history_rows

    d = session.defaults
    assert (d["schedule"], d["step_rule"], d["average_tail"]) == ("stratified", "budget", 0.2)
    assert session.method_defaults("dds", "stratified")["steps"] == FEWER_STEPS["steps"]
    ref = session.method_defaults("dds", "reference")
    assert (ref["steps"], ref["step_rule"], ref["average_tail"]) == (200, "constant", 0.0)
    assert session.method_defaults("sds", "descending")["schedule"] == "descending"
    runs = {}
    for name, extra in (("model", {}), ("ref", dict(schedule="Reference", step_rule="constant",
                                                    average_tail=0.0))):
        outs = list(session.page_edit(photo, "noise", "a red circle", "dds", 7.5, 4, 0.1, 3,
                                      SIZE, [], key=name, **extra))
        runs[name] = outs[-1]
        assert runs[name]["message"].startswith("Edit done"), runs[name]["message"]
    meta = {k: json.loads(Image.open(r["download"]).text["dds"])["config"]
            for k, r in runs.items()}
    assert (meta["model"]["schedule"], meta["model"]["step_rule"]) == ("stratified", "budget")
    assert meta["model"]["average_tail"] == 0.2 and meta["model"]["steps"] == 4
    assert (meta["ref"]["schedule"], meta["ref"]["step_rule"]) == ("reference", "constant")
    assert meta["ref"]["average_tail"] == 0.0
    row = dict(zip(HISTORY_COLUMNS, history_rows(runs["model"]["history"])[0], strict=True))
    assert row["schedule"] == "stratified, budget, tail 0.2"
    assert history_rows(runs["ref"]["history"])[0][HISTORY_COLUMNS.index("schedule")] == \
        "reference, constant"
    # FlowEdit has its own schedule: the page's schedule settings do not reach it
    fe = list(session.page_edit(photo, "noise", "a red circle", "flowedit", 13.5, 6, 0.1, 3,
                                SIZE, [], key="fe-s", schedule="descending", average_tail=0.5))
    assert fe[-1]["message"].startswith("Edit done"), fe[-1]["message"]
    assert history_rows(fe[-1]["history"])[0][HISTORY_COLUMNS.index("schedule")] == "its own"


def test_flowedit_from_the_page(session, photo):
    """Choosing FlowEdit fills in its own numbers; an edit with them runs its n_max steps."""
    d = session.method_defaults("flowedit")
    assert (d["steps"], d["guidance"]) == (50, 13.5)
    assert session.method_defaults("dds")["guidance"] == 7.5
    outs = list(session.page_edit(photo, "noise", "a red circle", "flowedit", d["guidance"], 6,
                                  d["lr"], 3, SIZE, [], key="fe"))
    final = outs[-1]
    assert final["message"].startswith("Edit done"), final["message"]
    meta = json.loads(Image.open(final["download"]).text["dds"])
    # T = 6 set on the page keeps FlowEdit's published share of steps run (33 of 50 -> 4 of 6)
    assert meta["config"]["method"] == "flowedit" and meta["config"]["n_max"] == 4
    assert meta["config"]["source_guidance"] == 3.5 and meta["steps_run"] == 4


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["none", "text", "truncated", "bomb", "tiny", "empty-target",
                                  "no-source", "steps", "size", "method", "pasted"])
def test_bad_inputs_are_one_sentence(session, photo, tmp_path, case):
    from dds.ui.app import _BadUpload

    image, source, target, kw = photo, "noise", "a red circle", {}
    if case == "none":
        image = None
    elif case == "text":
        image = tmp_path / "x.png"
        image.write_text("not an image")
    elif case == "truncated":
        image = tmp_path / "t.png"
        photo.save(image)
        image.write_bytes(image.read_bytes()[:60])
    elif case == "bomb":
        image = tmp_path / "bomb.png"
        image.write_bytes(_png_header(20_000, 20_000))
    elif case == "tiny":
        image = Image.new("RGB", (4, 4))
    elif case == "empty-target":
        target = "  "
    elif case == "no-source":
        source = ""
    elif case == "steps":
        kw["steps"] = 2.5
    elif case == "size":
        kw["size"] = 100_000
    elif case == "method":
        kw["method"] = "magic"
    elif case == "pasted":
        image = _BadUpload("the pasted image could not be read; paste or upload a PNG or JPEG "
                           "image")
    args = dict(method="dds", guidance=7.5, steps=3, lr=0.1, seed=0, size=SIZE)
    args.update(kw)
    outs = list(session.page_edit(str(image) if hasattr(image, "write_text") else image,
                                  source, target, history=[], key=f"bad-{case}", **args))
    assert len(outs) == 1 and outs[0]["running"] is False
    assert one_sentence(outs[0]["error"]), outs[0]["error"]
    assert outs[0]["message"].startswith("**Cannot edit:**")
    assert not session.running(f"bad-{case}")


def test_one_edit_per_page_at_a_time(session, photo):
    first = session.run(photo, "noise", "a red circle", steps=5000, key="busy")
    next(first)
    try:
        outs = list(session.page_edit(photo, "noise", "x", "dds", 7.5, 3, 0.1, 0, SIZE, [],
                                      key="busy"))
        assert "already running" in outs[0]["error"]
    finally:
        session.cancel("busy")
        list(first)


def test_cli_parser_defaults():
    from dds.console import Parser
    from dds.ui.cli import add_parser

    p = Parser(prog="dds")
    add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["ui"])
    assert (a.host, a.port, a.share, a.concurrency, a.model, a.translator) == (
        "127.0.0.1", 7860, False, 1, None, None)
    a = p.parse_args(["ui", "--model", "m", "--share", "--concurrency", "2", "--port", "9000"])
    assert a.share and a.concurrency == 2 and a.port == 9000 and a.model == "m"


# ---- through Gradio ---------------------------------------------------------------------------


def test_upload_preprocess_never_raises():
    pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    from dds.ui.app import _BadUpload, upload_image

    comp = upload_image(render=False)
    bad = comp.preprocess(ImageData(url="data:image/png;base64,bm90IGFuIGltYWdl"))
    assert isinstance(bad, _BadUpload) and bad.message.endswith("image")


class CountingModel(Wrapped):
    """Counts how many edits are inside the model at the same moment.  With `meet=n`, the
    first call of each of the first n edits waits (inside the count) until all n are there:
    it passes only if n edits really run at once, and fails the edits after a timeout."""

    def __init__(self, inner, meet: int = 0):
        super().__init__(inner)
        self.now, self.most, self._lock = 0, 0, threading.Lock()
        self._barrier = threading.Barrier(meet) if meet else None
        self._met: set[int] = set()

    def predict_eps(self, *a, **k):
        me = threading.get_ident()  # each edit runs in a thread of its own
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            meet = (self._barrier is not None and me not in self._met
                    and len(self._met) < self._barrier.parties)
            if meet:
                self._met.add(me)
        try:
            if meet:
                self._barrier.wait(timeout=120)  # BrokenBarrierError: the edits ran one by one
            return self._inner.predict_eps(*a, **k)
        finally:
            with self._lock:
                self.now -= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_simultaneous_edits_through_the_queue(tiny_backend, photo, tmp_path, concurrency):
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    from dds.ui.app import build_app, launch

    # With concurrency 2 the first two edits must meet inside the model, or both fail.
    model = CountingModel(tiny_backend, meet=concurrency if concurrency > 1 else 0)
    session = EditSession(model, defaults={"size": SIZE}, out_dir=tmp_path / "out")
    demo = build_app(session=session, examples=[], concurrency=concurrency)
    port = _free_port()
    launch(demo, port=port, block=False, quiet=True)
    try:
        path = tmp_path / "in.png"
        photo.save(path)
        url = f"http://127.0.0.1:{port}/"
        jobs = []
        for i in range(3):  # three pages (sessions), submitted at once
            c = client_mod.Client(url, verbose=False)
            jobs.append(c.submit(client_mod.handle_file(str(path)), "noise", f"target {i}", "dds",
                                 7.5, 5, 0.1, i, SIZE, api_name="/edit"))
        messages = [j.result(timeout=300)[4] for j in jobs]  # the status line
        assert all(m.startswith("Edit done") for m in messages), messages
        assert model.most == concurrency  # never more edits at once than allowed, and no fewer
        api = client_mod.Client(url, verbose=False)
        bad = api.predict(
            client_mod.handle_file(str(path)), "noise", "", "dds", 7.5, 5, 0.1, 0, SIZE,
            api_name="/edit")
        assert "Target prompt box is empty" in bad[4] and "\n" not in bad[4]
        assert "Target prompt box" in bad[4] and "--" not in bad[4]
        # Bad numbers over the API: a sentence naming the field, never an empty error.
        args = [client_mod.handle_file(str(path)), "noise", "x", "dds", 7.5, 5, 0.1, 0, SIZE]
        for i, value, label in ((5, "abc", "Steps"), (5, 1e9, "Steps"), (7, "abc", "Seed"),
                                (7, 2**70, "Seed"), (8, "abc", "Size"), (4, 1e308, "Guidance"),
                                (6, "1e30", "Learning rate")):
            call = list(args)
            call[i] = value
            out = api.predict(*call, api_name="/edit")
            assert out[4].startswith(f"**Cannot edit:** {label} = "), (value, out[4])
    finally:
        demo.close()


# ---- the queue, bad values in the page's words, a diverging edit -----------------------------


class HeldStep(Wrapped):
    """Counts model calls; the first call waits until `release` is set (an edit holding the
    only slot for as long as the test needs)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls, self.holding, self.release = 0, threading.Event(), threading.Event()

    def predict_eps(self, *a, **k):
        self.calls += 1
        if self.calls == 1:
            self.holding.set()
            if not self.release.wait(120):
                raise RuntimeError("the test never released the held step")
        return self._inner.predict_eps(*a, **k)


def test_queued_edit_shows_its_place_and_cancel_removes_it(tiny_backend, photo, tmp_path):
    from dds.ui.messages import CANCELLED_QUEUED

    model = HeldStep(tiny_backend)
    session = EditSession(model, defaults={"size": SIZE}, out_dir=tmp_path, concurrency=1)
    first = session.run(photo, "noise", "a red circle", steps=5000, key="b")
    next(first)  # b holds the only slot
    assert model.holding.wait(120)
    page = session.page_edit(photo, "noise", "a blue square", "dds", 7.5, 3, 0.1, 0, SIZE, [],
                             key="a")
    outs = [next(page), next(page)]
    assert outs[0]["running"] is True  # Edit is disabled while queued
    assert 'data-state="queued"' in outs[1]["progress"]
    assert "queued: 1 edit ahead" in outs[1]["progress"]
    assert session.state("a") == "queued" and session.state("b") == "running"
    calls = model.calls
    assert session.cancel("a")
    rest = list(page)
    assert rest[-1]["message"] == CANCELLED_QUEUED and rest[-1]["running"] is False
    assert 'data-state="cancelled"' in rest[-1]["progress"]
    assert not any("history" in o or o.get("download") for o in rest)
    assert session.state("a") is None and model.calls == calls  # no step of a ran
    session.cancel("b")
    model.release.set()
    assert list(first)[-1].stopped
    # the slot is free again: the next edit runs at once, with no queued update
    ups = list(session.run(photo, "noise", "x", steps=2, key="a"))
    assert all(u.ahead is None for u in ups) and ups[-1].done and ups[-1].step == 2


def test_edit_queue_order_and_cancel():
    from dds.ui.slots import EditQueue

    q = EditQueue(slots=2)
    a, b, c, d = (q.join(k) for k in "abcd")
    assert q.wait(a, 0) and q.wait(b, 0) and not q.wait(d, 0)  # d waits behind c
    assert (q.ahead(c), q.ahead(d)) == (2, 3)
    assert q.cancel(c) and not q.wait(c, 0) and q.ahead(d) == 2
    assert not q.cancel(a)  # a runs: cancelling it is the stop signal's job
    q.done(a)
    assert q.wait(d, 0) and q.ahead(d) == 0


# name, value: each refused with a sentence that names the field as the page labels it
BAD_VALUES = [
    ("steps", float("nan"), "Steps"), ("steps", "abc", "Steps"), ("steps", 1e9, "Steps"),
    ("steps", 2.5, "Steps"), ("seed", 2**80, "Seed"), ("seed", "abc", "Seed"),
    ("seed", float("inf"), "Seed"), ("size", float("nan"), "Size"), ("size", "abc", "Size"),
    ("size", 100_000, "Size"), ("guidance", 1e308, "Guidance"), ("lr", 1e30, "Learning rate"),
    ("average_tail", 1.5, "Tail average"), ("average_tail", "abc", "Tail average"),
    ("schedule", "fast", "Schedule"), ("step_rule", "slow", "Step size"),
    ("lr", 0.0, "Learning rate"), ("guidance", "x", "Guidance"),
]


@pytest.mark.parametrize(("name", "value", "label"), BAD_VALUES)
def test_bad_numbers_name_the_page_field(session, photo, name, value, label, capsys):
    args = dict(method="dds", guidance=7.5, steps=3, lr=0.1, seed=0, size=SIZE)
    args[name] = value
    outs = list(session.page_edit(photo, "noise", "a red circle", history=[], key="n", **args))
    assert len(outs) == 1 and outs[0]["running"] is False and outs[0]["download"] is None
    err = outs[0]["error"]
    assert one_sentence(err) and err.startswith(f"{label} = "), err
    assert "is invalid" in err and "--" not in err and "lr" not in err.split(" = ")[1]
    assert 'data-state="refused"' in outs[0]["progress"]
    assert "Traceback" not in capsys.readouterr().err


def test_library_wording_becomes_the_pages():
    from dds.errors import SettingError
    from dds.ui.messages import page_sentence

    assert page_sentence(SettingError("lr", 0.0, "it must be a number from 1e-06 to 10")) == (
        "Learning rate = 0.0 is invalid: it must be a number from 1e-06 to 10.")
    s = page_sentence(DDSError("the target prompt is empty; describe the edited image with "
                               "--target, e.g. 'a photo of a lion'"))
    assert s.startswith("The Target prompt box is empty; describe") and "--" not in s
    s = page_sentence(DDSError("the source prompt is empty; DDS needs a caption of the input "
                               "image (--source)"))
    assert s.startswith("The Source prompt box is empty;") and "--" not in s
    assert page_sentence(DDSError("the target prompt is empty; describe the edited image, "
                                  "e.g. 'a photo of a lion'")).startswith(
        "The Target prompt box is empty; describe the edited image, e.g.")


class Exploding(Wrapped):
    """A model whose noise predictions blow up: every edit on it diverges."""

    def predict_eps(self, *a, **k):
        return self._inner.predict_eps(*a, **k) * float("inf")


def test_diverged_edit_is_an_error_not_a_result(tiny_backend, photo, tmp_path):
    session = EditSession(Exploding(tiny_backend), defaults={"size": SIZE}, out_dir=tmp_path)
    outs = list(session.page_edit(photo, "noise", "a red circle", "dds", 7.5, 5, 0.1, 0, SIZE,
                                  [], key="d"))
    final = outs[-1]
    assert final["running"] is False and final["error"].startswith("The edit diverged by step")
    assert final["message"].startswith("**Edit failed:** The edit diverged")
    assert "lower the Guidance or the Learning rate" in final["message"]
    assert 'data-state="failed"' in final["progress"]
    assert not any("history" in o or "result" in o or o.get("download") for o in outs)
    assert not list(tmp_path.glob("dds-edit-*.png"))  # nothing written


def test_random_seed_in_range():
    from dds.loop import LIMITS
    from dds.ui.session import random_seed

    seeds = {random_seed() for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s <= LIMITS["seed"][1] for s in seeds)


def test_model_info_says_what_the_model_knows(session):
    from types import SimpleNamespace

    from dds.ui.app import model_info

    text = model_info(session)
    assert session.model.identity()["hash"][:12] in text and "photos" in text
    builtin = SimpleNamespace(model=session.model, builtin=True, model_label="built-in model")
    text = model_info(builtin)
    assert "procedural shapes world" in text and "coloured shapes" in text
    assert "meaningless" in text


def test_page_fields_are_bounded_by_the_library(tiny_backend, tmp_path):
    pytest.importorskip("gradio")
    from dds.loop import LIMITS
    from dds.pipeline import max_size
    from dds.ui.app import build_app

    session = EditSession(tiny_backend, defaults={"size": SIZE}, out_dir=tmp_path)
    demo = build_app(session=session, examples=[])
    comps = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    for elem, name in (("dds-steps", "steps"), ("dds-guidance", "guidance"), ("dds-lr", "lr"),
                       ("dds-seed", "seed")):
        assert (comps[elem].minimum, comps[elem].maximum) == LIMITS[name], elem
        assert comps[elem].preprocess("abc") == "abc"  # handed to the session as it came
    assert comps["dds-size"].maximum == session.max_size == max_size(tiny_backend)
    assert comps["dds-download"].interactive is False  # nothing to download yet
