"""Inputs that ship with the installation: scenes of the built-in world and packaged photos,
each with its caption and target suggestions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Example:
    """An input image that ships with the installation, its caption and target suggestions."""

    name: str
    image: Image.Image
    source: str
    targets: tuple[str, ...]
    kind: str  # "scene" (the built-in world) or "photo"


def world_examples(n: int = 4, seed: int = 0) -> list[Example]:
    """Scenes of the built-in world, each with captions that change one attribute."""
    from dds.world import caption, make_edit, render, sample_scene, to_uint8

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 4242, i])
        scene = sample_scene(rng)
        targets: list[str] = []
        for kind in ("object_color", "object_shape", "background_color", "add_object"):
            try:
                t = make_edit(scene, kind, rng).target_caption
            except ValueError:
                continue
            if t not in targets:
                targets.append(t)
        im = Image.fromarray(to_uint8(render(scene)))
        out.append(Example(f"scene {i + 1}", im, caption(scene), tuple(targets), "scene"))
    return out


# name, loader, source caption, target suggestions
_PHOTOS = [
    ("cat (scikit-image)", ("skimage", "chelsea"), "a photo of a cat",
     ("a photo of a tiger", "a photo of a dog", "a watercolor painting of a cat")),
    ("coffee (scikit-image)", ("skimage", "coffee"), "a photo of a cup of coffee",
     ("a photo of a cup of tea", "a photo of a bowl of soup")),
    ("astronaut (scikit-image)", ("skimage", "astronaut"), "a photo of an astronaut",
     ("a pencil sketch of an astronaut", "a photo of a robot astronaut")),
    ("Grace Hopper (matplotlib)", ("matplotlib", "grace_hopper.jpg"),
     "a photo of a woman in a navy uniform",
     ("a photo of a man in a navy uniform", "an oil painting of a woman in a navy uniform")),
]


def _load_photo(package: str, name: str) -> Image.Image | None:
    """A sample photo shipped inside an installed package, or None if it is not there."""
    try:
        if package == "skimage":
            import skimage.data

            a = getattr(skimage.data, name)()
            return Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB")
        if package == "matplotlib":
            from matplotlib import cbook

            with cbook.get_sample_data(name) as f:
                im = Image.open(f)
                im.load()
                return im.convert("RGB")
    except Exception:  # an optional package missing or without its data: skip the example
        return None
    return None


def photo_examples() -> list[Example]:
    out = []
    for name, (package, key), source, targets in _PHOTOS:
        im = _load_photo(package, key)
        if im is not None:
            out.append(Example(name, im, source, targets, "photo"))
    return out


def bundled_examples(builtin: bool = True, n_scenes: int = 4) -> list[Example]:
    """World scenes and packaged photos; the scenes first for the built-in model (they are
    what it knows), the photos first for any other model."""
    scenes, photos = world_examples(n_scenes), photo_examples()
    return scenes + photos if builtin else photos + scenes

