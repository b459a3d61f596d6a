"""One call for an edit: `dds.edit(image, source=..., target=...)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dds.backends import load_backend
from dds.edit import EditConfig, StepCallback, edit_latents
from dds.errors import DDSError
from dds.images import check_size, load_image, pil_to_tensor, prepare, tensor_to_pil, to_rgb

_BACKENDS: dict[tuple, object] = {}


def get_backend(model=None, dtype: str = "auto", device: str | None = None):
    """A loaded backend: `model` may already be one, a folder, a cached id, or None (built-in)."""
    if model is not None and hasattr(model, "predict_eps"):
        return model
    key = (str(model), dtype, device)
    if key not in _BACKENDS:
        _BACKENDS[key] = load_backend(model, dtype=dtype, device=device)
    return _BACKENDS[key]


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
    return to_rgb(image)


def check_prompts(source: str | None, target: str, method: str) -> None:
    if not isinstance(target, str) or not target.strip():
        raise DDSError(
            "the target prompt is empty; describe the edited image with --target, "
            "e.g. 'a photo of a lion'"
        )
    if method == "dds" and (not isinstance(source, str) or not source.strip()):
        raise DDSError(
            "the source prompt is empty; DDS needs a caption of the input image (--source)"
        )


def edit_config(backend, **overrides) -> EditConfig:
    """The reference defaults, then the model's recommended settings, then the caller's."""
    base = EditConfig().with_(**getattr(backend, "edit_defaults", {}))
    return base.with_(**overrides)


def edit(
    image,
    source: str | None = None,
    target: str = "",
    model=None,
    *,
    size: int | None = None,
    crop: bool = False,
    callback: StepCallback | None = None,
    dtype: str = "auto",
    device: str | None = None,
    **config,
) -> Image.Image:
    """Edit `image` from its caption `source` towards `target`; returns the edited PIL image.

    `config` takes any `EditConfig` field (method, steps, guidance, lr, seed, ...); unset
    fields use the model's recommended settings, else the reference recipe.  `size` is the
    working long side (default: the model's native resolution, 512 for SD1.x).
    """
    backend = get_backend(model, dtype=dtype, device=device)
    cfg = edit_config(backend, **config)
    check_prompts(source, target, cfg.method)
    im = prepare(as_image(image), size or backend.native_size, crop=crop)
    z_hat = backend.encode(pil_to_tensor(im))
    emb_t = backend.encode_prompt([target])
    emb_s = backend.encode_prompt([source or ""])
    z = edit_latents(backend, z_hat, emb_s, emb_t, cfg, callback=callback)
    return tensor_to_pil(backend.decode(z))
