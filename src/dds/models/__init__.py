"""Models behind one small interface (`Model`), one file per family, and a registry."""

from dds.models.base import Conditioning, Model, NoiseSchedule
from dds.models.registry import (
    builtin_model_dir,
    get_model,
    is_builtin,
    knows_world,
    load_model,
)

__all__ = ["Conditioning", "Model", "NoiseSchedule", "builtin_model_dir", "get_model",
           "is_builtin", "knows_world", "load_model"]
