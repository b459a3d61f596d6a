"""The web app behind `dds ui`: DDS/SDS editing in the browser with a live preview.

The editing itself is `dds.ui.session.EditSession` (plain Python, no Gradio), which runs every
edit through `dds.pipeline.EditPipeline` and queues edits itself (a fixed number of slots on
the shared model, so that a waiting edit can show its place and be cancelled); this module only
lays the page out in Gradio components and wires its events to the session.  Every number the
page sends is handed to the session as it came (Gradio's own range checks are off), so a bad
value gets the session's sentence naming the field as the page labels it.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

from dds.errors import DDSError
from dds.loop import LIMITS
from dds.methods import METHODS, STEP_RULES, TIMESTEP_SCHEDULES, get_method
from dds.ui.examples import Example, bundled_examples, photo_examples, world_examples
from dds.ui.messages import (
    LABELS,
    NO_EDIT,
    STOPPING,
    error_markdown,
    one_sentence,
    page_sentence,
    progress_html,
)
from dds.ui.session import (
    HISTORY_COLUMNS,
    EditSession,
    EditUpdate,
    _BadUpload,
    history_gallery,
    history_rows,
    random_seed,
)
from dds.ui.translator import Translator, load_translator

MAX_UPLOAD = "25mb"  # upload size cap (Gradio's max_file_size)
CANCELLING_QUEUED = "Cancelling the edit waiting in the queue…"
KNOWS_BUILTIN = ("It knows only the procedural shapes world: coloured shapes on textured "
                 "backgrounds (the scene examples). Photos give meaningless blurs with it.")
KNOWS_OTHER = "It knows photos and most kinds of pictures."
# Whole images, never cropped; small ones upscaled with hard pixel edges.
CSS = """
#dds-input img, #dds-preview img, #dds-result img, #dds-examples img, #dds-thumbs img,
#dds-t-input img, #dds-t-output img {
  object-fit: contain !important; image-rendering: pixelated;
}
#dds-preview img, #dds-result img { width: 100% !important; height: 100% !important; }
#dds-examples, #dds-thumbs, #dds-examples .gallery-container,
#dds-thumbs .gallery-container, #dds-examples .grid-wrap, #dds-thumbs .grid-wrap {
  height: auto !important; min-height: 0 !important; max-height: 360px; }
#dds-examples .grid-container, #dds-thumbs .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)) !important; }
#dds-examples .gallery-item, #dds-thumbs .gallery-item { width: auto !important;
  height: auto !important; aspect-ratio: 1 / 1; min-width: 0; }
#dds-examples .thumbnail-item, #dds-thumbs .thumbnail-item { width: 100% !important;
  height: 100% !important; }
#dds-history td, #dds-history th { white-space: nowrap !important; }
#dds-history td span, #dds-history td div { white-space: nowrap !important;
  overflow: hidden; text-overflow: ellipsis; max-width: 24em; display: block; }
"""


def model_info(session: EditSession) -> str:
    """The header's line about the loaded model: name, family, hash, size and what it knows."""
    ident = session.model.identity()
    short = str(ident.get("hash", ""))[:12]
    name = session.model_label
    family = ident.get("family", "")
    knows = KNOWS_BUILTIN if session.builtin else KNOWS_OTHER
    return (f"Model: **{name}** ({family}, hash `{short}`), native size "
            f"{session.model.native_size} px. {knows}")


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


def raw_number(comp):
    """A number component that hands its value over as it came (NaN, text, out of range):
    the session refuses a bad one with a sentence naming the field, where Gradio's own check
    would raise an error the page cannot show."""
    comp.preprocess = lambda payload: payload
    return comp


def build_app(model=None, *, session: EditSession | None = None,
              translator: str | Path | None = None, examples: list[Example] | None = None,
              concurrency: int = 1, defaults: dict | None = None,
              preview_every: int | None = None, title: str = "DDS image editing"):
    """The page as a `gr.Blocks` with its queue configured; start it with `launch`.

    `model`: a model, a local model folder or None (built-in); ignored when `session` is
    given.  `translator`: a checkpoint folder of the one-pass translation network (adds a
    tab).  `concurrency`: edits run at once; the others wait in the session's queue.
    """
    import gradio as gr

    if concurrency < 1:
        raise DDSError(f"concurrency {concurrency} is invalid: it must be a whole number >= 1")
    session = session or EditSession(model, defaults=defaults, preview_every=preview_every)
    session.set_concurrency(concurrency)
    if examples is None:
        examples = bundled_examples(builtin=session.builtin)
    trans = load_translator(translator)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        history, chosen = gr.State([]), gr.State(None)
        gr.Markdown(f"## {title}\nDelta Denoising Score edits an image towards a target "
                    "prompt.", elem_id="dds-header")
        gr.Markdown(model_info(session), elem_id="dds-model")
        with gr.Tabs():
            with gr.Tab("Edit", id="edit"):
                ui = _edit_layout(session, examples)
            if trans is not None:
                with gr.Tab("One-pass translation", id="translate"):
                    _translation_tab(session, trans)
        ui.history, ui.chosen = history, chosen
        _wire_edit(session, ui)
        _wire_cancel(session, ui)
        _wire_choices(ui, examples)
        _wire_method(session, ui)
        _wire_history(ui)

    demo.queue(default_concurrency_limit=int(concurrency))
    demo.dds_session = session  # for tests and embedding
    return demo


# ---- layout ---------------------------------------------------------------------------------


def _edit_layout(session: EditSession, examples: list[Example]) -> SimpleNamespace:
    """The Edit tab's components: input, examples, prompts, settings and buttons left;
    progress, preview, before/after and download right; the history below."""
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1):
            ui = _input_column(session, examples)
        with gr.Column(scale=1):
            ui.progress = gr.HTML(progress_html(0, int(session.defaults["steps"]), "idle"),
                                  elem_id="dds-progress-box")
            ui.preview = gr.Image(label="Live preview", interactive=False, format="png",
                                  elem_id="dds-preview", height=320)
            ui.result = gr.ImageSlider(label="Before / after", interactive=False, type="pil",
                                       format="png", elem_id="dds-result", height=320)
            with gr.Row():
                ui.download = gr.DownloadButton("Download PNG", value=None, interactive=False,
                                                elem_id="dds-download")
                ui.use_btn = gr.Button("Use result as input", interactive=False,
                                       elem_id="dds-use-result")
    ui.thumbs = gr.Gallery(value=[], label="History (click a result to restore its input, "
                           "prompts and settings; Download PNG then saves it)", columns=10,
                           height="auto", allow_preview=False, object_fit="contain",
                           elem_id="dds-thumbs")
    ui.table = gr.Dataframe(headers=HISTORY_COLUMNS, value=[], interactive=False,
                            label="History (click a row to restore it)",
                            elem_id="dds-history", wrap=False, max_height=400)
    return ui


def _input_column(session: EditSession, examples: list[Example]) -> SimpleNamespace:
    """The image and the examples, the prompts, the settings (in an accordion), the buttons
    and the status line."""
    import gradio as gr

    first = examples[0] if examples else None
    ui = SimpleNamespace(gallery=None)
    ui.image = upload_image(label="Input image", sources=["upload", "clipboard"], format="png",
                            value=first.image if first else None, elem_id="dds-input",
                            height=320)
    if examples:
        ui.gallery = gr.Gallery(value=[(e.image, e.name) for e in examples], label="Examples",
                                columns=4, height="auto", allow_preview=False,
                                object_fit="contain", elem_id="dds-examples")
    ui.source = gr.Textbox(label="Source prompt (caption of the input)",
                           value=first.source if first else "", elem_id="dds-source")
    ui.target = gr.Textbox(label="Target prompt (the edited image)",
                           value=first.targets[0] if first and first.targets else "",
                           elem_id="dds-target")
    ui.suggestions = gr.Radio(label="Target suggestions",
                              choices=list(first.targets) if first else [],
                              visible=bool(first and first.targets), elem_id="dds-suggestions")
    with gr.Accordion("Advanced", open=False, elem_id="dds-advanced"):
        _settings(session, ui)
    with gr.Row():
        ui.run_btn = gr.Button("Edit", variant="primary", elem_id="dds-run")
        ui.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="dds-cancel")
    ui.message = gr.Markdown("", elem_id="dds-message")
    return ui


def _settings(session: EditSession, ui: SimpleNamespace) -> None:
    """Method and numbers, each bounded by the library's range (`dds.loop.LIMITS`, the
    model's `max_size`)."""
    import gradio as gr

    d, lim = session.defaults, LIMITS
    ui.method = gr.Radio(list(METHODS), value=d["method"], label=LABELS["method"],
                         info="DDS keeps what the prompts share; SDS only follows the target; "
                         "FlowEdit follows the model's flow from the source (its own steps "
                         "and guidance)")
    ui.guidance = raw_number(gr.Slider(*lim["guidance"], value=d["guidance"], step=0.1,
                                       label=LABELS["guidance"], elem_id="dds-guidance"))
    ui.steps = raw_number(gr.Slider(*lim["steps"], value=d["steps"], step=1,
                                    label=LABELS["steps"], elem_id="dds-steps"))
    ui.lr = raw_number(gr.Number(value=d["lr"], label=LABELS["lr"], minimum=lim["lr"][0],
                                 maximum=lim["lr"][1], elem_id="dds-lr",
                                 info=f"from {lim['lr'][0]:g} to {lim['lr'][1]:g}"))
    with gr.Row():
        ui.seed = raw_number(gr.Number(value=d["seed"], label=LABELS["seed"], precision=0,
                                       minimum=lim["seed"][0], maximum=lim["seed"][1],
                                       elem_id="dds-seed", scale=4,
                                       info=f"from 0 to {lim['seed'][1]}"))
        ui.dice = gr.Button("Random seed", elem_id="dds-seed-random", scale=1)
    ui.size = raw_number(gr.Slider(8, session.max_size, value=d["size"], step=8,
                                   label=LABELS["size"], elem_id="dds-size",
                                   info="long side of the working image, in pixels"))
    _schedule_controls(d, ui)


def _schedule_controls(d: dict, ui: SimpleNamespace) -> None:
    """How DDS/SDS draw their noise levels and step (`EditConfig.schedule`, `step_rule`,
    `average_tail`); FlowEdit has its own schedule, so they are inactive for it."""
    import gradio as gr

    active = get_method(d["method"]).gradient
    with gr.Row():
        ui.schedule = gr.Dropdown(list(TIMESTEP_SCHEDULES), value=d["schedule"],
                                  label=LABELS["schedule"], elem_id="dds-schedule",
                                  interactive=active, info="reference: t uniform every step "
                                  "(the paper); stratified, descending: one stratum per step")
        ui.step_rule = gr.Dropdown(list(STEP_RULES), value=d["step_rule"],
                                   label=LABELS["step_rule"], elem_id="dds-step-rule",
                                   interactive=active, info="budget: lr x 200 / steps, as far "
                                   "as the reference's 200 steps go")
    ui.average_tail = raw_number(gr.Slider(*LIMITS["average_tail"], value=d["average_tail"],
                                           step=0.05, label=LABELS["average_tail"],
                                           elem_id="dds-average-tail", interactive=active,
                                           info="the result is the mean of the latents after "
                                           "this fraction of the steps from the end (0: the "
                                           "last latent)"))


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
            return None, error_markdown(page_sentence(e)).replace("Cannot edit:",
                                                                  "Cannot translate:")
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            return None, f"**Translation failed:** {one_sentence(e)}"

    t_btn.click(on_translate, [t_image, t_task], [t_out, t_msg], api_name="translate")


# ---- events ---------------------------------------------------------------------------------


def _page_key(request) -> str:
    """The page a request comes from: one edit at a time per page."""
    return getattr(request, "session_hash", None) or "default"


def _wire_edit(session: EditSession, ui: SimpleNamespace) -> None:
    """Edit: the session's `page_edit`, its plain values mapped onto the components.  The
    event runs outside Gradio's queue limit: the session queues edits itself."""
    import gradio as gr

    outputs = {"preview": ui.preview, "progress": ui.progress, "result": ui.result,
               "message": ui.message}

    def on_edit(img, src, tgt, meth, g, n, rate, sd, sz, sch, rule, tail, hist,
                request: gr.Request):
        key = _page_key(request)
        for out in session.page_edit(img, src, tgt, meth, g, n, rate, sd, sz, hist, key=key,
                                     schedule=sch, step_rule=rule, average_tail=tail):
            upd = {outputs[k]: v for k, v in out.items() if k in outputs}
            if "download" in out:
                ready = out["download"] is not None
                upd[ui.download] = gr.DownloadButton(value=out["download"], interactive=ready)
                upd[ui.use_btn] = gr.Button(interactive=ready)
            if "history" in out:
                upd[ui.history] = out["history"]
                upd[ui.table] = history_rows(out["history"])
                upd[ui.thumbs] = history_gallery(out["history"])
                upd[ui.chosen] = out["history"][-1]
            if "running" in out:
                upd[ui.run_btn] = gr.Button(interactive=not out["running"])
            yield upd

    _hint(on_edit, request=gr.Request)
    ui.run_btn.click(
        on_edit, [ui.image, ui.source, ui.target, ui.method, ui.guidance, ui.steps, ui.lr,
                  ui.seed, ui.size, ui.schedule, ui.step_rule, ui.average_tail, ui.history],
        [ui.preview, ui.progress, ui.result, ui.download, ui.message, ui.use_btn, ui.history,
         ui.table, ui.thumbs, ui.chosen, ui.run_btn],
        api_name="edit", show_progress="hidden", concurrency_limit=None,
        concurrency_id="edit")


def _wire_cancel(session: EditSession, ui: SimpleNamespace) -> None:
    """Cancel answers first and only then stops the edit (a chained event): had it stopped the
    edit and then answered, its note could reach the page after the edit's final message and
    stay there.  A queued edit leaves the queue without running a step; a running one stops
    after its current step.  API clients call "cancel".  Both run outside any queue limit."""
    import gradio as gr

    def on_cancel_note(request: gr.Request):
        state = session.state(_page_key(request))
        return {"running": STOPPING, "queued": CANCELLING_QUEUED}.get(state, NO_EDIT)

    def on_cancel(request: gr.Request):
        session.cancel(_page_key(request))

    _hint(on_cancel_note, request=gr.Request)
    _hint(on_cancel, request=gr.Request)
    ui.cancel_btn.click(on_cancel_note, None, [ui.message], api_name=False,
                        concurrency_limit=None, concurrency_id="cancel",
                        show_progress="hidden").then(
        on_cancel, None, None, api_name="cancel", concurrency_limit=None,
        concurrency_id="cancel", show_progress="hidden")


def _wire_method(session: EditSession, ui: SimpleNamespace) -> None:
    """Choosing a method (by hand: not restoring a history row) sets the settings to that
    method's defaults on this model; choosing a schedule sets the steps, step size and tail
    to that schedule's (the model's recommended set for its own schedule, the reference
    recipe's for another)."""
    import gradio as gr

    fast = dict(show_progress="hidden", concurrency_limit=None, concurrency_id="ui",
                api_name=False)

    def on_method(method):
        d, active = session.method_defaults(method), get_method(method).gradient
        return (gr.Slider(value=d["guidance"]), gr.Slider(value=d["steps"]),
                gr.Number(value=d["lr"]), gr.Dropdown(value=d["schedule"], interactive=active),
                gr.Dropdown(value=d["step_rule"], interactive=active),
                gr.Slider(value=d["average_tail"], interactive=active))

    def on_schedule(method, schedule):
        d = session.method_defaults(method, schedule)
        return (gr.Slider(value=d["steps"]), gr.Number(value=d["lr"]),
                gr.Dropdown(value=d["step_rule"]), gr.Slider(value=d["average_tail"]))

    ui.method.input(on_method, [ui.method], [ui.guidance, ui.steps, ui.lr, ui.schedule,
                                             ui.step_rule, ui.average_tail], **fast)
    ui.schedule.input(on_schedule, [ui.method, ui.schedule],
                      [ui.steps, ui.lr, ui.step_rule, ui.average_tail], **fast)


def _wire_choices(ui: SimpleNamespace, examples: list[Example]) -> None:
    """Picking an example or a target suggestion fills the inputs; an upload drops the
    previous scene's suggestions; the dice draws a seed.  Each action clears the status."""
    import gradio as gr

    fast = dict(show_progress="hidden", concurrency_limit=None, concurrency_id="ui")
    no_suggestions = lambda: gr.Radio(choices=[], value=None, visible=False)  # noqa: E731
    if ui.gallery is not None:
        def on_example(evt: gr.SelectData):
            e = examples[evt.index]
            return (e.image, e.source, e.targets[0] if e.targets else "",
                    gr.Radio(choices=list(e.targets), value=None, visible=bool(e.targets)), "")

        _hint(on_example, evt=gr.SelectData)
        ui.gallery.select(on_example, None,
                          [ui.image, ui.source, ui.target, ui.suggestions, ui.message], **fast)

    ui.image.upload(lambda: (no_suggestions(), ""), None, [ui.suggestions, ui.message],
                    api_name=False, **fast)
    ui.suggestions.input(lambda v: v or gr.skip(), [ui.suggestions], [ui.target],
                         api_name=False, **fast)
    ui.dice.click(lambda: (random_seed(), ""), None, [ui.seed, ui.message],
                  api_name="random_seed", **fast)

    def on_use(chosen):
        if not chosen:
            return gr.skip(), gr.skip(), gr.skip(), NO_RESULT
        return (chosen["result"], chosen["target"], no_suggestions(),
                f"The result of edit #{chosen['n']} is the input now, and its target prompt "
                "the source prompt.")

    ui.use_btn.click(on_use, [ui.chosen], [ui.image, ui.source, ui.suggestions, ui.message],
                     api_name=False, **fast)


NO_RESULT = "There is no result yet: run an edit first."


def _wire_history(ui: SimpleNamespace) -> None:
    """Clicking a history row or thumbnail restores that edit: its input image, prompts and
    settings, and points Download PNG and "Use result as input" at its result."""
    import gradio as gr

    fast = dict(show_progress="hidden", concurrency_limit=None, concurrency_id="ui",
                api_name=False)
    restored = [ui.image, ui.source, ui.target, ui.method, ui.guidance, ui.steps, ui.lr,
                ui.seed, ui.size, ui.schedule, ui.step_rule, ui.average_tail, ui.download,
                ui.use_btn, ui.suggestions, ui.chosen, ui.message]

    def restore(hist, i):
        if not hist or i is None or not 0 <= i < len(hist):
            return [gr.skip()] * len(restored)
        h = hist[i]
        active = get_method(h["method"]).gradient
        return (h["input"], h["source"], h["target"], h["method"], h["guidance"], h["steps"],
                h["lr"], h["seed"], h["size"],
                gr.Dropdown(value=h["schedule"], interactive=active),
                gr.Dropdown(value=h["step_rule"], interactive=active),
                gr.Slider(value=h["average_tail"], interactive=active),
                gr.DownloadButton(value=h["result"], interactive=True),
                gr.Button(interactive=True), gr.Radio(choices=[], value=None, visible=False),
                h, f"Restored edit #{h['n']}: its input image, prompts and settings. "
                "Download PNG saves its result.")

    def on_row(hist, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return restore(hist, row)

    def on_thumb(hist, evt: gr.SelectData):  # the thumbnails show the newest first
        return restore(hist, len(hist or []) - 1 - evt.index)

    _hint(on_row, evt=gr.SelectData)
    _hint(on_thumb, evt=gr.SelectData)
    ui.table.select(on_row, [ui.history], restored, **fast)
    ui.thumbs.select(on_thumb, [ui.history], restored, **fast)


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
                           show_error=False, quiet=quiet, theme=theme(), css=CSS,
                           ssr_mode=False, footer_links=[], inbrowser=False)
    except OSError as e:
        raise DDSError(f"cannot listen on {host}:{port} ({one_sentence(e).rstrip('.')}); "
                       "choose another --port") from None


__all__ = [
    "MAX_UPLOAD", "EditSession", "EditUpdate", "Example", "Translator", "build_app",
    "bundled_examples", "launch", "load_translator", "model_info", "photo_examples",
    "progress_html", "upload_image", "world_examples",
]
