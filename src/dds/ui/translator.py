"""The page's view of a trained one-pass translation network (optional tab)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def load_translator(path: str | Path | None):
    """A loaded one-pass translation network (`dds.translate.Translator`), or None."""
    if not path:
        return None
    from dds.translate import Translator as Network

    return Translator(Network(path), Path(path))


@dataclass
class Translator:
    """A translation network's task names, and one image in, one image out."""

    net: Any
    checkpoint: Path

    @property
    def tasks(self) -> list[str]:
        return list(self.net.tasks)

    def __call__(self, image: Image.Image, task: str) -> Image.Image:
        out = self.net([image], task)[0]
        if isinstance(out, torch.Tensor):
            from dds.images import tensor_to_pil

            out = tensor_to_pil(out)
        return out
