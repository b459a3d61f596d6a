"""The web app behind `dds ui`: DDS/SDS editing in the browser with a live preview.

Two layers:

- `EditSession` (plain Python, no Gradio): holds the one loaded model, validates a request,
  runs `edit_latents` in a worker thread and *yields* `EditUpdate`s (step, decoded preview,
  final result) while it runs; `cancel(key)` makes the editor's callback return True, so the
  edit stops after the current step and the latest latent becomes the result.
  `EditSession.page_edit` is the page's edit handler in the same plain terms (dicts of values,
  errors as one sentence), so tests can drive it without a browser.
- `build_app` maps that onto Gradio components.  Edits go through Gradio's queue with a
  concurrency limit (default 1: every edit shares one model); Cancel runs outside that limit.

The browser never names a server path: the model is chosen when the server starts, uploads
go through Gradio's upload route (size-capped) and are opened with `dds.images.load_image`
(pixel-count and dimension checks), and a bad input is answered with one sentence.
"""

from __future__ import annotations

import itertools
import json
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dds.errors import DDSError

HISTORY_LIMIT = 50  # edits remembered per page
MAX_UPLOAD = "25mb"  # upload size cap (Gradio's max_file_size)
HISTORY_COLUMNS = ["#", "method", "source", "target", "steps", "guidance", "lr", "seed", "size",
                   "outcome"]


# --------------------------------------------------------------------------------------------
# Bundled examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """An input image that ships with the installation, its caption and target suggestions."""

    name: str
    image: Image.Image
    source: str
    targets: tuple[str, ...]
    kind: str  # "scene" (the built-in world) or "photo"


def world_examples(n: int = 4, seed: int = 0) -> list[Example]:
    """Scenes of the built-in world, each with captions that change one attribute."""
    from dds.world import caption, make_edit, render, sample_scene, to_uint8

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 4242, i])
        scene = sample_scene(rng)
        targets: list[str] = []
        for kind in ("object_color", "object_shape", "background_color", "add_object"):
            try:
                t = make_edit(scene, kind, rng).target_caption
            except ValueError:
                continue
            if t not in targets:
                targets.append(t)
        im = Image.fromarray(to_uint8(render(scene)))
        out.append(Example(f"scene {i + 1}", im, caption(scene), tuple(targets), "scene"))
    return out


# name, loader, source caption, target suggestions
_PHOTOS = [
    ("cat (scikit-image)", ("skimage", "chelsea"), "a photo of a cat",
     ("a photo of a tiger", "a photo of a dog", "a watercolor painting of a cat")),
    ("coffee (scikit-image)", ("skimage", "coffee"), "a photo of a cup of coffee",
     ("a photo of a cup of tea", "a photo of a bowl of soup")),
    ("astronaut (scikit-image)", ("skimage", "astronaut"), "a photo of an astronaut",
     ("a pencil sketch of an astronaut", "a photo of a robot astronaut")),
    ("Grace Hopper (matplotlib)", ("matplotlib", "grace_hopper.jpg"),
     "a photo of a woman in a navy uniform",
     ("a photo of a man in a navy uniform", "an oil painting of a woman in a navy uniform")),
]


def _load_photo(package: str, name: str) -> Image.Image | None:
    """A sample photo shipped inside an installed package, or None if it is not there."""
    try:
        if package == "skimage":
            import skimage.data

            a = getattr(skimage.data, name)()
            return Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB")
        if package == "matplotlib":
            from matplotlib import cbook

            with cbook.get_sample_data(name) as f:
                im = Image.open(f)
                im.load()
                return im.convert("RGB")
    except Exception:  # an optional package missing or without its data: skip the example
        return None
    return None


def photo_examples() -> list[Example]:
    out = []
    for name, (package, key), source, targets in _PHOTOS:
        im = _load_photo(package, key)
        if im is not None:
            out.append(Example(name, im, source, targets, "photo"))
    return out


def bundled_examples(builtin: bool = True, n_scenes: int = 4) -> list[Example]:
    """World scenes and packaged photos; the scenes first for the built-in model (they are
    what it knows), the photos first for any other model."""
    scenes, photos = world_examples(n_scenes), photo_examples()
    return scenes + photos if builtin else photos + scenes


# --------------------------------------------------------------------------------------------
# Editing without a browser
# --------------------------------------------------------------------------------------------


@dataclass
class EditUpdate:
    """One report from a running edit.  `preview` is set when a new decode is available,
    `result` on the last update (`done`), which also says whether the edit was `stopped`."""

    step: int
    total: int
    elapsed: float
    input: Image.Image  # the prepared (resized) input the edit starts from
    preview: Image.Image | None = None
    result: Image.Image | None = None
    done: bool = False
    stopped: bool = False
    grad_norm: float | None = None


@dataclass
class _Run:
    cancel: threading.Event = field(default_factory=threading.Event)


STOPPING = "Stopping after the current step…"


class _BadUpload:
    """What the page's image input hands over when Gradio itself could not read the upload."""

    def __init__(self, message: str):
        self.message = message


def _one_sentence(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


class EditSession:
    """The model and the edits running on it, shared by every page of one server.

    `model`: a loaded backend, a local model folder, or None for the built-in model.
    `defaults`: overrides of the page's initial settings (method, steps, guidance, lr, seed,
    size), on top of the model's recommended ones.  `preview_every`: decode a preview every
    N steps (default: about 20 previews per edit).  `max_size`: the largest working long
    side a page may ask for (default: twice the model's native size, at least 1024).
    """

    def __init__(self, model=None, *, defaults: dict | None = None,
                 preview_every: int | None = None, max_size: int | None = None,
                 model_label: str | None = None, out_dir: str | Path | None = None):
        from dds.pipeline import edit_config, get_model

        self.backend = get_model(model)
        self.builtin = model is None
        if model_label is None:
            model_label = "built-in model" if self.builtin else (
                Path(str(getattr(self.backend, "root", model))).name or "model")
        self.model_label = model_label
        native = int(self.backend.native_size)
        self.multiple = int(getattr(self.backend, "vae_scale_factor", 8))
        self.max_size = int(max_size or max(1024, 2 * native))
        self.preview_every = preview_every
        cfg = edit_config(self.backend)
        base = {"method": cfg.method, "steps": cfg.steps, "guidance": cfg.guidance,
                "lr": cfg.lr, "seed": cfg.seed, "size": native}
        base.update({k: v for k, v in (defaults or {}).items() if v is not None})
        self.defaults = base
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dds-ui-"))
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    # ---- checks --------------------------------------------------------------------------
    def config(self, **settings):
        """An `EditConfig` from page settings (numbers may arrive as floats); raises DDSError."""
        from dds.pipeline import edit_config

        s = {k: v for k, v in settings.items() if v is not None}
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
        return edit_config(self.backend, **s)

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
        from dds.pipeline import as_image

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
            method=None, steps=None, guidance=None, lr=None, seed=None, size=None,
            preview_every: int | None = None) -> Iterator[EditUpdate]:
        """Check everything (DDSError, before anything is yielded), then edit and yield
        progress.  Every setting left None takes the session default."""
        from dds.pipeline import check_prompts
        from dds.loop import edit_latents
        from dds.images import pil_to_tensor, prepare, tensor_to_pil

        d = self.defaults
        pick = lambda v, name: d[name] if v is None else v  # noqa: E731
        cfg = self.config(method=pick(method, "method"), steps=pick(steps, "steps"),
                          guidance=pick(guidance, "guidance"), lr=pick(lr, "lr"),
                          seed=pick(seed, "seed"))
        source = (source or "").strip()
        target = (target or "").strip()
        check_prompts(source, target, cfg.method)
        size = self.check_size(pick(size, "size"))
        im = prepare(self.load_input(image), size)  # sides in multiples of 8, as `dds edit`
        every = preview_every or self.preview_every or max(1, cfg.steps // 20)

        backend = self.backend
        run = _Run()
        with self._lock:
            if key in self._runs:
                raise DDSError("an edit is already running in this page; wait for it or cancel it")
            self._runs[key] = run
        return self._iterate(backend, im, source, target, cfg, every, key, run,
                             edit_latents, pil_to_tensor, tensor_to_pil)

    def _iterate(self, backend, im, source, target, cfg, every, key, run,
                 edit_latents, pil_to_tensor, tensor_to_pil) -> Iterator[EditUpdate]:
        events: queue.Queue = queue.Queue()
        t0 = time.monotonic()

        def decode(z) -> Image.Image:
            with torch.no_grad():
                return tensor_to_pil(backend.decode(z))

        def on_step(step, z, norms):
            preview = decode(z) if step % every == 0 and step < cfg.steps else None
            events.put(("step", step, preview, float(norms.mean())))
            return run.cancel.is_set()

        def work():
            try:
                with torch.no_grad():
                    z_hat = backend.encode(pil_to_tensor(im))
                    emb_t = backend.encode_prompt([target])
                    emb_s = backend.encode_prompt([source])
                z = edit_latents(backend, z_hat, emb_s, emb_t, cfg, callback=on_step)
                events.put(("done", decode(z)))
            except BaseException as e:  # handed to the page as one sentence
                events.put(("error", e))

        worker = threading.Thread(target=work, name=f"dds-edit-{key}", daemon=True)
        try:
            worker.start()
            yield EditUpdate(0, cfg.steps, 0.0, im)
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
                    if preview is not None or now - last_yield >= 0.25:
                        last_yield = now
                        yield EditUpdate(step, cfg.steps, now - t0, im, preview=preview,
                                         grad_norm=norm)
                elif ev[0] == "done":
                    stopped = run.cancel.is_set() and step < cfg.steps
                    yield EditUpdate(step, cfg.steps, now - t0, im, preview=ev[1], result=ev[1],
                                     done=True, stopped=stopped, grad_norm=norm)
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
    def save_result(self, result: Image.Image, record: dict) -> Path:
        """The result as a PNG whose `dds` text chunk holds the settings, for download."""
        from dds.images import save_png

        n = next(self._counter)
        path = self.out_dir / f"dds-edit-{n:04d}-{record['method']}.png"
        return save_png(result, path, {"dds": json.dumps({**record, "model": self.model_label})})

    def page_edit(self, image, source, target, method, guidance, steps, lr, seed, size,
                  history: list[dict] | None, key: str = "default") -> Iterator[dict[str, Any]]:
        """The page's edit handler: yields dicts with some of the keys `preview`, `progress`
        (HTML), `result` ((before, after)), `download` (PNG path), `history`, `message`
        (Markdown), `running` (bool).  Never raises for a bad input: `message` says why."""
        history = list(history or [])
        settings = {"method": method, "guidance": guidance, "steps": steps, "lr": lr,
                    "seed": seed, "size": size}
        try:
            updates = self.run(image, source, target, key=key, **settings)
            cfg = self.config(method=method, steps=steps, guidance=guidance, lr=lr, seed=seed)
        except DDSError as e:
            yield {"message": error_markdown(_one_sentence(e)), "error": _one_sentence(e),
                   "running": False}
            return
        record = {"source": (source or "").strip(), "target": (target or "").strip(),
                  "method": cfg.method, "steps": cfg.steps, "guidance": cfg.guidance,
                  "lr": cfg.lr, "seed": cfg.seed, "size": self.check_size(size)}
        yield {"message": "", "running": True, "progress": progress_html(0, cfg.steps, "running")}
        last = None
        try:
            for u in updates:
                last = u
                out: dict[str, Any] = {
                    "progress": progress_html(u.step, u.total, "running", u.elapsed)}
                if u.preview is not None:
                    out["preview"] = u.preview
                if u.done:
                    state = "stopped" if u.stopped else "done"
                    outcome = (f"stopped at step {u.step} of {u.total}" if u.stopped
                               else f"done in {u.elapsed:.1f} s")
                    rec = {**record, "steps_run": u.step, "outcome": outcome}
                    path = self.save_result(u.result, rec)
                    history = (history + [{**rec, "n": len(history) + 1}])[-HISTORY_LIMIT:]
                    out.update(progress=progress_html(u.step, u.total, state, u.elapsed),
                               result=(u.input, u.result), download=str(path), history=history,
                               running=False, message=f"Edit {outcome}.")
                yield out
        except Exception as e:  # a failure inside the model: one sentence, details in the log
            traceback.print_exc(file=sys.stderr)
            msg = f"The edit failed: {_one_sentence(e)}"
            step = last.step if last else 0
            yield {"message": error_markdown(msg), "error": msg, "running": False,
                   "progress": progress_html(step, cfg.steps, "failed")}


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


# --------------------------------------------------------------------------------------------
# The one-pass translation network (optional)
# --------------------------------------------------------------------------------------------


def load_translator(path: str | Path | None):
    """A loaded one-pass translation network (`dds.translate.Translator`), or None."""
    if not path:
        return None
    from dds.translate import Translator as Network

    return Translator(Network(path), Path(path))


@dataclass
class Translator:
    """The page's view of a translation network: its task names and one image in, one out."""

    net: Any
    checkpoint: Path

    @property
    def tasks(self) -> list[str]:
        return list(self.net.tasks)

    def __call__(self, image: Image.Image, task: str, backend=None) -> Image.Image:
        out = self.net([image], task)[0]
        if isinstance(out, torch.Tensor):
            from dds.images import tensor_to_pil

            out = tensor_to_pil(out)
        return out


# --------------------------------------------------------------------------------------------
# The Gradio page
# --------------------------------------------------------------------------------------------


def upload_image(**kwargs):
    """A gr.Image whose preprocessing hands over the uploaded file's path without decoding it
    (so `load_image` does every check), or a `_BadUpload` with one sentence.  The stock
    component with its `preprocess` replaced on the instance (a subclass would make Gradio
    write a type-stub file next to this module)."""
    import gradio as gr

    comp = gr.Image(type="filepath", image_mode=None, **kwargs)
    stock = comp.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        path = getattr(payload, "path", None)
        if path and not url.startswith("data:"):
            return str(path)
        try:
            return stock(payload)
        except Exception:
            return _BadUpload("the pasted image could not be read; paste or upload a PNG or "
                              "JPEG image")

    comp.preprocess = preprocess
    return comp


def build_app(model=None, *, session: EditSession | None = None,
              translator: str | Path | None = None, examples: list[Example] | None = None,
              concurrency: int = 1, defaults: dict | None = None,
              preview_every: int | None = None, title: str = "DDS image editing"):
    """The page as a `gr.Blocks` with its queue configured; start it with `launch`.

    `model`: a backend, a local model folder or None (built-in); ignored when `session` is
    given.  `translator`: a checkpoint folder of the one-pass translation network (a tab is
    shown only if `dds.translate` provides `translate`).  `concurrency`: edits run at once.
    """
    import gradio as gr

    if concurrency < 1:
        raise DDSError(f"concurrency {concurrency} is invalid: it must be a whole number >= 1")
    session = session or EditSession(model, defaults=defaults, preview_every=preview_every)
    d = session.defaults
    if examples is None:
        examples = bundled_examples(builtin=session.builtin)
    trans = load_translator(translator)
    first = examples[0] if examples else None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        history = gr.State([])
        gr.Markdown(f"## {title}\nDelta Denoising Score edits an image towards a target "
                    f"prompt. Model: **{session.model_label}** (native size "
                    f"{session.backend.native_size} px).")
        with gr.Tabs():
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column(scale=1):
                        image = upload_image(
                            label="Input image", sources=["upload", "clipboard"], format="png",
                            value=first.image if first else None, elem_id="dds-input",
                            height=320)
                        source = gr.Textbox(label="Source prompt (caption of the input)",
                                            value=first.source if first else "",
                                            elem_id="dds-source")
                        target = gr.Textbox(label="Target prompt (the edited image)",
                                            value=first.targets[0] if first and first.targets
                                            else "", elem_id="dds-target")
                        suggestions = gr.Radio(
                            label="Target suggestions",
                            choices=list(first.targets) if first else [],
                            visible=bool(first and first.targets), elem_id="dds-suggestions")
                        with gr.Accordion("Advanced", open=False, elem_id="dds-advanced"):
                            method = gr.Radio(["dds", "sds"], value=d["method"], label="Method",
                                              info="DDS keeps what the prompts share; SDS "
                                              "only follows the target")
                            guidance = gr.Number(value=d["guidance"], label="Guidance",
                                                 minimum=0, elem_id="dds-guidance")
                            steps = gr.Number(value=d["steps"], label="Steps", precision=0,
                                              minimum=0, elem_id="dds-steps")
                            lr = gr.Number(value=d["lr"], label="Learning rate", minimum=0,
                                           elem_id="dds-lr")
                            seed = gr.Number(value=d["seed"], label="Seed", precision=0,
                                             elem_id="dds-seed")
                            size = gr.Number(value=d["size"], label="Image size (long side, px)",
                                             precision=0, minimum=8, maximum=session.max_size,
                                             elem_id="dds-size")
                        with gr.Row():
                            run_btn = gr.Button("Edit", variant="primary", elem_id="dds-run")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="dds-cancel")
                        message = gr.Markdown("", elem_id="dds-message")
                    with gr.Column(scale=1):
                        progress = gr.HTML(progress_html(0, int(d["steps"]), "idle"),
                                           elem_id="dds-progress-box")
                        preview = gr.Image(label="Live preview", interactive=False,
                                           format="png", elem_id="dds-preview", height=320)
                        result = gr.ImageSlider(label="Before / after", interactive=False,
                                                type="pil", format="png", elem_id="dds-result",
                                                height=320)
                        download = gr.DownloadButton("Download PNG", value=None,
                                                     elem_id="dds-download")
                if examples:
                    gallery = gr.Gallery(
                        value=[(e.image, e.name) for e in examples], label="Examples",
                        columns=8, height=160, allow_preview=False, elem_id="dds-examples")
                table = gr.Dataframe(headers=HISTORY_COLUMNS, value=[], interactive=False,
                                     label="History (click a row to restore its settings)",
                                     elem_id="dds-history", wrap=True)

            if trans is not None:
                with gr.Tab("One-pass translation", id="translate"):
                    gr.Markdown(f"A trained translation network (`{trans.checkpoint.name}`) "
                                "edits in one forward pass.")
                    with gr.Row():
                        t_image = upload_image(label="Input image",
                                               sources=["upload", "clipboard"], format="png",
                                               height=320, elem_id="dds-t-input")
                        t_out = gr.Image(label="Translated", interactive=False, format="png",
                                         height=320, elem_id="dds-t-output")
                    if trans.tasks:
                        t_task = gr.Dropdown(trans.tasks, value=trans.tasks[0], label="Task",
                                             elem_id="dds-t-task")
                    else:
                        t_task = gr.Textbox(label="Task", elem_id="dds-t-task")
                    t_btn = gr.Button("Translate", variant="primary", elem_id="dds-t-run")
                    t_msg = gr.Markdown("", elem_id="dds-t-message")

                    def on_translate(img, task):
                        try:
                            im = session.load_input(img)
                            if not (task or "").strip():
                                raise DDSError("no task chosen: pick or type one")
                            return trans(im, task.strip(), session.backend), ""
                        except DDSError as e:
                            gr.Warning(_one_sentence(e))
                            return None, error_markdown(_one_sentence(e))
                        except Exception as e:
                            traceback.print_exc(file=sys.stderr)
                            msg = f"The translation failed: {_one_sentence(e)}"
                            return None, error_markdown(msg)

                    t_btn.click(on_translate, [t_image, t_task], [t_out, t_msg],
                                api_name="translate")

        # ---- events ----------------------------------------------------------------------
        outputs = {"preview": preview, "progress": progress, "result": result,
                   "download": download, "message": message}

        def page_key(request) -> str:
            """The page a request comes from: one edit at a time per page."""
            return getattr(request, "session_hash", None) or "default"

        def on_edit(img, src, tgt, meth, g, n, rate, sd, sz, hist, request: gr.Request):
            key = page_key(request)
            for out in session.page_edit(img, src, tgt, meth, g, n, rate, sd, sz, hist, key=key):
                if "error" in out:
                    gr.Warning(out["error"])
                upd = {outputs[k]: v for k, v in out.items() if k in outputs}
                if "history" in out:
                    upd[history] = out["history"]
                    upd[table] = history_rows(out["history"])
                if "running" in out:
                    upd[run_btn] = gr.Button(interactive=not out["running"])
                yield upd

        _hint(on_edit, request=gr.Request)
        run_btn.click(on_edit, [image, source, target, method, guidance, steps, lr, seed, size,
                                history],
                      [preview, progress, result, download, message, history, table, run_btn],
                      api_name="edit", show_progress="hidden")

        # Cancel answers first and only then stops the edit (a chained event): had it stopped the
        # edit and then answered, its "stopping" could reach the page after the edit's final
        # message and stay there.
        # (API clients call "cancel", which stops the edit.)
        def on_cancel_note(request: gr.Request):
            return STOPPING if session.running(page_key(request)) else "No edit is running."

        def on_cancel(request: gr.Request):
            session.cancel(page_key(request))

        _hint(on_cancel_note, request=gr.Request)
        _hint(on_cancel, request=gr.Request)
        # Outside the edit queue's limit, so Cancel answers while an edit holds the model.
        cancel_btn.click(on_cancel_note, None, [message], api_name=False,
                         concurrency_limit=None, concurrency_id="cancel",
                         show_progress="hidden").then(
            on_cancel, None, None, api_name="cancel", concurrency_limit=None,
            concurrency_id="cancel", show_progress="hidden")

        if examples:
            def on_example(evt: gr.SelectData):
                e = examples[evt.index]
                return (e.image, e.source, e.targets[0] if e.targets else "",
                        gr.Radio(choices=list(e.targets), value=None, visible=bool(e.targets)))

            _hint(on_example, evt=gr.SelectData)
            gallery.select(on_example, None, [image, source, target, suggestions],
                           show_progress="hidden", concurrency_limit=None,
                           concurrency_id="ui")

        suggestions.input(lambda v: v or gr.skip(), [suggestions], [target],
                          show_progress="hidden", concurrency_limit=None, concurrency_id="ui")

        def on_history(hist, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            if not hist or row is None or not 0 <= row < len(hist):
                return [gr.skip()] * 8
            h = hist[row]
            return (h["source"], h["target"], h["method"], h["guidance"], h["steps"], h["lr"],
                    h["seed"], h["size"])

        _hint(on_history, evt=gr.SelectData)
        table.select(on_history, [history], [source, target, method, guidance, steps, lr, seed,
                                              size],
                     show_progress="hidden", concurrency_limit=None, concurrency_id="ui")

    demo.queue(default_concurrency_limit=int(concurrency))
    demo.dds_session = session  # for tests and embedding
    return demo


def _hint(fn, **types) -> None:
    """Give Gradio the real classes of its special arguments (this module's annotations are
    strings, which Gradio cannot resolve for functions defined inside `build_app`)."""
    fn.__annotations__.update(types)


def theme():
    """The default theme with local fonts only (the page works with no internet access)."""
    import gradio as gr

    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=sans, font_mono=mono)


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, quiet: bool = False):
    """Start the server; with `block=False` return at once (the server runs in a thread)."""
    try:
        return demo.launch(server_name=host, server_port=port, share=share,
                           max_file_size=MAX_UPLOAD, prevent_thread_lock=not block,
                           show_error=False, quiet=quiet, theme=theme(), ssr_mode=False,
                           footer_links=[], inbrowser=False)
    except OSError as e:
        raise DDSError(f"cannot listen on {host}:{port} ({_one_sentence(e).rstrip('.')}); "
                       "choose another --port") from None


__all__ = [
    "EditSession", "EditUpdate", "Example", "build_app", "bundled_examples", "launch",
    "load_translator", "photo_examples", "progress_html", "world_examples",
]
