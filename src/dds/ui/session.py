"""The web app's editing, without a browser: one model shared by every page, edits run through
`dds.pipeline.EditPipeline` in a worker thread, progress handed back as `EditUpdate`s.

`EditSession.page_edit` is the page's edit handler in plain terms (dicts of values, errors as
one sentence), so tests drive it without Gradio.  The browser never names a server path: an
upload arrives as a file the server wrote, is opened with `dds.images.load_image` (pixel-count
and dimension checks), and a bad input is answered with one sentence that does not name it.
"""

from __future__ import annotations

import itertools
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from dds.errors import DDSError
from dds.models.registry import is_builtin
from dds.pipeline import EditPipeline, EditRequest, EditResult, PreparedEdit, as_image

HISTORY_LIMIT = 50  # edits remembered per page
HISTORY_COLUMNS = ["#", "method", "source", "target", "steps", "guidance", "lr", "seed", "size",
                   "outcome"]
STOPPING = "Stopping after the current step…"


@dataclass
class EditUpdate:
    """One report from a running edit.  `preview` is set when a new decode is available,
    `result` on the last update (`done`), which also says whether the edit was `stopped` and
    carries the pipeline's `EditResult` as `edit`."""

    step: int
    total: int
    elapsed: float
    input: Image.Image  # the prepared (resized) input the edit starts from
    preview: Image.Image | None = None
    result: Image.Image | None = None
    done: bool = False
    stopped: bool = False
    grad_norm: float | None = None
    edit: EditResult | None = None


@dataclass
class _Run:
    cancel: threading.Event = field(default_factory=threading.Event)  # the pipeline's `stop`


class _BadUpload:
    """What the page's image input hands over when Gradio itself could not read the upload."""

    def __init__(self, message: str):
        self.message = message


def _one_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


class EditSession:
    """The model and the edits running on it, shared by every page of one server.

    `model`: a loaded model, a local model folder, or None for the built-in model.
    `defaults`: overrides of the page's initial settings (method, steps, guidance, lr, seed,
    size), on top of the model's recommended ones.  `preview_every`: decode a preview every
    N steps (default: about 20 previews per edit).  `max_size`: the largest working long
    side a page may ask for (default: twice the model's native size, at least 1024).
    """

    def __init__(self, model=None, *, defaults: dict | None = None,
                 preview_every: int | None = None, max_size: int | None = None,
                 model_label: str | None = None, out_dir: str | Path | None = None):
        self.pipeline = EditPipeline(model)
        self.model = self.pipeline.model
        self.builtin = model is None or is_builtin(self.model)
        self.model_label = model_label or self.model.label
        native = int(self.model.native_size)
        self.multiple = int(getattr(self.model, "vae_scale_factor", 8))
        self.max_size = int(max_size or max(1024, 2 * native))
        self.preview_every = preview_every
        cfg = self.pipeline.config()
        base = {"method": cfg.method, "steps": cfg.steps, "guidance": cfg.guidance,
                "lr": cfg.lr, "seed": cfg.seed, "size": native}
        base.update({k: v for k, v in (defaults or {}).items() if v is not None})
        self.defaults = base
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dds-ui-"))
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    # ---- checks --------------------------------------------------------------------------
    @staticmethod
    def settings(**page) -> dict:
        """`EditConfig` fields from page values (numbers may arrive as floats); DDSError."""
        s = {k: v for k, v in page.items() if v is not None}
        for name in ("steps", "seed"):
            if name in s:
                v = float(s[name])
                if not v.is_integer():
                    raise DDSError(f"{name} = {s[name]} is invalid: it must be a whole number")
                s[name] = int(v)
        for name in ("guidance", "lr"):
            if name in s:
                s[name] = float(s[name])
        if "method" in s:
            s["method"] = str(s["method"]).lower()
        return s

    def check_size(self, size) -> int:
        if size is None:
            return int(self.defaults["size"])
        v = float(size)
        lo = max(8, self.multiple)
        if not v.is_integer() or not lo <= v <= self.max_size:
            raise DDSError(f"image size {size} is invalid: give a whole number of pixels from "
                           f"{lo} to {self.max_size}")
        return int(v)

    @staticmethod
    def load_input(image) -> Image.Image:
        """A page upload (file path), PIL image or array -> checked RGB image."""
        if image is None:
            raise DDSError("no input image: upload one, paste one, or pick an example")
        if isinstance(image, _BadUpload):
            raise DDSError(image.message)
        try:
            return as_image(image)
        except DDSError as e:
            if not isinstance(image, (str, Path)):
                raise
            msg = str(e)  # an upload's file: never show the browser a path on the server
            for name in (f"input '{image}'", f"'{image}'", str(image)):
                msg = msg.replace(name, "the uploaded image")
            raise DDSError(msg) from None

    def prepare(self, image, source: str | None, target: str, *, method=None, steps=None,
                guidance=None, lr=None, seed=None, size=None) -> PreparedEdit:
        """Check a page's request (DDSError, one sentence); no model work.  Every setting left
        None takes the session default."""
        d = self.defaults
        pick = lambda v, name: d[name] if v is None else v  # noqa: E731
        settings = self.settings(method=pick(method, "method"), steps=pick(steps, "steps"),
                                 guidance=pick(guidance, "guidance"), lr=pick(lr, "lr"),
                                 seed=pick(seed, "seed"))
        size = self.check_size(pick(size, "size"))
        request = EditRequest(self.load_input(image), source, target, settings, size=size)
        return self.pipeline.prepare(request)

    # ---- running -------------------------------------------------------------------------
    def cancel(self, key: str = "default") -> bool:
        """Stop the edit running for `key` after its current step; False if none runs."""
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            return False
        run.cancel.set()
        return True

    def running(self, key: str = "default") -> bool:
        with self._lock:
            return key in self._runs

    def run(self, image, source: str | None, target: str, *, key: str = "default",
            preview_every: int | None = None, **settings) -> Iterator[EditUpdate]:
        """Check everything (DDSError, before anything is yielded), then edit and yield
        progress.  `settings`: method, steps, guidance, lr, seed, size."""
        return self.start(self.prepare(image, source, target, **settings), key=key,
                          preview_every=preview_every)

    def start(self, prepared: PreparedEdit, *, key: str = "default",
              preview_every: int | None = None) -> Iterator[EditUpdate]:
        """Claim `key` (one edit per page at a time) and return the edit's updates."""
        every = preview_every or self.preview_every or max(1, prepared.config.steps // 20)
        run = _Run()
        with self._lock:
            if key in self._runs:
                raise DDSError("an edit is already running in this page; wait for it or cancel it")
            self._runs[key] = run
        return self._iterate(prepared, every, key, run)

    def _worker(self, prepared: PreparedEdit, every: int, key: str, run: _Run,
                events: queue.Queue) -> threading.Thread:
        """The thread that runs the edit, reporting steps, previews and the end on `events`."""
        pipe = self.pipeline

        def on_step(info) -> None:
            due = info.step % every == 0 and info.step < info.total
            preview = pipe.decode(info.z) if due else None
            events.put(("step", info.step, preview, float(info.grad_norm.mean())))

        def work() -> None:
            try:
                events.put(("done", pipe.run(prepared, on_step=on_step, stop=run.cancel)))
            except BaseException as e:  # handed to the page as one sentence
                events.put(("error", e))

        return threading.Thread(target=work, name=f"dds-edit-{key}", daemon=True)

    def _iterate(self, prepared: PreparedEdit, every: int, key: str,
                 run: _Run) -> Iterator[EditUpdate]:
        events: queue.Queue = queue.Queue()
        im, total = prepared.input, prepared.config.steps
        worker = self._worker(prepared, every, key, run, events)
        t0 = time.monotonic()
        try:
            worker.start()
            yield EditUpdate(0, total, 0.0, im)
            step, last_yield, norm = 0, 0.0, None
            while True:
                try:
                    ev = events.get(timeout=0.5)
                except queue.Empty:
                    if not worker.is_alive() and events.empty():
                        raise RuntimeError("the editing thread ended without a result") from None
                    continue
                now = time.monotonic()
                if ev[0] == "step":
                    _, step, preview, norm = ev
                    if preview is not None or now - last_yield >= 0.25:  # at most 4 a second
                        last_yield = now
                        yield EditUpdate(step, total, now - t0, im, preview=preview,
                                         grad_norm=norm)
                elif ev[0] == "done":
                    r: EditResult = ev[1]
                    yield EditUpdate(r.steps_run, total, now - t0, im, preview=r.image,
                                     result=r.image, done=True, stopped=r.stopped,
                                     grad_norm=norm, edit=r)
                    return
                else:
                    raise ev[1]
        finally:
            run.cancel.set()  # the page went away (or the edit ended): stop the worker
            worker.join(timeout=30)
            with self._lock:
                if self._runs.get(key) is run:
                    del self._runs[key]

    # ---- the page's handlers, in plain values --------------------------------------------
    def save_result(self, edit: EditResult, **page) -> Path:
        """The result as a PNG for download: the pipeline's metadata, plus the page's fields
        (e.g. the outcome) where the pipeline has none of that name."""
        n = next(self._counter)
        path = self.out_dir / f"dds-edit-{n:04d}-{edit.config.method}.png"
        return replace(edit, metadata={**page, **edit.metadata}).save(path)

    def page_edit(self, image, source, target, method, guidance, steps, lr, seed, size,
                  history: list[dict] | None, key: str = "default") -> Iterator[dict[str, Any]]:
        """The page's edit handler: yields dicts with some of the keys `preview`, `progress`
        (HTML), `result` ((before, after)), `download` (PNG path), `history`, `message`
        (Markdown), `running` (bool).  Never raises for a bad input: `message` says why."""
        history = list(history or [])
        try:
            prepared = self.prepare(image, source, target, method=method, steps=steps,
                                    guidance=guidance, lr=lr, seed=seed, size=size)
            updates = self.start(prepared, key=key)
        except DDSError as e:
            yield {"message": error_markdown(_one_sentence(e)), "error": _one_sentence(e),
                   "running": False}
            return
        cfg = prepared.config
        record = {"source": prepared.source, "target": prepared.target, "method": cfg.method,
                  "steps": cfg.steps, "guidance": cfg.guidance, "lr": cfg.lr, "seed": cfg.seed,
                  "size": prepared.request.size}
        yield {"message": "", "running": True, "progress": progress_html(0, cfg.steps, "running")}
        step = 0
        try:
            for u in updates:
                step = u.step
                out: dict[str, Any] = {
                    "progress": progress_html(u.step, u.total, "running", u.elapsed)}
                if u.preview is not None:
                    out["preview"] = u.preview
                if u.done:
                    out.update(self._finished(u, record, history))
                    history = out["history"]
                yield out
        except Exception as e:  # a failure inside the model: one sentence, details in the log
            traceback.print_exc(file=sys.stderr)
            msg = f"The edit failed: {_one_sentence(e)}"
            yield {"message": error_markdown(msg), "error": msg, "running": False,
                   "progress": progress_html(step, cfg.steps, "failed")}

    def _finished(self, u: EditUpdate, record: dict, history: list[dict]) -> dict[str, Any]:
        """The page's values once an edit ends: result, download, history and message."""
        state = "stopped" if u.stopped else "done"
        outcome = (f"stopped at step {u.step} of {u.total}" if u.stopped
                   else f"done in {u.elapsed:.1f} s")
        path = self.save_result(u.edit, outcome=outcome)
        rec = {**record, "steps_run": u.step, "outcome": outcome, "n": len(history) + 1}
        return {"progress": progress_html(u.step, u.total, state, u.elapsed),
                "result": (u.input, u.result), "download": str(path),
                "history": (history + [rec])[-HISTORY_LIMIT:], "running": False,
                "message": f"Edit {outcome}."}


def progress_html(step: int, total: int, state: str, elapsed: float | None = None) -> str:
    """A progress bar whose data attributes carry the state (running, done, stopped, failed)."""
    pct = 100 * step / total if total else 100
    label = {"running": "editing", "done": "done", "stopped": "stopped",
             "failed": "failed"}.get(state, state)
    secs = f" · {elapsed:.1f} s" if elapsed is not None else ""
    return (f'<div id="dds-progress" data-state="{state}" data-step="{step}" '
            f'data-total="{total}"><progress max="{total}" value="{step}" '
            f'style="width:100%">{pct:.0f}%</progress>'
            f"<div>{label}: step {step} of {total}{secs}</div></div>")


def error_markdown(sentence: str) -> str:
    return f"**Cannot edit:** {sentence}"


def history_rows(history: list[dict]) -> list[list]:
    return [[h.get("n", i + 1), h["method"], h["source"], h["target"], h["steps"], h["guidance"],
             h["lr"], h["seed"], h["size"], h["outcome"]] for i, h in enumerate(history)]
