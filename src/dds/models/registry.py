"""Which family a model folder belongs to, and one loaded model per (folder, precision, device).

A family is registered by a name, a test on the folder and a loader; `load_model` picks the
first family whose test accepts the folder (read from its model_index.json).  Each family is one
file in `dds.models` and one line in `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dds.errors import DDSError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "builtin-model"
BUILTIN_LABEL = "built-in model"


def builtin_model_dir() -> Path:
    """The packaged model folder; one clear sentence if it was not shipped or built."""
    if not (BUILTIN_DIR / "model_index.json").is_file():
        raise DDSError(
            "the built-in model is not in this installation; build it with "
            "`dds train-builtin` or pass a diffusers model folder with --model"
        )
    return BUILTIN_DIR


@dataclass(frozen=True)
class Family:
    name: str
    accepts: Callable[[Path], bool]  # does this folder hold a model of the family?
    load: Callable[..., object]  # (folder, dtype=, device=, label=) -> Model


def pipeline_class(root: Path) -> str:
    """The `_class_name` in a folder's model_index.json ("" when absent or unreadable)."""
    import json

    try:
        return str(json.loads((root / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _by_class(*names: str) -> Callable[[Path], bool]:
    return lambda root: pipeline_class(root) in names


def _loader(module: str, cls: str) -> Callable[..., object]:
    def load(root, **kw):
        import importlib

        return getattr(importlib.import_module(module), cls)(root, **kw)

    return load


# A folder without model_index.json (or with an unreadable one) is tried as Stable Diffusion,
# whose loader then says which part is missing.
FAMILIES: list[Family] = [
    Family("stable-diffusion",
           _by_class("", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
           _loader("dds.models.stable_diffusion", "StableDiffusionModel")),
    Family("sdxl", _by_class("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
           _loader("dds.models.sdxl", "SDXLModel")),
    Family("sd3", _by_class("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
           _loader("dds.models.sd3", "SD3Model")),
    Family("flux", _by_class("FluxPipeline", "FluxImg2ImgPipeline"),
           _loader("dds.models.flux", "FluxModel")),
]


def load_model(model: str | Path | None = None, dtype: str = "auto",
               device: str | None = None):
    """A model for `model`: a diffusers folder, a cached model id, or None for the built-in."""
    from dds.models.stable_diffusion import resolve_model_dir

    root = builtin_model_dir() if model is None else resolve_model_dir(model)
    label = BUILTIN_LABEL if root.resolve() == BUILTIN_DIR else None
    for fam in FAMILIES:
        if fam.accepts(root):
            return fam.load(root, dtype=dtype, device=device, label=label)
    raise DDSError(
        f"model folder '{root}' holds a {pipeline_class(root)}, which dds does not edit with; "
        "give a Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 or FLUX.1 folder")


def load_autoencoder(model: str | Path | None = None, device="cpu"):
    """The autoencoder of a model folder alone (None: the built-in model), frozen, float32:
    what a network trained on that model's latents needs, without its denoiser."""
    from diffusers import AutoencoderKL

    from dds.models.stable_diffusion import resolve_model_dir

    root = builtin_model_dir() if model is None else resolve_model_dir(model)
    vae_dir = root / "vae"
    if not (vae_dir / "config.json").is_file():
        raise DDSError(f"model folder '{root}' has no autoencoder ('vae/config.json'); give the "
                       "model folder the network was trained from")
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device)
    except (OSError, ValueError) as e:
        raise DDSError(f"the autoencoder in '{root}' cannot be loaded ({type(e).__name__}); "
                       "check the model folder") from None
    return vae.eval().requires_grad_(False)


_LOADED: dict[tuple, object] = {}


def is_model(obj) -> bool:
    return hasattr(obj, "predict_eps") and hasattr(obj, "encode_prompt")


def get_model(model=None, dtype: str = "auto", device: str | None = None):
    """A loaded model, cached: `model` may already be one, a folder, a cached id, or None."""
    if model is not None and is_model(model):
        return model
    key = (str(model), dtype, device)
    if key not in _LOADED:
        _LOADED[key] = load_model(model, dtype=dtype, device=device)
    return _LOADED[key]


def is_builtin(model) -> bool:
    return getattr(model, "label", None) == BUILTIN_LABEL


# How the built-in model's trainer records itself in an exported folder's training.json.
WORLD_TRAINERS = ("dds train-builtin", "python -m dds.builtin.train")


def knows_world(model) -> bool:
    """Was `model` trained on the procedural world: the built-in model, or a folder that the
    built-in model's trainer exported (a release in the making)?  The world's edits, exact
    truths and judge then measure it."""
    if is_builtin(model):
        return True
    record = model.training_record() if hasattr(model, "training_record") else None
    return str((record or {}).get("command", "")).startswith(WORLD_TRAINERS)
