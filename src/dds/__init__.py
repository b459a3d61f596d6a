"""dds: text-driven image editing with Delta Denoising Score (Hertz, Aberman, Cohen-Or 2023).

The public names are imported lazily, so that `dds` (the command) starts fast and can set
threading options before torch loads.
"""

import os
from importlib import import_module

# OpenMP threads that busy-wait slow every torch call many times over when another process
# shares the CPU; passive waiting costs nothing measurable on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_EXPORTS = {
    "edit": "dds.api",
    "get_backend": "dds.api",
    "Backend": "dds.backends",
    "StableDiffusionBackend": "dds.backends",
    "load_backend": "dds.backends",
    "EditConfig": "dds.edit",
    "edit_latents": "dds.edit",
    "DDSError": "dds.errors",
    "cfg": "dds.score",
    "dds_grad": "dds.score",
    "grad_to_loss": "dds.score",
    "noise_input": "dds.score",
    "sds_grad": "dds.score",
    "timestep_weight": "dds.score",
    "v_to_eps": "dds.score",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dds' has no attribute {name!r}")
