"""The web app's editing, without a browser: one model shared by every page, edits run through
`dds.pipeline.EditPipeline` in a worker thread, progress handed back as `EditUpdate`s.

`EditSession.page_edit` is the page's edit handler in plain terms (dicts of values, errors as
one sentence in the page's words), so tests drive it without Gradio.  Edits wait their turn in
the session's own queue (`dds.ui.slots.EditQueue`): a waiting edit reports how many edits are
ahead of it, and Cancel takes it out of the queue before it runs any step.  The browser never
names a server path: an upload arrives as a file the server wrote, is opened with
`dds.images.load_image` (pixel-count and dimension checks), and a bad input is answered with
one sentence that does not name it.
"""

from __future__ import annotations

import itertools
import queue
import random
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

from dds.errors import DDSError, SettingError
from dds.images import save_png
from dds.loop import LIMITS, check_range
from dds.methods import METHODS, get_method
from dds.models.registry import knows_world
from dds.pipeline import (
    EditPipeline,
    EditRequest,
    EditResult,
    PreparedEdit,
    as_image,
    image_hash,
)
from dds.pipeline import max_size as model_max_size
from dds.ui.messages import (
    CANCELLED_QUEUED,
    error_markdown,
    join_lines,
    notes_markdown,
    one_sentence,
    page_sentence,
    progress_html,
)
from dds.ui.slots import EditQueue, Ticket

HISTORY_LIMIT = 50  # edits remembered per page
HISTORY_COLUMNS = ["#", "method", "source", "target", "steps", "guidance", "lr", "schedule",
                   "seed", "size", "outcome"]
# The page's settings that a method (and, for DDS/SDS, the timestep schedule) gives defaults to
PAGE_SETTINGS = ("steps", "guidance", "lr", "schedule", "step_rule", "average_tail")
# Of those, the ones only score distillation has (FlowEdit follows its own descending schedule)
SCHEDULE_SETTINGS = ("schedule", "step_rule", "average_tail")


@dataclass
class EditUpdate:
    """One report from an edit.  While it waits for a slot, `ahead` is the number of edits
    before it; `preview` is set when a new decode is available; the last update is `done`,
    with the `result` and the pipeline's `EditResult` as `edit`, or `cancelled` (taken out
    of the queue before any step ran)."""

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
    ahead: int | None = None
    cancelled: bool = False


@dataclass
class _Run:
    ticket: Ticket
    cancel: threading.Event = field(default_factory=threading.Event)  # the pipeline's `stop`


class _BadUpload:
    """What the page's image input hands over when Gradio itself could not read the upload."""

    def __init__(self, message: str):
        self.message = message


def random_seed() -> int:
    lo, hi = LIMITS["seed"]
    return random.SystemRandom().randint(lo, hi)


def page_number(name: str, value, integer: bool):
    """A page value (number, or text over the API) as a number in the range of `name`;
    SettingError naming the field otherwise (NaN, text, out of range, a fraction)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass  # check_range refuses the text itself
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    if name in LIMITS:
        return check_range(name, value, integer)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, value, "it must be a whole number" if integer else
                           "it must be a number")
    return value


class EditSession:
    """The model and the edits running on it, shared by every page of one server.

    `model`: a loaded model, a local model folder, or None for the built-in model.
    `defaults`: overrides of the page's initial settings (method, steps, guidance, lr, schedule,
    step_rule, average_tail, seed, size), on top of the model's recommended ones.
    `preview_every`: decode a preview every N steps (default: about 20 previews per edit).
    `max_size`: the largest working long side a page may ask for (default and cap:
    `dds.pipeline.max_size(model)`).
    `concurrency`: edits that run at once; the others wait in the queue.
    """

    def __init__(self, model=None, *, defaults: dict | None = None,
                 preview_every: int | None = None, max_size: int | None = None,
                 model_label: str | None = None, out_dir: str | Path | None = None,
                 concurrency: int = 1):
        self.pipeline = EditPipeline(model)
        self.model = self.pipeline.model
        self.builtin = model is None or knows_world(self.model)
        self.model_label = model_label or self.model.label
        native = int(self.model.native_size)
        cap = model_max_size(self.model)
        self.max_size = min(int(max_size or cap), cap)
        self.preview_every = preview_every
        cfg = self.pipeline.config()
        base = {"method": cfg.method, "seed": cfg.seed, "size": native,
                **{k: getattr(cfg, k) for k in PAGE_SETTINGS}}
        base.update({k: v for k, v in (defaults or {}).items() if v is not None})
        self.defaults = base
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dds-ui-"))
        self.queue = EditQueue(concurrency)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def method_defaults(self, method: str, schedule: str | None = None) -> dict:
        """The page's settings for `method` on this model (FlowEdit runs fewer steps, with
        more guidance, than DDS), and for DDS/SDS under `schedule`: the model's recommended
        set when it is the model's schedule (or None), else that schedule with the reference
        recipe's steps, step size and result (`--schedule reference` on the command line)."""
        cfg = self.pipeline.config(method=method)
        if schedule is not None and schedule != cfg.schedule:
            cfg = self.pipeline.config(method=method, schedule=schedule)
        return {k: getattr(cfg, k) for k in PAGE_SETTINGS}

    def set_concurrency(self, n: int) -> None:
        self.queue.slots = int(n)

    # ---- checks --------------------------------------------------------------------------
    @staticmethod
    def settings(**page) -> dict:
        """`EditConfig` fields from page values (numbers may arrive as floats or, over the
        API, as text); SettingError naming the field for a bad one."""
        s = {k: v for k, v in page.items() if v is not None}
        for name, integer in (("steps", True), ("seed", True), ("guidance", False),
                              ("lr", False), ("average_tail", False)):
            if name in s:
                s[name] = page_number(name, s[name], integer)
        for name in ("method", "schedule", "step_rule"):
            if name in s:
                s[name] = str(s[name]).strip().lower()
        return s

    def _schedule_settings(self, s: dict) -> dict:
        """`s` without the settings its method does not have (FlowEdit: the schedule, step
        size and tail), and without a schedule that is the model's own (so that the model's
        recommended optimiser and noise draws stay with it)."""
        if s.get("method") not in METHODS:
            return s  # the config refuses it, naming the field
        method = get_method(s["method"])
        if not method.gradient:
            return {k: v for k, v in s.items() if k not in SCHEDULE_SETTINGS}
        if s.get("schedule") == self.pipeline.config(method=method.name).schedule:
            return {k: v for k, v in s.items() if k != "schedule"}
        return s

    def check_size(self, size) -> int:
        if size is None:
            return int(self.defaults["size"])
        v = page_number("size", size, integer=True)
        if isinstance(v, int) and v > self.max_size:
            raise SettingError("size", size, f"it must be a whole number of pixels from 8 to "
                               f"{self.max_size}")
        return self.pipeline.check_size(v)

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
                guidance=None, lr=None, seed=None, size=None, schedule=None, step_rule=None,
                average_tail=None) -> PreparedEdit:
        """Check a page's request (DDSError, one sentence); no model work.  Every setting left
        None takes the session default; FlowEdit ignores the schedule settings."""
        d = self.defaults
        pick = lambda v, name: d[name] if v is None else v  # noqa: E731
        settings = self.settings(method=pick(method, "method"), steps=pick(steps, "steps"),
                                 guidance=pick(guidance, "guidance"), lr=pick(lr, "lr"),
                                 seed=pick(seed, "seed"), schedule=pick(schedule, "schedule"),
                                 step_rule=pick(step_rule, "step_rule"),
                                 average_tail=pick(average_tail, "average_tail"))
        settings = self._schedule_settings(settings)
        size = self.check_size(pick(size, "size"))
        request = EditRequest(self.load_input(image), source, target, settings, size=size)
        return self.pipeline.prepare(request)

    # ---- running -------------------------------------------------------------------------
    def state(self, key: str = "default") -> str | None:
        """"queued", "running" or None: what the edit of `key` is doing."""
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            return None
        return "running" if run.ticket.started else "queued"

    def cancel(self, key: str = "default") -> bool:
        """Take the edit of `key` out of the queue if it waits, else stop it after its current
        step; False if there is none."""
        with self._lock:
            run = self._runs.get(key)
        if run is None:
            return False
        if not self.queue.cancel(run.ticket):
            run.cancel.set()
        return True

    def running(self, key: str = "default") -> bool:
        """Whether `key` has an edit, running or waiting."""
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
        """Claim `key` (one edit per page at a time), join the queue and return the edit's
        updates."""
        every = preview_every or self.preview_every or max(1, num_steps(prepared.config) // 20)
        with self._lock:
            if key in self._runs:
                raise DDSError("an edit is already running in this page; wait for it or cancel it")
            run = _Run(self.queue.join(key))
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

    def _queued(self, prepared: PreparedEdit, run: _Run) -> Iterator[EditUpdate]:
        """Wait for a slot, yielding the edits ahead whenever that number changes; ends with a
        `cancelled` update if the edit is taken out of the queue."""
        im, total, t0 = prepared.input, num_steps(prepared.config), time.monotonic()
        shown = None
        while not self.queue.wait(run.ticket, 0 if shown is None else 0.25):
            if run.ticket.cancelled.is_set():
                yield EditUpdate(0, total, time.monotonic() - t0, im, done=True, cancelled=True)
                return
            ahead = self.queue.ahead(run.ticket)
            if ahead != shown:
                shown = ahead
                yield EditUpdate(0, total, time.monotonic() - t0, im, ahead=ahead)

    def _iterate(self, prepared: PreparedEdit, every: int, key: str,
                 run: _Run) -> Iterator[EditUpdate]:
        events: queue.Queue = queue.Queue()
        im, total = prepared.input, num_steps(prepared.config)
        worker = self._worker(prepared, every, key, run, events)
        try:
            for u in self._queued(prepared, run):
                yield u
                if u.cancelled:
                    return
            t0 = time.monotonic()
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
            if worker.ident is not None:
                worker.join(timeout=30)
            with self._lock:
                if self._runs.get(key) is run:
                    del self._runs[key]
            self.queue.done(run.ticket)

    # ---- the page's handlers, in plain values --------------------------------------------
    def save_result(self, edit: EditResult, **page) -> Path:
        """The result as a PNG for download: the pipeline's metadata, plus the page's fields
        (e.g. the outcome) where the pipeline has none of that name."""
        n = next(self._counter)
        path = self.out_dir / f"dds-edit-{n:04d}-{edit.config.method}.png"
        return replace(edit, metadata={**page, **edit.metadata}).save(path)

    def save_input(self, image: Image.Image) -> Path:
        """The original input of an edit, kept (once per distinct image) so that restoring a
        history row restores the image too."""
        path = self.out_dir / f"dds-input-{image_hash(image)}.png"
        if not path.exists():  # atomic: another page may serve this file while it is written
            save_png(image, path)
        return path

    def page_edit(self, image, source, target, method, guidance, steps, lr, seed, size,
                  history: list[dict] | None, key: str = "default", *, schedule=None,
                  step_rule=None, average_tail=None) -> Iterator[dict[str, Any]]:
        """The page's edit handler: yields dicts with some of the keys `preview`, `progress`
        (HTML), `result` ((before, after)), `download` (PNG path, None while there is no
        result), `history`, `message` (Markdown), `running` (bool: queued or running), and
        `error` (the sentence) when refused or failed.  Never raises for a bad input."""
        history = list(history or [])
        try:
            prepared = self.prepare(image, source, target, method=method, steps=steps,
                                    guidance=guidance, lr=lr, seed=seed, size=size,
                                    schedule=schedule, step_rule=step_rule,
                                    average_tail=average_tail)
            updates = self.start(prepared, key=key)
        except DDSError as e:
            s = page_sentence(e)
            yield {"message": error_markdown(s), "error": s, "running": False, "download": None,
                   "progress": progress_html(0, 0, "refused")}
            return
        notes = notes_markdown(prepared.notes)
        total = num_steps(prepared.config)
        yield {"message": notes, "running": True, "download": None,
               "progress": progress_html(0, total, "running")}
        step = 0
        try:
            for u in updates:
                step = u.step
                yield self._page_update(u, prepared, history, notes)
        except DDSError as e:  # e.g. the edit diverged: nothing is written
            s = page_sentence(e)
            yield {"message": error_markdown(s, before_run=False), "error": s,
                   "running": False, "progress": progress_html(step, total, "failed")}
        except Exception as e:  # a failure inside the model: one sentence, details in the log
            traceback.print_exc(file=sys.stderr)
            s = one_sentence(e)
            yield {"message": error_markdown(s, before_run=False), "error": s,
                   "running": False, "progress": progress_html(step, total, "failed")}

    def _page_update(self, u: EditUpdate, prepared: PreparedEdit, history: list[dict],
                     notes: str) -> dict[str, Any]:
        if u.ahead is not None:
            return {"progress": progress_html(0, u.total, "queued", ahead=u.ahead)}
        if u.cancelled:
            return {"progress": progress_html(0, u.total, "cancelled"), "running": False,
                    "message": CANCELLED_QUEUED}
        out: dict[str, Any] = {"progress": progress_html(u.step, u.total, "running", u.elapsed)}
        if u.preview is not None:
            out["preview"] = u.preview
        if u.done:
            out.update(self._finished(u, prepared, history, notes))
        return out

    def _finished(self, u: EditUpdate, prepared: PreparedEdit, history: list[dict],
                  notes: str) -> dict[str, Any]:
        """The page's values once an edit ends: result, download, history and message."""
        state = "stopped" if u.stopped else "done"
        outcome = (f"stopped at step {u.step} of {u.total}" if u.stopped
                   else f"done in {u.elapsed:.1f} s")
        path = self.save_result(u.edit, outcome=outcome)
        cfg = prepared.config
        rec = {"n": (history[-1]["n"] + 1) if history else 1, "source": prepared.source,
               "target": prepared.target, "method": cfg.method, "steps": cfg.steps,
               "guidance": cfg.guidance, "lr": cfg.lr, "seed": cfg.seed,
               **{k: getattr(cfg, k) for k in SCHEDULE_SETTINGS},
               "size": prepared.request.size, "steps_run": u.step, "outcome": outcome,
               "input": str(self.save_input(prepared.request.image)), "result": str(path)}
        return {"progress": progress_html(u.step, u.total, state, u.elapsed),
                "result": (u.input, u.result), "download": str(path),
                "history": (history + [rec])[-HISTORY_LIMIT:], "running": False,
                "message": join_lines(f"Edit {outcome}.", notes)}


def history_rows(history: list[dict]) -> list[list]:
    return [[h.get("n", i + 1), h["method"], h["source"], h["target"], h["steps"], h["guidance"],
             h["lr"], schedule_text(h), h["seed"], h["size"], h["outcome"]]
            for i, h in enumerate(history)]


def schedule_text(h: dict) -> str:
    """A history row's schedule in a few words ("stratified, budget, tail 0.2"); FlowEdit's is
    its own."""
    if not get_method(h["method"]).gradient:
        return "its own"
    tail = f", tail {h['average_tail']:g}" if h.get("average_tail") else ""
    return f"{h['schedule']}, {h['step_rule']}{tail}"


def history_gallery(history: list[dict]) -> list[tuple[str, str]]:
    """Thumbnails of the results, newest first, captioned with their row number."""
    return [(h["result"], f"#{h['n']}") for h in reversed(history) if h.get("result")]


def num_steps(cfg) -> int:
    """How many steps an edit with `cfg` runs (FlowEdit: the last n_max of its schedule)."""
    return get_method(cfg.method).num_steps(cfg)
