"""dds: text-driven image editing with Delta Denoising Score (Hertz, Aberman, Cohen-Or 2023).

The public names are imported lazily, so that `dds` (the command) starts fast.  No public name
is also the name of a submodule: `dds.edit` is the function, every time.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "edit": "dds.pipeline",
    "EditPipeline": "dds.pipeline",
    "EditRequest": "dds.pipeline",
    "EditResult": "dds.pipeline",
    "Conditioning": "dds.models",
    "Model": "dds.models",
    "NoiseSchedule": "dds.models",
    "get_model": "dds.models",
    "load_model": "dds.models",
    "EditConfig": "dds.loop",
    "StepInfo": "dds.loop",
    "edit_latents": "dds.loop",
    "DDS": "dds.methods",
    "SDS": "dds.methods",
    "get_method": "dds.methods",
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
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # bound once: later lookups never reach a submodule
        return value
    raise AttributeError(f"module 'dds' has no attribute {name!r}")
