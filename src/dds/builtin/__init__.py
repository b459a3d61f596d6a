"""The built-in model: a small Stable-Diffusion-format model trained on the procedural world.

Where it lives is the model registry's business (`dds.models.registry`); this package holds
its architecture configs and its trainer.
"""

from dds.models.registry import BUILTIN_DIR, builtin_model_dir

__all__ = ["BUILTIN_DIR", "builtin_model_dir"]
