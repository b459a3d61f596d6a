"""The built-in model: a small Stable-Diffusion-format model trained on the procedural world."""

from __future__ import annotations

from pathlib import Path

from dds.errors import DDSError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "builtin-model"


def builtin_model_dir() -> Path:
    """The packaged model folder; one clear sentence if it was not shipped or built."""
    if not (BUILTIN_DIR / "model_index.json").is_file():
        raise DDSError(
            "the built-in model is not in this installation; build it with "
            "`dds train-builtin` or pass a diffusers model folder with --model"
        )
    return BUILTIN_DIR
