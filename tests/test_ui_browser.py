"""`dds ui` end to end in a real browser (headless Chromium driven by Playwright).

The page runs in this process (a server thread) on the tiny model.  The test uploads an image,
types the prompts, sets the steps in the Advanced accordion, runs an edit and watches the
live preview change before the end, checks the before/after result and the downloaded PNG,
then starts a long edit, cancels it mid-way and checks that it stopped and kept a result.
Screenshots are kept in test-artifacts/.

Skipped (with the reason) when gradio, playwright or a Chromium binary is missing.  The
browser is found at $DDS_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web app needs gradio (pip install 'dds[ui]')")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")


def _chromium() -> str | None:
    for cand in (os.environ.get("DDS_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _chromium()
if CHROMIUM is None and os.environ.get("DDS_REQUIRE_BROWSER"):
    raise RuntimeError("DDS_REQUIRE_BROWSER is set but no Chromium binary was found "
                       "(apt-get install chromium, or set DDS_CHROMIUM)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (apt-get install chromium, or set DDS_CHROMIUM)")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage"]
SIZE = 32  # the tiny model's native size is 16 px
T = 120_000  # ms: generous, for a loaded machine; a free one needs a fraction

# Records every state of the progress bar, every preview image and every message the page
# shows, so the test sees a change even when it happens between two polls.
OBSERVE = """() => {
  window.__dds = [];
  const rec = () => {
    const p = document.querySelector('#dds-progress');
    const img = document.querySelector('#dds-preview img');
    const m = document.querySelector('#dds-message');
    const e = {state: p ? p.dataset.state : null, step: p ? +p.dataset.step : -1,
               src: img ? img.getAttribute('src') : null, msg: m ? m.innerText.trim() : ''};
    const last = window.__dds[window.__dds.length - 1];
    if (!last || last.state !== e.state || last.step !== e.step || last.src !== e.src
        || last.msg !== e.msg)
      window.__dds.push(e);
  };
  new MutationObserver(rec).observe(document.body,
      {subtree: true, childList: true, attributes: true, characterData: true});
  rec();
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def translator(translate_cfg, tmp_path_factory):
    """A one-pass translation network trained for a few steps on the tiny model."""
    from dds.translate.train import train

    out = tmp_path_factory.mktemp("ui-translator") / "run"
    return train(translate_cfg(out, steps=2))


@pytest.fixture(scope="module")
def server(tiny_sd, translator):
    from dds.ui.app import build_app, launch

    demo = build_app(str(tiny_sd), defaults={"size": SIZE, "steps": 8}, preview_every=2,
                     translator=translator)
    port = _free_port()
    launch(demo, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=LAUNCH_ARGS)  # a fresh, empty profile
        yield b
        b.close()


def _open(browser, url: str, width: int = 1300, height: int = 1100):
    """A new page (its own Gradio session) on the app."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(T)
    # Nothing leaves the machine: any request not to the app itself is refused.
    pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url.rstrip("/"))
             else r.abort())
    pg.goto(url, wait_until="load")
    pg.wait_for_selector("#dds-run")
    return ctx, pg


@pytest.fixture(scope="module")
def page(server, browser):
    ctx, pg = _open(browser, server[0])
    yield pg
    ctx.close()


def _state(page) -> dict:
    return page.evaluate("""() => { const p = document.querySelector('#dds-progress');
        return p ? {state: p.dataset.state, step: +p.dataset.step, total: +p.dataset.total}
                 : {}; }""")


LONG_PROMPT = ("a photo of a red circle " + "with many small details " * 30).strip()


def _disabled(page, elem_id: str) -> bool:
    return page.evaluate("""id => { const e = document.querySelector('#' + id);
        const b = e.tagName === 'BUTTON' ? e : e.querySelector('button');
        return b.disabled; }""", elem_id)


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range])").first.input_value()


def _shown(page, selector: str) -> dict:
    """How an image is drawn: its natural size, its box, object-fit and image-rendering."""
    return page.evaluate("""sel => { const i = document.querySelector(sel);
        const r = i.getBoundingClientRect(), cs = getComputedStyle(i);
        return {nw: i.naturalWidth, nh: i.naturalHeight, w: r.width, h: r.height,
                fit: cs.objectFit, rendering: cs.imageRendering}; }""", selector)


def _fill(page, elem_id: str, value, shows=None) -> None:
    """Type `value` into a field and make sure the page kept it (or shows `shows`, for a
    value the field clamps).  Gradio's frontend can put
    a component's previous value back when an unrelated update re-renders it right after
    typing (seen on a loaded machine), so the value is read back after two frames and typed
    again if it did not stick."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range])").first
    for _ in range(3):
        box.fill(str(value))
        box.press("Tab")  # commit the value (number fields update on blur)
        page.evaluate("() => new Promise(r => requestAnimationFrame("
                      "() => requestAnimationFrame(() => setTimeout(r, 100))))")
        if box.input_value() == str(value if shows is None else shows):
            return
    raise AssertionError(f"#{elem_id} did not keep {value!r}: it shows {box.input_value()!r}")


def _wait_state(page, states: tuple[str, ...], min_step: int = 0) -> dict:
    """Wait (up to the page timeout) until the progress bar is in one of `states`, at
    `min_step` or later."""
    page.wait_for_function(
        """([states, minStep]) => { const p = document.querySelector('#dds-progress');
            return p && states.includes(p.dataset.state) && +p.dataset.step >= minStep; }""",
        arg=[list(states), min_step])
    return _state(page)


def _upload(page, elem_id: str, path: Path) -> None:
    """Upload a file into an image input and wait until the page shows it."""
    old = page.locator(f"#{elem_id} img").first.get_attribute("src") if page.locator(
        f"#{elem_id} img").count() else None
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        """([id, old]) => { const i = document.querySelector('#' + id + ' img');
            return i && i.getAttribute('src') && i.getAttribute('src') !== old; }""",
        arg=[elem_id, old])


def test_edit_preview_download_and_cancel(page, server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    photo = tmp_path / "upload.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)

    # The header says what the model knows and which one it is; nothing to download yet;
    # the examples sit right under the input image, above Edit.
    demo_session = server[1].dds_session
    header = page.locator("#dds-model").inner_text()
    assert "knows photos" in header and demo_session.model.identity()["hash"][:12] in header
    assert _disabled(page, "dds-download") and _disabled(page, "dds-use-result")
    assert _box(page, "#dds-examples")["y"] < _box(page, "#dds-run")["y"]
    assert page.locator("#dds-suggestions").is_visible()  # the first example's targets

    # Upload an image (replacing the example shown at start) and wait for the round trip:
    # the previous scene's target suggestions go away.
    _upload(page, "dds-input", photo)
    page.wait_for_function("() => { const r = document.querySelector('#dds-suggestions');"
                           " return !r || r.offsetParent === null; }")

    _fill(page, "dds-source", "a photo of colourful noise")
    _fill(page, "dds-target", "a photo of a red circle")
    page.get_by_text("Advanced").click()
    _fill(page, "dds-steps", 12)

    # ---- a full edit: the preview changes while it runs, and a result arrives -------------
    page.evaluate(OBSERVE)
    page.click("#dds-run")
    done = _wait_state(page, ("done", "stopped", "failed"))
    assert done["state"] == "done" and done["step"] == 12, done
    log = page.evaluate("window.__dds")
    running_srcs = {e["src"] for e in log if e["state"] == "running" and e["src"]}
    assert len(running_srcs) >= 2, f"the live preview did not change during the edit: {log}"
    assert "Edit done" in page.locator("#dds-message").inner_text()
    page.wait_for_selector("#dds-result img")
    assert not _disabled(page, "dds-download")
    # Whole images: not cropped (contain), small ones upscaled with hard pixel edges.
    for sel in ("#dds-preview img", "#dds-result img", "#dds-input img"):
        shown = _shown(page, sel)
        assert shown["fit"] == "contain" and shown["rendering"] == "pixelated", (sel, shown)
    shown = _shown(page, "#dds-result img")
    assert shown["nw"] == 32 and shown["w"] >= 8 * 32 and shown["h"] >= 200, shown
    page.screenshot(path=str(ARTIFACTS / "ui-browser.png"), full_page=True)

    with page.expect_download() as dl:
        page.click("#dds-download")
    out = tmp_path / "result.png"
    dl.value.save_as(out)
    result = Image.open(out)
    meta = json.loads(result.text["dds"])
    assert meta["target"] == "a photo of a red circle" and meta["config"]["steps"] == 12
    assert meta["steps_run"] == 12 and meta["outcome"].startswith("done in")
    from dds.images import prepare
    from dds.pipeline import image_hash

    # the pipeline's record of what made it: input hash, model version, device, precision
    assert meta["input_sha256"] == image_hash(prepare(Image.open(photo).convert("RGB"), SIZE))
    assert meta["model_id"]["hash"] == demo_session.model.identity()["hash"]
    assert meta["device"] == "cpu" and meta["precision"] == "float32"

    before = np.asarray(prepare(Image.open(photo).convert("RGB"), SIZE), dtype=np.int16)
    after = np.asarray(result.convert("RGB"), dtype=np.int16)
    assert after.shape == before.shape == (24, 32, 3)
    assert np.abs(after - before).mean() > 1.0, "the result equals the input"

    # ---- a long edit, cancelled mid-way: it stops at once and keeps the latest result ------
    _fill(page, "dds-steps", 5000)
    _fill(page, "dds-target", LONG_PROMPT)
    page.evaluate("window.__dds = []")
    page.click("#dds-run")
    _wait_state(page, ("running",), min_step=4)
    page.click("#dds-cancel")
    stopped = _wait_state(page, ("done", "stopped", "failed"))
    assert stopped["state"] == "stopped", stopped
    assert 4 <= stopped["step"] < 5000
    msg = page.locator("#dds-message").inner_text()
    assert f"stopped at step {stopped['step']} of 5000" in msg, msg
    # Cancel answered at once (while the edit ran), and the edit stopped only after that.
    log = page.evaluate("window.__dds")
    noted = [i for i, e in enumerate(log) if e["msg"].startswith("Stopping after the current")]
    ended = [i for i, e in enumerate(log) if e["state"] == "stopped"]
    assert noted and ended and noted[0] < ended[0], log
    assert log[noted[0]]["state"] == "running", log
    history = page.locator("#dds-history").inner_text()
    assert "done in" in history and "stopped at step" in history
    # History rows stay one line high, even with a long prompt.
    heights = page.evaluate("""() => [...document.querySelectorAll('#dds-history .virtual-row')]
        .map(r => r.getBoundingClientRect().height)""")
    assert len(heights) == 2 and max(heights) < 45 and max(heights) - min(heights) < 2, heights
    page.screenshot(path=str(ARTIFACTS / "ui-browser-cancel.png"), full_page=True)


def test_history_thumbnails_restore_and_chain(page, tmp_path):
    # One thumbnail per past result, newest first.
    page.wait_for_function("() => document.querySelectorAll('#dds-thumbs img').length === 2")
    for shown in page.evaluate("""() => [...document.querySelectorAll('#dds-thumbs img')]
            .map(i => ({nw: i.naturalWidth, w: i.getBoundingClientRect().width}))"""):
        assert shown["nw"] > 0 and shown["w"] >= 40, shown
    page.screenshot(path=str(ARTIFACTS / "ui-history.png"), full_page=True)
    # Clicking the oldest restores its input image, prompts and settings, and its download.
    old_src = page.locator("#dds-input img").first.get_attribute("src")
    _fill(page, "dds-steps", 3)
    page.locator("#dds-thumbs img").nth(1).click()
    page.wait_for_function("() => document.querySelector('#dds-message').innerText"
                           ".includes('Restored edit #1')")
    assert _value(page, "dds-steps") == "12"
    assert _value(page, "dds-target") == "a photo of a red circle"
    page.wait_for_function("old => { const i = document.querySelector('#dds-input img');"
                           " return i && i.getAttribute('src') !== old; }", arg=old_src)
    with page.expect_download() as dl:
        page.click("#dds-download")
    out = tmp_path / "restored.png"
    dl.value.save_as(out)
    meta = json.loads(Image.open(out).text["dds"])
    assert meta["steps_run"] == 12 and meta["outcome"].startswith("done in")
    # "Use result as input" chains edits: the result becomes the input, its target the source.
    src = page.locator("#dds-input img").first.get_attribute("src")
    page.click("#dds-use-result")
    page.wait_for_function("() => document.querySelector('#dds-message').innerText"
                           ".includes('is the input now')")
    assert _value(page, "dds-source") == "a photo of a red circle"
    page.wait_for_function("old => { const i = document.querySelector('#dds-input img');"
                           " return i && i.getAttribute('src') !== old; }", arg=src)
    # The dice draws a seed in range.
    page.click("#dds-seed-random")
    page.wait_for_function("() => document.querySelector('#dds-seed input').value !== '0'")
    assert 0 < int(_value(page, "dds-seed")) < 2**32


def test_numbers_are_bounded_and_refusals_are_one_sentence(page):
    page.click("#dds-seed-random")  # any status left over goes at the next action
    # Steps: the field is a slider bounded by the library's range.
    assert page.locator("#dds-steps input[type=range]").get_attribute("max") == "5000"
    _fill(page, "dds-steps", 1_000_000_000, shows=5000)  # clamped on blur
    page.click("#dds-run")
    state = _wait_state(page, ("refused", "running"))
    if state["state"] == "refused":  # the value reached the server: refused, naming Steps
        msg = page.locator("#dds-message").inner_text().strip()
        assert msg.startswith("Cannot edit: Steps = 1000000000 is invalid"), msg
    else:  # the page itself kept Steps in range
        assert int(_value(page, "dds-steps")) <= 5000
        assert state["total"] <= 5000, state
        page.click("#dds-cancel")
        _wait_state(page, ("stopped", "done"))
    # Learning rate out of range: refused before any step, in the page's words.
    _fill(page, "dds-steps", 4)
    _fill(page, "dds-lr", "1e30")
    page.click("#dds-run")
    page.wait_for_function("() => document.querySelector('#dds-message').innerText"
                           ".includes('Learning rate')")
    msg = page.locator("#dds-message").inner_text().strip()
    assert msg.startswith("Cannot edit: Learning rate = 1e+30 is invalid"), msg
    assert "--" not in msg and "Edit done" not in msg and "\n" not in msg
    assert _state(page)["state"] == "refused" and _disabled(page, "dds-download")
    page.screenshot(path=str(ARTIFACTS / "ui-refused.png"), full_page=True)
    _fill(page, "dds-lr", 0.1)


def test_queued_edit_shows_its_place_and_cancel_removes_it(page, server, browser):
    url = server[0]
    _fill(page, "dds-steps", 5000)
    page.click("#dds-run")  # this page holds the only slot
    _wait_state(page, ("running",), min_step=1)
    ctx, other = _open(browser, url)
    try:
        other.click("#dds-run")
        queued = _wait_state(other, ("queued",))
        assert "queued: 1 edit ahead" in other.locator("#dds-progress").inner_text()
        assert _disabled(other, "dds-run"), "Edit stays enabled while the edit is queued"
        assert queued["step"] == 0
        other.screenshot(path=str(ARTIFACTS / "ui-queued.png"), full_page=True)
        calls_before = _state(page)["step"]
        other.click("#dds-cancel")
        _wait_state(other, ("cancelled",))
        msg = other.locator("#dds-message").inner_text()
        assert "still waiting in the queue, so no step ran" in msg, msg
        assert not _disabled(other, "dds-run")
        assert _state(page)["state"] == "running" and _state(page)["step"] >= calls_before
    finally:
        page.click("#dds-cancel")
        _wait_state(page, ("stopped", "done", "failed"))
        ctx.close()


def test_examples_fit_a_narrow_window(server, browser):
    ctx, narrow = _open(browser, server[0], width=420, height=1400)
    try:
        narrow.wait_for_function("() => [...document.querySelectorAll('#dds-examples img')]"
                                 ".every(i => i.complete && i.naturalWidth > 0)")
        box = _box(narrow, "#dds-examples")
        imgs = narrow.evaluate("""() => [...document.querySelectorAll('#dds-examples img')]
            .map(i => { const r = i.getBoundingClientRect();
                        return {x: r.x, w: r.width, h: r.height}; })""")
        assert imgs
        for im in imgs:  # every thumbnail is drawn, whole, inside the gallery
            assert im["w"] >= 40 and im["h"] >= 40, im
            assert box["x"] <= im["x"] and im["x"] + im["w"] <= box["x"] + box["width"] + 1, im
        narrow.screenshot(path=str(ARTIFACTS / "ui-narrow.png"), full_page=True)
    finally:
        ctx.close()


def test_bad_upload_is_one_sentence(page, tmp_path):
    # A 4x4 image is a real image that the editor refuses: one sentence, no stack trace.
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4), "red").save(tiny)
    _upload(page, "dds-input", tiny)
    page.click("#dds-run")
    page.wait_for_function(
        "() => document.querySelector('#dds-message').innerText.includes('Cannot edit')")
    msg = page.locator("#dds-message").inner_text().strip()
    assert "at least 8 pixels" in msg and "Traceback" not in msg and "\n" not in msg, msg
    assert msg.lower().startswith("cannot edit: the uploaded image is 4x4"), msg  # no path


def test_translation_tab_runs_the_network(page, translator, tmp_path):
    from dds.translate import Translator

    ARTIFACTS.mkdir(exist_ok=True)
    photo = tmp_path / "scene.png"
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    im.save(photo)
    page.get_by_role("tab", name="One-pass translation").click()
    _upload(page, "dds-t-input", photo)
    page.click("#dds-t-run")
    page.wait_for_function("() => { const i = document.querySelector('#dds-t-output img');"
                           " return i && i.getAttribute('src'); }")
    assert page.locator("#dds-t-message").inner_text().strip() == ""
    # The page shows exactly what the network computes for the default (first) task.
    src = page.locator("#dds-t-output img").get_attribute("src")
    with page.expect_download() as dl:  # fetch the shown image through the page
        page.evaluate("""src => { const a = document.createElement('a'); a.href = src;
            a.download = 'translated.png'; document.body.appendChild(a); a.click(); }""", src)
    shown = tmp_path / "shown.png"
    dl.value.save_as(shown)
    net = Translator(translator)
    expected = np.asarray(net([im], net.tasks[0])[0].convert("RGB"), dtype=np.int16)
    got = np.asarray(Image.open(shown).convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape == (16, 16, 3)
    assert np.abs(got - expected).max() <= 1
    page.wait_for_function("() => { const i = document.querySelector('#dds-t-output img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    page.screenshot(path=str(ARTIFACTS / "ui-browser-translate.png"), full_page=True)
    page.get_by_role("tab", name="Edit").click()


def _pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in a dropdown, as a user does (open it, click the option)."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id} li[role=option][aria-label='{option}']").click()
    page.wait_for_function("([id, v]) => document.querySelector('#' + id + ' input').value === v",
                           arg=[elem_id, option])


def test_schedule_settings_follow_the_schedule_and_the_method(server, browser):
    """The page starts at the model's recommended schedule; picking the reference schedule
    brings the reference recipe's steps and result; FlowEdit makes the schedule settings
    inactive (it has its own)."""
    ctx, pg = _open(browser, server[0])
    try:
        pg.get_by_text("Advanced").click()
        assert _value(pg, "dds-schedule") == "stratified"
        assert _value(pg, "dds-step-rule") == "budget"
        assert float(_value(pg, "dds-average-tail")) == 0.2
        _pick(pg, "dds-schedule", "reference")
        pg.wait_for_function("() => document.querySelector('#dds-steps input').value === '200'")
        assert _value(pg, "dds-step-rule") == "constant"
        assert float(_value(pg, "dds-average-tail")) == 0.0
        pg.locator("#dds-advanced").get_by_label("flowedit").check()
        pg.wait_for_function("() => document.querySelector('#dds-schedule input').disabled")
        assert pg.locator("#dds-average-tail input[type=range]").is_disabled()
        pg.locator("#dds-advanced").get_by_label("dds").check()
        pg.wait_for_function("() => !document.querySelector('#dds-schedule input').disabled")
        assert _value(pg, "dds-schedule") == "stratified"
        pg.screenshot(path=str(ARTIFACTS / "ui-schedule.png"), full_page=True)
    finally:
        ctx.close()
