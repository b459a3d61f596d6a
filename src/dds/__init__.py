"""dds: text-driven image editing with Delta Denoising Score (Hertz, Aberman, Cohen-Or 2023)."""

from dds.api import edit, get_backend
from dds.backends import Backend, StableDiffusionBackend, load_backend
from dds.edit import EditConfig, edit_latents
from dds.errors import DDSError
from dds.score import cfg, dds_grad, grad_to_loss, noise_input, sds_grad, timestep_weight, v_to_eps

__all__ = [
    "Backend",
    "DDSError",
    "EditConfig",
    "StableDiffusionBackend",
    "cfg",
    "dds_grad",
    "edit",
    "edit_latents",
    "get_backend",
    "grad_to_loss",
    "load_backend",
    "noise_input",
    "sds_grad",
    "timestep_weight",
    "v_to_eps",
]
__version__ = "0.1.0"
