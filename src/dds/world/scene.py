"""A small procedural image world: flat-coloured shapes on a textured background.

Every image is rendered from a :class:`Scene`, a tiny structured description (background
colour, background texture, one or two objects). Because the renderer is exact, an edit of one
attribute (an object's colour or shape, the background colour, adding or removing an object)
has an exact ground truth: the re-rendered target scene. Captions are produced from the scene
with a few templates, so a source caption and a target caption differ only in the edited words.

Geometry is expressed on a 64 x 64 canvas (positions and sizes in canvas pixels); rendering at
another resolution scales the canvas. Rendering is vectorised numpy with signed-distance
shapes and a one-pixel anti-aliasing ramp, so a 64 x 64 scene takes well under a millisecond.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

CANVAS = 64  # geometry is defined on a CANVAS x CANVAS grid of pixels

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Object colours: saturated and well separated in RGB.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.96, 0.88, 0.12),
    "green": (0.12, 0.66, 0.22),
    "blue": (0.12, 0.30, 0.88),
    "purple": (0.55, 0.18, 0.75),
    "pink": (0.98, 0.50, 0.76),
    "white": (0.98, 0.98, 0.98),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Background colours: lighter / muted so that objects stand out.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "gray": (0.52, 0.52, 0.52),
    "black": (0.08, 0.08, 0.08),
    "blue": (0.45, 0.62, 0.92),
    "green": (0.55, 0.80, 0.50),
    "yellow": (0.98, 0.92, 0.55),
}
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

TEXTURES: tuple[str, ...] = ("stripes", "checks", "dots", "noise", "gradient")
TEXTURE_WORDS: dict[str, str] = {
    "stripes": "striped",
    "checks": "checkered",
    "dots": "dotted",
    "noise": "speckled",
    "gradient": "gradient",
}

# (object colour, background colour) pairs that are never generated: same colour, or too alike.
INCOMPATIBLE: frozenset[tuple[str, str]] = frozenset(
    {(c, c) for c in COLORS if c in BACKGROUNDS} | {("white", "gray")}
)

MAX_OBJECTS = 2
SIZE_RANGE = (7.0, 15.0)  # object "radius" in canvas pixels
TEX_SCALE_RANGE = (6.0, 12.0)  # texture period in canvas pixels
TEX_AMP_RANGE = (0.12, 0.25)
BOUND = 1.2  # every shape fits in a circle of radius BOUND * size
MARGIN = 1.0  # minimum gap (canvas pixels) between a shape's bound and the canvas edge
GAP = 2.0  # minimum gap between the bounds of two objects
MIN_DX = 8.0  # minimum horizontal distance between object centres (unambiguous slot order)

# Caption templates. {objs}: "a red circle" / "a red circle and a blue star";
# {bg}: background colour word; {tex}: texture word.
TEMPLATES: tuple[str, ...] = (
    "{objs} on a {bg} {tex} background",
    "a {bg} {tex} background with {objs}",
    "{objs} over a {bg} background",
    "{objs} on a {bg} background",
    "a photo of {objs} on a {bg} {tex} background",
    "a {bg} background with {objs}",
)

EDIT_KINDS: tuple[str, ...] = (
    "object_color",
    "object_shape",
    "background_color",
    "add_object",
    "remove_object",
)


def compatible(color: str, background: str) -> bool:
    """True when an object of ``color`` may be drawn on a ``background`` background."""
    return (color, background) not in INCOMPATIBLE


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One object. ``x``, ``y``: centre; ``size``: radius; all in canvas pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: float
    angle: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Obj:
        return Obj(
            shape=str(d["shape"]),
            color=str(d["color"]),
            x=float(d["x"]),
            y=float(d["y"]),
            size=float(d["size"]),
            angle=float(d.get("angle", 0.0)),
        )


@dataclass(frozen=True)
class Scene:
    """A full image description. ``objects`` are kept sorted left to right (slot order)."""

    background: str
    texture: str
    tex_scale: float
    tex_phase: float
    tex_angle: float
    tex_amp: float
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    template: int = 0

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects, key=lambda o: o.x))
        object.__setattr__(self, "objects", objs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objects"] = [o.to_dict() for o in self.objects]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        return Scene(
            background=str(d["background"]),
            texture=str(d["texture"]),
            tex_scale=float(d["tex_scale"]),
            tex_phase=float(d["tex_phase"]),
            tex_angle=float(d["tex_angle"]),
            tex_amp=float(d["tex_amp"]),
            objects=tuple(Obj.from_dict(o) for o in d["objects"]),
            template=int(d.get("template", 0)),
        )


def _as_scene(s: Scene | dict[str, Any]) -> Scene:
    return s if isinstance(s, Scene) else Scene.from_dict(s)


def _fits(x: float, y: float, size: float, others: Sequence[Obj]) -> bool:
    b = BOUND * size
    if not (b + MARGIN <= x <= CANVAS - b - MARGIN and b + MARGIN <= y <= CANVAS - b - MARGIN):
        return False
    for o in others:
        if abs(o.x - x) < MIN_DX:
            return False
        if np.hypot(o.x - x, o.y - y) < BOUND * (o.size + size) + GAP:
            return False
    return True


def _place(
    rng: np.random.Generator, others: Sequence[Obj], tries: int = 200
) -> tuple[float, float, float] | None:
    """Random (x, y, size) that fits inside the canvas and clear of ``others``."""
    lo, hi = SIZE_RANGE
    for t in range(tries):
        # Shrink the size range as tries fail so crowded scenes still find a spot.
        top = hi - (hi - lo) * min(1.0, t / (tries * 0.5))
        size = float(rng.uniform(lo, max(lo, top)))
        b = BOUND * size + MARGIN
        x = float(rng.uniform(b, CANVAS - b))
        y = float(rng.uniform(b, CANVAS - b))
        if _fits(x, y, size, others):
            return x, y, size
    return None


def _random_color(rng: np.random.Generator, background: str, exclude: Sequence[str] = ()) -> str:
    choices = [c for c in COLOR_NAMES if compatible(c, background) and c not in exclude]
    return str(choices[int(rng.integers(len(choices)))])


def _random_obj(rng: np.random.Generator, background: str, others: Sequence[Obj]) -> Obj | None:
    pos = _place(rng, others)
    if pos is None:
        return None
    x, y, size = pos
    return Obj(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=_random_color(rng, background),
        x=x,
        y=y,
        size=size,
        angle=float(rng.uniform(0.0, 2.0 * np.pi)),
    )


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, template: int | None = None
) -> Scene:
    """Draw a random scene (1 or 2 objects when ``n_objects`` is None)."""
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 0 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be between 0 and {MAX_OBJECTS}, got {n_objects}")
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    tex_scale = float(rng.uniform(*TEX_SCALE_RANGE))
    tex_phase = float(rng.uniform(0.0, 2.0 * np.pi))
    tex_angle = float(rng.uniform(0.0, np.pi))
    tex_amp = float(rng.uniform(*TEX_AMP_RANGE))
    if template is None:
        template = int(rng.integers(len(TEMPLATES)))
    while True:
        objs: list[Obj] = []
        for _ in range(n_objects):
            o = _random_obj(rng, background, objs)
            if o is None:
                break
            objs.append(o)
        if len(objs) == n_objects:
            break
    return Scene(
        background=background,
        texture=texture,
        tex_scale=tex_scale,
        tex_phase=tex_phase,
        tex_angle=tex_angle,
        tex_amp=tex_amp,
        objects=tuple(objs),
        template=template,
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates of pixel centres: (X, Y), each (size, size), X along columns."""
    g = _GRIDS.get(size)
    if g is None:
        c = ((np.arange(size, dtype=np.float64) + 0.5) * (CANVAS / size)).astype(np.float32)
        X, Y = np.meshgrid(c, c)
        g = (X, Y)
        _GRIDS[size] = g
    return g


def _sd_box(px: np.ndarray, py: np.ndarray, bx: float, by: float) -> np.ndarray:
    qx = np.abs(px) - bx
    qy = np.abs(py) - by
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _sd_triangle(px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Equilateral triangle with half side ``r``, centred on its centroid, apex up."""
    k = np.float32(np.sqrt(3.0))
    py = -py  # apex up in image coordinates
    x = np.abs(px) - r
    y = py + r / k
    flip = x + k * y > 0.0
    nx = np.where(flip, (x - k * y) * 0.5, x)
    ny = np.where(flip, (-k * x - y) * 0.5, y)
    nx = nx - np.clip(nx, -2.0 * r, 0.0)
    return -np.hypot(nx, ny) * np.sign(ny)


_K1 = (0.809016994375, -0.587785252292)


def _sd_star5(px: np.ndarray, py: np.ndarray, r: float, rf: float) -> np.ndarray:
    """Five-pointed star with outer radius ``r`` and inner ratio ``rf``, a point up."""
    k1x, k1y = _K1
    k2x, k2y = -k1x, k1y
    x = np.abs(px)
    y = -py
    d = np.maximum(k1x * x + k1y * y, 0.0) * 2.0
    x, y = x - d * k1x, y - d * k1y
    d = np.maximum(k2x * x + k2y * y, 0.0) * 2.0
    x, y = x - d * k2x, y - d * k2y
    x = np.abs(x)
    y = y - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0.0, r)
    return np.hypot(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def _shape_sdf(shape: str, px: np.ndarray, py: np.ndarray, s: float) -> np.ndarray:
    if shape == "circle":
        return np.hypot(px, py) - s
    if shape == "square":
        return _sd_box(px, py, 0.85 * s, 0.85 * s)
    if shape == "triangle":
        # circumradius 1.15 s -> half side 1.15 s * sqrt(3) / 2; centroid at the centre
        return _sd_triangle(px, py + 0.0, 1.15 * s * 0.8660254)
    if shape == "star":
        return _sd_star5(px, py, 1.15 * s, 0.45)
    if shape == "cross":
        w = 0.36 * s
        return np.minimum(_sd_box(px, py, s, w), _sd_box(px, py, w, s))
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _obj_alpha(o: Obj, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Coverage of ``o`` on its bounding window: (window slices, alpha array)."""
    X, Y = _grid(size)
    scale = size / CANVAS
    b = BOUND * o.size + 2.0
    r0 = max(0, int(np.floor((o.y - b) * scale)))
    r1 = min(size, int(np.ceil((o.y + b) * scale)) + 1)
    c0 = max(0, int(np.floor((o.x - b) * scale)))
    c1 = min(size, int(np.ceil((o.x + b) * scale)) + 1)
    win = (slice(r0, r1), slice(c0, c1))
    dx = X[win] - np.float32(o.x)
    dy = Y[win] - np.float32(o.y)
    ca, sa = np.float32(np.cos(o.angle)), np.float32(np.sin(o.angle))
    px = ca * dx + sa * dy
    py = -sa * dx + ca * dy
    d = _shape_sdf(o.shape, px, py, o.size)
    pix = CANVAS / size  # one output pixel in canvas units
    alpha = np.clip(0.5 - d / pix, 0.0, 1.0).astype(np.float32)
    return win, alpha


def _noise_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """Smoothstep interpolation weights (len(coords), n) from lattice nodes to ``coords``."""
    i0 = np.floor(coords).astype(np.int64)
    f = coords - i0
    f = f * f * (3.0 - 2.0 * f)
    w = np.zeros((coords.shape[0], n), dtype=np.float32)
    rows = np.arange(coords.shape[0])
    w[rows, i0] = 1.0 - f
    w[rows, i0 + 1] = f
    return w


def _value_noise(size: int, scale: float, offset: float, seed: int) -> np.ndarray:
    """Smooth value noise with lattice spacing ``scale`` canvas pixels, (size, size) in [0, 1].

    Separable: bilinear interpolation with smoothstep weights of a random lattice.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(CANVAS / size)
    coords = c / np.float32(scale) + np.float32(offset)
    n = int(np.floor(coords[-1])) + 2
    w = _noise_weights(coords, n)
    lat = np.random.default_rng(seed).random((n, n), dtype=np.float32)
    return w @ lat @ w.T


def texture_field(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The background texture pattern, (size, size) float32 in [0, 1]."""
    X, Y = _grid(size)
    s = scene.tex_scale
    ca, sa = np.float32(np.cos(scene.tex_angle)), np.float32(np.sin(scene.tex_angle))
    ph = scene.tex_phase
    pix = CANVAS / size
    t = scene.texture
    h = np.float32(CANVAS / 2)
    if t in ("stripes", "gradient"):
        u = ca * (X - h) + sa * (Y - h)
        if t == "stripes":
            f = 0.5 + 0.5 * np.sin(u * np.float32(2 * np.pi / s) + np.float32(ph))
        else:
            f = np.clip(0.5 + u / np.float32(CANVAS), 0.0, 1.0)
    elif t in ("checks", "dots"):
        cx = X - h
        cy = Y - h
        u = ca * cx + sa * cy
        v = ca * cy - sa * cx
        if t == "checks":
            off = np.float32(ph / (2 * np.pi) * s)
            a = np.sin((u + off) * np.float32(np.pi / s))
            b = np.sin((v + off) * np.float32(np.pi / s))
            f = 0.5 + 0.5 * np.clip(3.0 * a * b, -1.0, 1.0)
        else:
            off = np.float32(ph / (2 * np.pi))
            fu = np.mod(u / np.float32(s) + off, 1.0) - 0.5
            fv = np.mod(v / np.float32(s) + off, 1.0) - 0.5
            d = np.hypot(fu, fv) * np.float32(s)
            radius = 0.3 * s
            f = np.clip((radius - d) / np.float32(1.5 * pix) + 0.5, 0.0, 1.0)
    elif t == "noise":
        seed = int(ph * 1_000_000) % (2**31)
        n = _value_noise(size, s, ph, seed)
        f = np.clip((n - 0.5) * 1.8 + 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"unknown texture {t!r}; expected one of {', '.join(TEXTURES)}")
    return f.astype(np.float32)


# The gradient spreads its amplitude over the whole canvas; give it more contrast.
_TEXTURE_GAIN = {"gradient": 1.5}


def render_background(scene: Scene, size: int = CANVAS) -> np.ndarray:
    """The textured background alone, (size, size, 3) float32 in [0, 1]."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    lum = float(base @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    direction = 1.0 if lum < 0.5 else -1.0
    f = texture_field(scene, size)
    gain = direction * scene.tex_amp * _TEXTURE_GAIN.get(scene.texture, 1.0)
    img = base[None, None, :] + np.float32(gain) * f[:, :, None]
    return np.clip(img, 0.0, 1.0)


def render(scene: Scene | dict[str, Any], size: int = CANVAS) -> np.ndarray:
    """Render a scene to an (size, size, 3) float32 image in [0, 1]."""
    scene = _as_scene(scene)
    img = render_background(scene, size)
    for o in scene.objects:
        win, a = _obj_alpha(o, size)
        col = np.asarray(COLORS[o.color], dtype=np.float32)
        a3 = a[:, :, None]
        img[win] = img[win] * (1.0 - a3) + col * a3
    return img


def object_masks(scene: Scene | dict[str, Any], size: int = CANVAS) -> np.ndarray:
    """Per-object alpha coverage, (n_objects, size, size) float32 in [0, 1], slot order."""
    scene = _as_scene(scene)
    out = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for k, o in enumerate(scene.objects):
        win, a = _obj_alpha(o, size)
        out[k][win] = a
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8 (rounding)."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _objs_phrase(objects: Sequence[Obj]) -> str:
    if not objects:
        return "nothing"
    return " and ".join(f"{_article(o.color)} {o.color} {o.shape}" for o in objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene | dict[str, Any], template: int | None = None) -> str:
    """Caption of a scene, using ``scene.template`` unless ``template`` is given."""
    scene = _as_scene(scene)
    k = scene.template if template is None else template
    tpl = TEMPLATES[k % len(TEMPLATES)]
    return tpl.format(
        objs=_objs_phrase(scene.objects),
        bg=scene.background,
        tex=TEXTURE_WORDS[scene.texture],
    )


_WORD_TO_TEXTURE = {w: t for t, w in TEXTURE_WORDS.items()}


def _caption_regexes() -> list[re.Pattern[str]]:
    col = "|".join(COLOR_NAMES)
    shp = "|".join(SHAPES)
    bg = "|".join(BACKGROUND_NAMES)
    tex = "|".join(TEXTURE_WORDS.values())
    objs = rf"an? (?P<c0>{col}) (?P<s0>{shp})(?: and an? (?P<c1>{col}) (?P<s1>{shp}))?"
    pats = []
    for tpl in TEMPLATES:
        p = re.escape(tpl)
        p = p.replace(re.escape("{objs}"), objs)
        p = p.replace(re.escape("{bg}"), rf"(?P<bg>{bg})")
        p = p.replace(re.escape("{tex}"), rf"(?P<tex>{tex})")
        pats.append(re.compile("^" + p + "$"))
    return pats


_CAPTION_RES = _caption_regexes()


def parse_caption(text: str) -> dict[str, Any] | None:
    """Inverse of :func:`caption` for the known templates; None if the text does not match.

    Returns ``{"objects": [{"color", "shape"}, ...], "background": str,
    "texture": str | None, "template": int}`` (texture None when the template omits it).
    """
    text = " ".join(text.strip().lower().split())
    for k, pat in enumerate(_CAPTION_RES):
        m = pat.match(text)
        if m is None:
            continue
        g = m.groupdict()
        objs = [{"color": g["c0"], "shape": g["s0"]}]
        if g.get("c1"):
            objs.append({"color": g["c1"], "shape": g["s1"]})
        tex = g.get("tex")
        return {
            "objects": objs,
            "background": g["bg"],
            "texture": _WORD_TO_TEXTURE[tex] if tex else None,
            "template": k,
        }
    return None


# --------------------------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """A one-attribute edit. ``target`` re-rendered is the exact ground truth.

    ``obj_index`` is the edited object's slot: in ``source`` for object_color, object_shape
    and remove_object; in ``target`` for add_object; 0 (unused) for background_color.
    """

    source: Scene
    target: Scene
    kind: str
    obj_index: int
    source_caption: str
    target_caption: str
    attribute: str
    old_value: Any
    new_value: Any

    def edit_mask(self, size: int = CANVAS) -> np.ndarray:
        return edit_mask(self, size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "kind": self.kind,
            "obj_index": self.obj_index,
            "source_caption": self.source_caption,
            "target_caption": self.target_caption,
            "attribute": self.attribute,
            "old_value": self.old_value,
            "new_value": self.new_value,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Edit:
        return Edit(
            source=Scene.from_dict(d["source"]),
            target=Scene.from_dict(d["target"]),
            kind=str(d["kind"]),
            obj_index=int(d["obj_index"]),
            source_caption=str(d["source_caption"]),
            target_caption=str(d["target_caption"]),
            attribute=str(d["attribute"]),
            old_value=d["old_value"],
            new_value=d["new_value"],
        )


def edit_applicable(scene: Scene, kind: str, obj_index: int = 0) -> bool:
    """Whether :func:`make_edit` can apply ``kind`` to ``scene`` (ignoring placement luck)."""
    n = len(scene.objects)
    if kind in ("object_color", "object_shape"):
        return 0 <= obj_index < n
    if kind == "background_color":
        return True
    if kind == "add_object":
        return n < MAX_OBJECTS
    if kind == "remove_object":
        return n >= 2 and 0 <= obj_index < n
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")


def make_edit(scene: Scene, kind: str, rng: np.random.Generator, obj_index: int = 0) -> Edit:
    """Change exactly one attribute of ``scene``. Raises ValueError if not applicable."""
    scene = _as_scene(scene)
    if not edit_applicable(scene, kind, obj_index):
        raise ValueError(
            f"edit {kind!r} (obj_index={obj_index}) does not apply to a scene with "
            f"{len(scene.objects)} object(s)"
        )
    objs = list(scene.objects)
    if kind == "object_color":
        o = objs[obj_index]
        new = _random_color(rng, scene.background, exclude=[o.color])
        objs[obj_index] = replace(o, color=new)
        target = replace(scene, objects=tuple(objs))
        attribute, old, new_v, idx = "color", o.color, new, obj_index
    elif kind == "object_shape":
        o = objs[obj_index]
        choices = [s for s in SHAPES if s != o.shape]
        new = choices[int(rng.integers(len(choices)))]
        objs[obj_index] = replace(o, shape=new)
        target = replace(scene, objects=tuple(objs))
        attribute, old, new_v, idx = "shape", o.shape, new, obj_index
    elif kind == "background_color":
        choices = [
            b
            for b in BACKGROUND_NAMES
            if b != scene.background and all(compatible(o.color, b) for o in objs)
        ]
        new = choices[int(rng.integers(len(choices)))]
        target = replace(scene, background=new)
        attribute, old, new_v, idx = "background", scene.background, new, 0
    elif kind == "add_object":
        o = _random_obj(rng, scene.background, objs)
        if o is None:
            raise ValueError("no free room to add an object to this scene")
        target = replace(scene, objects=tuple(objs + [o]))
        idx = target.objects.index(o)
        attribute, old, new_v = "count", len(objs), len(objs) + 1
    else:  # remove_object
        del objs[obj_index]
        target = replace(scene, objects=tuple(objs))
        attribute, old, new_v, idx = "count", len(scene.objects), len(objs), obj_index
    return Edit(
        source=scene,
        target=target,
        kind=kind,
        obj_index=idx,
        source_caption=caption(scene),
        target_caption=caption(target),
        attribute=attribute,
        old_value=old,
        new_value=new_v,
    )


def sample_edit(
    rng: np.random.Generator, kind: str | None = None, template: int | None = None
) -> Edit:
    """A random scene and a random applicable edit of ``kind`` (any kind when None)."""
    if kind is None:
        kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")
    for _ in range(1000):
        if kind == "add_object":
            n = 1
        elif kind == "remove_object":
            n = 2
        else:
            n = None
        scene = sample_scene(rng, n_objects=n, template=template)
        idx = int(rng.integers(len(scene.objects))) if scene.objects else 0
        try:
            return make_edit(scene, kind, rng, obj_index=idx)
        except ValueError:
            continue
    raise RuntimeError(f"could not sample an applicable {kind!r} edit")


def edit_mask(edit: Edit, size: int = CANVAS) -> np.ndarray:
    """Region (size, size) float32 in [0, 1] whose pixels legitimately change under ``edit``."""
    if edit.kind == "background_color":
        m = object_masks(edit.source, size)
        return (1.0 - np.clip(m.sum(axis=0), 0.0, 1.0)).astype(np.float32)
    if edit.kind == "add_object":
        return object_masks(edit.target, size)[edit.obj_index]
    if edit.kind == "remove_object":
        return object_masks(edit.source, size)[edit.obj_index]
    a = object_masks(edit.source, size)[edit.obj_index]
    b = object_masks(edit.target, size)[edit.obj_index]
    return np.maximum(a, b)


# --------------------------------------------------------------------------------------------
# Dataset and export
# --------------------------------------------------------------------------------------------

try:  # torch is a dependency of the package, but keep the world importable without it
    import torch
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]
    _TorchDataset = object  # type: ignore[assignment,misc]


class SceneDataset(_TorchDataset):  # type: ignore[misc,valid-type]
    """``length`` deterministic random scenes; item ``i`` comes from ``default_rng([seed, i])``.

    Items are ``{"image": FloatTensor (3, size, size) in [0, 1], "caption": str,
    "scene": dict}``; batch them with ``collate_fn=collate_scenes``.
    """

    def __init__(
        self, length: int, seed: int, size: int = CANVAS, n_objects: int | None = None
    ) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.size = int(size)
        self.n_objects = n_objects

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return sample_scene(np.random.default_rng([self.seed, i]), n_objects=self.n_objects)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.scene(int(i))
        img = render(s, self.size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "caption": caption(s),
            "scene": s.to_dict(),
        }


def collate_scenes(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`SceneDataset` items: stacked images, lists of captions and scenes."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "scene": [b["scene"] for b in batch],
    }


def render_batch(scenes: Sequence[Scene | dict[str, Any]], size: int = CANVAS) -> np.ndarray:
    """Render several scenes: (n, size, size, 3) float32."""
    out = np.empty((len(scenes), size, size, 3), dtype=np.float32)
    for k, s in enumerate(scenes):
        out[k] = render(s, size)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    from dds.atomic import atomic_write_text

    atomic_write_text(path, text)


def export_folder(out_dir: str | os.PathLike[str], n: int, seed: int, size: int = CANVAS) -> Path:
    """Write ``n`` scenes as a diffusers-style ImageFolder: ``images/*.png`` + ``metadata.jsonl``.

    Each metadata line is ``{"file_name": "images/00000.png", "text": caption, "scene": {...}}``.
    Item ``i`` is the same as ``SceneDataset(n, seed, size)[i]``. Returns the folder path.
    """
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = SceneDataset(n, seed, size=size)
    lines = []
    width = max(5, len(str(max(n - 1, 0))))
    for i in range(n):
        s = ds.scene(i)
        name = f"images/{i:0{width}d}.png"
        Image.fromarray(to_uint8(render(s, size))).save(out / name)
        lines.append(json.dumps({"file_name": name, "text": caption(s), "scene": s.to_dict()}))
    _atomic_write_text(out / "metadata.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return out


def load_folder(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read back ``metadata.jsonl`` written by :func:`export_folder` (scene dicts as Scenes)."""
    out = []
    p = Path(path)
    with open(p / "metadata.jsonl", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                d = json.loads(line)
                d["scene"] = Scene.from_dict(d["scene"])
                out.append(d)
    return out
