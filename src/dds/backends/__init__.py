"""Model backends behind one small protocol, and `load_backend` to pick one."""

from dds.backends.base import Backend
from dds.backends.stable_diffusion import StableDiffusionBackend, load_backend

__all__ = ["Backend", "StableDiffusionBackend", "load_backend"]
