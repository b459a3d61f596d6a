"""The web app behind `dds ui`: DDS/SDS editing in the browser with a live preview.

The editing itself is `dds.ui.session.EditSession` (plain Python, no Gradio), which runs every
edit through `dds.pipeline.EditPipeline`; this module only lays the page out in Gradio
components and wires its events to the session.  Edits go through Gradio's queue with a
concurrency limit (default 1: every edit shares one model); Cancel runs outside that limit.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

from dds.errors import DDSError
from dds.ui.examples import Example, bundled_examples, photo_examples, world_examples
from dds.ui.session import (
    HISTORY_COLUMNS,
    STOPPING,
    EditSession,
    EditUpdate,
    _BadUpload,
    _one_sentence,
    error_markdown,
    history_rows,
    progress_html,
)
from dds.ui.translator import Translator, load_translator

MAX_UPLOAD = "25mb"  # upload size cap (Gradio's max_file_size)


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

    `model`: a model, a local model folder or None (built-in); ignored when `session` is
    given.  `translator`: a checkpoint folder of the one-pass translation network (adds a
    tab).  `concurrency`: edits run at once.
    """
    import gradio as gr

    if concurrency < 1:
        raise DDSError(f"concurrency {concurrency} is invalid: it must be a whole number >= 1")
    session = session or EditSession(model, defaults=defaults, preview_every=preview_every)
    if examples is None:
        examples = bundled_examples(builtin=session.builtin)
    trans = load_translator(translator)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        history = gr.State([])
        gr.Markdown(f"## {title}\nDelta Denoising Score edits an image towards a target "
                    f"prompt. Model: **{session.model_label}** (native size "
                    f"{session.model.native_size} px).")
        with gr.Tabs():
            with gr.Tab("Edit", id="edit"):
                ui = _edit_layout(session, examples)
            if trans is not None:
                with gr.Tab("One-pass translation", id="translate"):
                    _translation_tab(session, trans)
        _wire_edit(session, ui, history)
        _wire_cancel(session, ui)
        _wire_choices(ui, history, examples)

    demo.queue(default_concurrency_limit=int(concurrency))
    demo.dds_session = session  # for tests and embedding
    return demo


# ---- layout ---------------------------------------------------------------------------------


def _edit_layout(session: EditSession, examples: list[Example]) -> SimpleNamespace:
    """The Edit tab's components: inputs and settings left, progress and results right,
    examples and history below."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            ui = _input_column(session, examples[0] if examples else None)
        with gr.Column(scale=1):
            ui.progress = gr.HTML(progress_html(0, int(session.defaults["steps"]), "idle"),
                                  elem_id="dds-progress-box")
            ui.preview = gr.Image(label="Live preview", interactive=False, format="png",
                                  elem_id="dds-preview", height=320)
            ui.result = gr.ImageSlider(label="Before / after", interactive=False, type="pil",
                                       format="png", elem_id="dds-result", height=320)
            ui.download = gr.DownloadButton("Download PNG", value=None, elem_id="dds-download")
    ui.gallery = None
    if examples:
        ui.gallery = gr.Gallery(value=[(e.image, e.name) for e in examples], label="Examples",
                                columns=8, height=160, allow_preview=False,
                                elem_id="dds-examples")
    ui.table = gr.Dataframe(headers=HISTORY_COLUMNS, value=[], interactive=False,
                            label="History (click a row to restore its settings)",
                            elem_id="dds-history", wrap=True)
    return ui


def _input_column(session: EditSession, first: Example | None) -> SimpleNamespace:
    """The image, the prompts, the settings (in an accordion) and the buttons."""
    import gradio as gr

    ui = SimpleNamespace()
    ui.image = upload_image(label="Input image", sources=["upload", "clipboard"], format="png",
                            value=first.image if first else None, elem_id="dds-input",
                            height=320)
    ui.source = gr.Textbox(label="Source prompt (caption of the input)",
                           value=first.source if first else "", elem_id="dds-source")
    ui.target = gr.Textbox(label="Target prompt (the edited image)",
                           value=first.targets[0] if first and first.targets else "",
                           elem_id="dds-target")
    ui.suggestions = gr.Radio(label="Target suggestions",
                              choices=list(first.targets) if first else [],
                              visible=bool(first and first.targets), elem_id="dds-suggestions")
    d = session.defaults
    with gr.Accordion("Advanced", open=False, elem_id="dds-advanced"):
        ui.method = gr.Radio(["dds", "sds"], value=d["method"], label="Method",
                             info="DDS keeps what the prompts share; SDS only follows the target")
        ui.guidance = gr.Number(value=d["guidance"], label="Guidance", minimum=0,
                                elem_id="dds-guidance")
        ui.steps = gr.Number(value=d["steps"], label="Steps", precision=0, minimum=0,
                             elem_id="dds-steps")
        ui.lr = gr.Number(value=d["lr"], label="Learning rate", minimum=0, elem_id="dds-lr")
        ui.seed = gr.Number(value=d["seed"], label="Seed", precision=0, elem_id="dds-seed")
        ui.size = gr.Number(value=d["size"], label="Image size (long side, px)", precision=0,
                            minimum=8, maximum=session.max_size, elem_id="dds-size")
    with gr.Row():
        ui.run_btn = gr.Button("Edit", variant="primary", elem_id="dds-run")
        ui.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="dds-cancel")
    ui.message = gr.Markdown("", elem_id="dds-message")
    return ui


def _translation_tab(session: EditSession, trans: Translator) -> None:
    """A tab that runs the one-pass translation network on an uploaded image."""
    import gradio as gr

    gr.Markdown(f"A trained translation network (`{trans.checkpoint.name}`) edits in one "
                "forward pass.")
    with gr.Row():
        t_image = upload_image(label="Input image", sources=["upload", "clipboard"],
                               format="png", height=320, elem_id="dds-t-input")
        t_out = gr.Image(label="Translated", interactive=False, format="png", height=320,
                         elem_id="dds-t-output")
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
            return trans(im, task.strip()), ""
        except DDSError as e:
            gr.Warning(_one_sentence(e))
            return None, error_markdown(_one_sentence(e))
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            return None, error_markdown(f"The translation failed: {_one_sentence(e)}")

    t_btn.click(on_translate, [t_image, t_task], [t_out, t_msg], api_name="translate")


# ---- events ---------------------------------------------------------------------------------


def _page_key(request) -> str:
    """The page a request comes from: one edit at a time per page."""
    return getattr(request, "session_hash", None) or "default"


def _wire_edit(session: EditSession, ui: SimpleNamespace, history) -> None:
    """Edit: the session's `page_edit`, its plain values mapped onto the components."""
    import gradio as gr

    outputs = {"preview": ui.preview, "progress": ui.progress, "result": ui.result,
               "download": ui.download, "message": ui.message}

    def on_edit(img, src, tgt, meth, g, n, rate, sd, sz, hist, request: gr.Request):
        key = _page_key(request)
        for out in session.page_edit(img, src, tgt, meth, g, n, rate, sd, sz, hist, key=key):
            if "error" in out:
                gr.Warning(out["error"])
            upd = {outputs[k]: v for k, v in out.items() if k in outputs}
            if "history" in out:
                upd[history] = out["history"]
                upd[ui.table] = history_rows(out["history"])
            if "running" in out:
                upd[ui.run_btn] = gr.Button(interactive=not out["running"])
            yield upd

    _hint(on_edit, request=gr.Request)
    ui.run_btn.click(
        on_edit, [ui.image, ui.source, ui.target, ui.method, ui.guidance, ui.steps, ui.lr,
                  ui.seed, ui.size, history],
        [ui.preview, ui.progress, ui.result, ui.download, ui.message, history, ui.table,
         ui.run_btn],
        api_name="edit", show_progress="hidden")


def _wire_cancel(session: EditSession, ui: SimpleNamespace) -> None:
    """Cancel answers first and only then stops the edit (a chained event): had it stopped the
    edit and then answered, its "stopping" could reach the page after the edit's final message
    and stay there.  API clients call "cancel", which stops the edit.  Both run outside the edit
    queue's limit, so Cancel answers while an edit holds the model."""
    import gradio as gr

    def on_cancel_note(request: gr.Request):
        return STOPPING if session.running(_page_key(request)) else "No edit is running."

    def on_cancel(request: gr.Request):
        session.cancel(_page_key(request))

    _hint(on_cancel_note, request=gr.Request)
    _hint(on_cancel, request=gr.Request)
    ui.cancel_btn.click(on_cancel_note, None, [ui.message], api_name=False,
                        concurrency_limit=None, concurrency_id="cancel",
                        show_progress="hidden").then(
        on_cancel, None, None, api_name="cancel", concurrency_limit=None,
        concurrency_id="cancel", show_progress="hidden")


def _wire_choices(ui: SimpleNamespace, history, examples: list[Example]) -> None:
    """Picking an example, a target suggestion or a history row fills the inputs."""
    import gradio as gr

    fast = dict(show_progress="hidden", concurrency_limit=None, concurrency_id="ui")
    if ui.gallery is not None:
        def on_example(evt: gr.SelectData):
            e = examples[evt.index]
            return (e.image, e.source, e.targets[0] if e.targets else "",
                    gr.Radio(choices=list(e.targets), value=None, visible=bool(e.targets)))

        _hint(on_example, evt=gr.SelectData)
        ui.gallery.select(on_example, None, [ui.image, ui.source, ui.target, ui.suggestions],
                          **fast)

    ui.suggestions.input(lambda v: v or gr.skip(), [ui.suggestions], [ui.target], **fast)
    restored = [ui.source, ui.target, ui.method, ui.guidance, ui.steps, ui.lr, ui.seed, ui.size]

    def on_history(hist, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not hist or row is None or not 0 <= row < len(hist):
            return [gr.skip()] * len(restored)
        h = hist[row]
        return (h["source"], h["target"], h["method"], h["guidance"], h["steps"], h["lr"],
                h["seed"], h["size"])

    _hint(on_history, evt=gr.SelectData)
    ui.table.select(on_history, [history], restored, **fast)


def _hint(fn, **types) -> None:
    """Give Gradio the real classes of its special arguments (this module's annotations are
    strings, which Gradio cannot resolve for functions defined inside other functions)."""
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
    "MAX_UPLOAD", "EditSession", "EditUpdate", "Example", "Translator", "build_app",
    "bundled_examples", "launch", "load_translator", "photo_examples", "progress_html",
    "upload_image", "world_examples",
]
