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
def page(server):
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=LAUNCH_ARGS)  # a fresh, empty profile
        ctx = browser.new_context(viewport={"width": 1300, "height": 1100}, accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(T)
        # Nothing leaves the machine: any request not to the app itself is refused.
        pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url.rstrip("/"))
                 else r.abort())
        pg.goto(url, wait_until="load")
        pg.wait_for_selector("#dds-run")
        yield pg
        ctx.close()
        browser.close()


def _state(page) -> dict:
    return page.evaluate("""() => { const p = document.querySelector('#dds-progress');
        return p ? {state: p.dataset.state, step: +p.dataset.step, total: +p.dataset.total}
                 : {}; }""")


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")  # commit the value (number fields update on blur)


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


def test_edit_preview_download_and_cancel(page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    photo = tmp_path / "upload.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)

    # Upload an image (replacing the example shown at start) and wait for the round trip.
    _upload(page, "dds-input", photo)

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

    before = np.asarray(prepare(Image.open(photo).convert("RGB"), SIZE), dtype=np.int16)
    after = np.asarray(result.convert("RGB"), dtype=np.int16)
    assert after.shape == before.shape == (24, 32, 3)
    assert np.abs(after - before).mean() > 1.0, "the result equals the input"

    # ---- a long edit, cancelled mid-way: it stops at once and keeps the latest result ------
    _fill(page, "dds-steps", 5000)
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
    page.screenshot(path=str(ARTIFACTS / "ui-browser-cancel.png"), full_page=True)


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
