"""The one edit pipeline: a request in, a result out.

    image -> checked RGB -> working size -> latents -> prompts -> loop -> decode -> metadata

`dds.edit(...)`, the `dds edit` command and the web app all run edits through `EditPipeline`;
none of them holds editing logic of its own.  Every check (image, prompts, numbers) happens in
`EditPipeline.prepare`, before any model work, so a bad request costs nothing and writes nothing.
Progress goes to an `on_step` hook; a `stop` signal (e.g. a `threading.Event`) ends the edit
after its current step, and the result says how many steps ran.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dds.errors import DDSError, SettingError
from dds.images import (
    check_size,
    load_image,
    pil_to_tensor,
    prepare,
    save_png,
    tensor_to_pil,
    to_rgb,
    upright,
)
from dds.loop import EditConfig, StepHook, StopSignal, edit_latents
from dds.methods import get_method
from dds.models.registry import get_model


def as_image(image) -> Image.Image:
    """A path, PIL image or HxWx3 uint8/float array -> RGB PIL image (checked)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = Image.fromarray(a)
    if not isinstance(image, Image.Image):
        raise DDSError(f"image of type {type(image).__name__} is not supported; give a path or PIL image")
    check_size(image.size)
    return to_rgb(upright(image))


def check_prompts(source: str | None, target: str, method: str) -> None:
    if not isinstance(target, str) or not target.strip():
        raise DDSError(
            "the target prompt is empty; describe the edited image, e.g. 'a photo of a lion'"
        )
    if get_method(method).uses_source and (not isinstance(source, str) or not source.strip()):
        raise DDSError(
            "the source prompt is empty; DDS needs a caption of the input image, e.g. "
            "'a photo of a cat'"
        )


# The keys of a recommended timestep schedule (`dds eval schedules --write` puts them under the
# method's name in dds_edit_defaults.json): one unit, so that naming a schedule (`--schedule
# reference`) gives the reference recipe's value for every key of it left unset.
SCHEDULE_KEYS = ("schedule", "steps", "step_rule", "n_avg", "optimizer", "lr", "average_tail")


def edit_config(model, **overrides) -> EditConfig:
    """The reference recipe, then the method's own settings (FlowEdit's), then the model's
    recommended ones (top-level keys for the score-distillation methods; a key named after a
    method for that method), then the caller's.  A caller who names a `schedule` sets aside the
    model's recommended schedule (`SCHEDULE_KEYS`); one who sets FlowEdit's `steps` alone keeps
    the default's proportion of steps run (`n_max`)."""
    method = get_method(overrides.get("method") or EditConfig.method)
    own = getattr(model, "edit_defaults", {}) or {}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = {"method": method.name, **method.defaults}
    if method.gradient:
        settings.update({k: v for k, v in own.items() if not isinstance(v, dict)})
    mine = own.get(method.name, {})
    if "schedule" in given and "schedule" in mine:
        mine = {k: v for k, v in mine.items() if k not in SCHEDULE_KEYS}
    settings.update(mine)
    if "steps" in given and "n_max" not in given and settings.get("n_max") is not None:
        share = settings["n_max"] / settings.get("steps", EditConfig.steps)
        given["n_max"] = max(1, min(int(given["steps"]), round(share * given["steps"])))
    return EditConfig().with_(**{**settings, **given})


def image_hash(im: Image.Image) -> str:
    """A short hash of an image's pixels (what identifies the input in an output's metadata)."""
    a = np.asarray(im.convert("RGB"))
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class EditRequest:
    """One edit: the image (path, PIL image or array), its caption, the target caption, any
    `EditConfig` fields in `settings` (unset ones: the model's, else the reference recipe),
    the working long side (`size`, default the model's native one) and `crop`."""

    image: Any
    source: str | None
    target: str
    settings: dict = field(default_factory=dict)
    size: int | None = None
    crop: bool = False


@dataclass(frozen=True)
class PreparedEdit:
    """A request after every check: the working-size RGB input and the resolved config.
    `notes`: things the user should know that are not errors (e.g. an aspect-ratio change)."""

    request: EditRequest
    input: Image.Image
    config: EditConfig
    source: str
    target: str
    notes: tuple[str, ...] = ()


ASPECT_NOTE = 0.02  # a working size that changes the aspect ratio by more than this gets a note


def aspect_change(original: tuple[int, int], working: tuple[int, int]) -> float:
    """Relative change of w/h from `original` to `working` (0.05: 5% wider or narrower)."""
    (w0, h0), (w1, h1) = original, working
    return abs((w1 / h1) / (w0 / h0) - 1.0)


def max_size(model) -> int:
    """The largest working long side a request may ask for: four times the model's native
    side, at least 1024 (beyond that, memory and time grow with nothing to gain), and no more
    than the denoiser can take (SD3's position embeddings end at `max_image_side`)."""
    return min(max(1024, 4 * int(model.native_size)),
               int(getattr(model, "max_image_side", None) or 1 << 30))


def size_multiple(model) -> int:
    """What both working sides must be a multiple of (8; 16 for SD3 and FLUX, whose
    transformers read 2x2 latent patches)."""
    return int(getattr(model, "size_multiple", None) or 8)


@dataclass(frozen=True)
class EditResult:
    image: Image.Image  # the edited image
    input: Image.Image  # the input at working size
    latents: torch.Tensor  # (1,C,h,w)
    config: EditConfig
    steps_run: int
    stopped: bool
    seconds: float
    metadata: dict  # what `save` writes into the PNG's `dds` text chunk
    source_latents: torch.Tensor | None = None  # (1,C,h,w): the input's, encoded (z_hat)

    def save(self, path: str | Path) -> Path:
        """Write the result as a PNG (atomically) with the metadata in a `dds` text chunk."""
        return save_png(self.image, path, {"dds": json.dumps(self.metadata)})


class EditPipeline:
    """Edits on one model.  `model`: a loaded model, a folder, a cached id, or None (built-in)."""

    def __init__(self, model=None, *, dtype: str = "auto", device: str | None = None):
        self.model = get_model(model, dtype=dtype, device=device)

    def config(self, **overrides) -> EditConfig:
        return edit_config(self.model, **overrides)

    def prepare(self, request: EditRequest) -> PreparedEdit:
        """Check everything about a request (DDSError on the first problem); no model work."""
        cfg = self.config(**request.settings)
        check_prompts(request.source, request.target, cfg.method)
        size = self.check_size(request.size)
        original = as_image(request.image)
        multiple = size_multiple(self.model)
        im = prepare(original, size, crop=request.crop, multiple=multiple)
        notes = self.prompt_notes(request.source, request.target)
        change = aspect_change(original.size if not request.crop else (1, 1), im.size)
        if change > ASPECT_NOTE:
            notes.append(f"the working size {im.size[0]}x{im.size[1]} changes the image's aspect "
                         f"ratio by {change:.1%} (both sides are multiples of {multiple}); "
                         "crop the image or choose another size to keep it closer")
        return PreparedEdit(request, im, cfg, (request.source or "").strip(),
                            request.target.strip(), tuple(notes))

    def prompt_notes(self, source: str | None, target: str) -> list[str]:
        """A note for each prompt longer than the text encoder reads (its end is ignored)."""
        notes = []
        for name, text in (("source", source), ("target", target)):
            if text and text.strip():
                n, limit = self.model.prompt_length(text.strip())
                if n > limit:
                    notes.append(f"the {name} prompt has {n} tokens and the text encoder reads "
                                 f"the first {limit}; the end ('...{text.strip()[-30:]}') is "
                                 "ignored: shorten it")
        return notes

    def check_size(self, size) -> int:
        """The working long side: the model's native one by default, else within the range."""
        if size is None:
            return int(self.model.native_size)
        hi, lo = max_size(self.model), size_multiple(self.model)
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not (
                float(size).is_integer() and lo <= size <= hi):
            raise SettingError("size", size,
                               f"it must be a whole number of pixels from {lo} to {hi}")
        return int(size)

    def decode(self, z: torch.Tensor) -> Image.Image:
        """Latents (1,C,h,w) -> PIL image (for previews as for the result)."""
        with torch.no_grad():
            return tensor_to_pil(self.model.decode(z))

    def metadata(self, p: PreparedEdit, steps_run: int) -> dict:
        return {"source": p.source, "target": p.target, "model": self.model.label,
                "model_id": self.model.identity(), "input_sha256": image_hash(p.input),
                "size": list(p.input.size), "config": json.loads(p.config.to_json()),
                "steps_run": steps_run, "device": str(self.model.device),
                "precision": str(self.model.dtype).removeprefix("torch.")}

    def run(self, request: EditRequest | PreparedEdit, on_step: StepHook | None = None,
            stop: StopSignal | None = None) -> EditResult:
        """Run one edit (checking it first unless it is already prepared)."""
        p = request if isinstance(request, PreparedEdit) else self.prepare(request)
        t0 = time.monotonic()
        steps = [0]

        def hook(info):
            steps[0] = info.step
            if on_step is not None:
                on_step(info)

        with torch.no_grad():
            z_hat = self.model.encode(pil_to_tensor(p.input))
            cond_t = self.model.encode_prompt([p.target])
            cond_s = self.model.encode_prompt([p.source])
        z = edit_latents(self.model, z_hat, cond_s, cond_t, p.config, on_step=hook, stop=stop)
        image = self.decode(z)
        return EditResult(image=image, input=p.input, latents=z, config=p.config,
                          steps_run=steps[0],
                          stopped=steps[0] < get_method(p.config.method).num_steps(p.config),
                          seconds=time.monotonic() - t0, metadata=self.metadata(p, steps[0]),
                          source_latents=z_hat)


_PIPELINES: dict[int, EditPipeline] = {}


def pipeline_for(model=None, dtype: str = "auto", device: str | None = None) -> EditPipeline:
    """The pipeline of a (cached) model."""
    m = get_model(model, dtype=dtype, device=device)
    if id(m) not in _PIPELINES:
        _PIPELINES[id(m)] = EditPipeline(m)
    return _PIPELINES[id(m)]


def edit(
    image,
    source: str | None = None,
    target: str = "",
    model=None,
    *,
    size: int | None = None,
    crop: bool = False,
    on_step: StepHook | None = None,
    stop: StopSignal | None = None,
    dtype: str = "auto",
    device: str | None = None,
    **settings,
) -> Image.Image:
    """Edit `image` from its caption `source` towards `target`; returns the edited PIL image.

    `settings` takes any `EditConfig` field (method, steps, guidance, lr, seed, ...); unset
    fields use the model's recommended settings, else the reference recipe.  `size` is the
    working long side (default: the model's native resolution, 512 for SD1.x).
    """
    pipe = pipeline_for(model, dtype=dtype, device=device)
    request = EditRequest(image, source, target, settings, size=size, crop=crop)
    return pipe.run(request, on_step=on_step, stop=stop).image
