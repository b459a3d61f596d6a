import json
from dataclasses import replace

import numpy as np
import pytest

from dds.world import (
    BACKGROUNDS,
    COLORS,
    EDIT_KINDS,
    SHAPES,
    TEMPLATES,
    TEXTURES,
    Obj,
    Scene,
    SceneDataset,
    caption,
    collate_scenes,
    compatible,
    edit_mask,
    export_folder,
    load_folder,
    make_edit,
    object_masks,
    parse_caption,
    render,
    sample_edit,
    sample_scene,
)


def _scenes(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kw) for _ in range(n)]


def test_constants_are_consistent():
    assert SHAPES == ("circle", "square", "triangle", "star", "cross")
    assert len(COLORS) == 8 and len(BACKGROUNDS) >= 5
    assert TEXTURES == ("stripes", "checks", "dots", "noise", "gradient")
    cols = np.array(list(COLORS.values()))
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 9
    assert d.min() > 0.25  # object colours are well separated
    for c in COLORS:
        if c in BACKGROUNDS:
            assert not compatible(c, c)
    assert not compatible("white", "gray")


def test_sampling_is_deterministic_and_valid():
    a = _scenes(200, seed=3)
    b = _scenes(200, seed=3)
    assert a == b
    assert np.array_equal(render(a[5]), render(b[5]))
    counts = {1: 0, 2: 0}
    for s in a:
        counts[len(s.objects)] += 1
        assert s.background in BACKGROUNDS and s.texture in TEXTURES
        assert 0 <= s.template < len(TEMPLATES)
        xs = [o.x for o in s.objects]
        assert xs == sorted(xs)
        for o in s.objects:
            assert compatible(o.color, s.background)
            assert 7.0 <= o.size <= 15.0
            assert 1.2 * o.size <= o.x <= 64 - 1.2 * o.size
            assert 1.2 * o.size <= o.y <= 64 - 1.2 * o.size
        if len(s.objects) == 2:
            o0, o1 = s.objects
            assert np.hypot(o0.x - o1.x, o0.y - o1.y) >= 1.2 * (o0.size + o1.size)
            assert (object_masks(s).sum(0) <= 1.0 + 1e-6).all()  # no overlap
    assert counts[1] > 50 and counts[2] > 50
    assert all(len(s.objects) == 2 for s in _scenes(20, n_objects=2))


def test_scene_dict_roundtrip_through_json():
    for s in _scenes(20, seed=1):
        d = json.loads(json.dumps(s.to_dict()))
        s2 = Scene.from_dict(d)
        assert s2 == s
        assert np.array_equal(render(s2), render(s))


def test_render_range_shape_and_sizes():
    s = _scenes(1, seed=2)[0]
    for size in (32, 64, 128):
        img = render(s, size)
        assert img.shape == (size, size, 3) and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
    for t in TEXTURES:  # every texture is visible
        img = render(replace(s, texture=t, objects=()))
        assert img.std() > 0.02, t


def test_circle_mask_area_matches_analytic():
    for r in (7.0, 10.5, 15.0):
        s = Scene("gray", "stripes", 8.0, 0.0, 0.0, 0.2, (Obj("circle", "red", 32.3, 31.7, r),))
        m = object_masks(s)
        assert m.shape == (1, 64, 64)
        assert abs(m.sum() - np.pi * r * r) / (np.pi * r * r) < 0.02
        m2 = object_masks(s, 128)[0]
        assert abs(m2.sum() / 4 - np.pi * r * r) / (np.pi * r * r) < 0.02
        # interior pixels are exactly the object colour
        img = render(s)
        assert np.allclose(img[32, 32], COLORS["red"])


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_changes_only_pixels_inside_mask(kind):
    rng = np.random.default_rng(11)
    for _ in range(20):
        e = sample_edit(rng, kind)
        assert e.kind == kind
        src, tgt = render(e.source), render(e.target)
        m = edit_mask(e)
        assert m.shape == (64, 64)
        assert np.array_equal(e.edit_mask(), m)
        outside = m == 0
        assert np.array_equal(src[outside], tgt[outside])
        assert np.abs(src - tgt).max() > 0.1  # the edit is visible
        assert m.max() == 1.0


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_changes_exactly_one_attribute_and_caption_words(kind):
    rng = np.random.default_rng(5)
    for _ in range(30):
        e = sample_edit(rng, kind)
        s, t = e.source, e.target
        assert s.template == t.template and s.texture == t.texture
        assert e.old_value != e.new_value
        if kind in ("object_color", "object_shape"):
            attr = "color" if kind == "object_color" else "shape"
            assert e.attribute == attr
            assert len(s.objects) == len(t.objects)
            for k, (a, b) in enumerate(zip(s.objects, t.objects, strict=True)):
                if k == e.obj_index:
                    assert getattr(a, attr) == e.old_value and getattr(b, attr) == e.new_value
                    assert replace(a, **{attr: e.new_value}) == b
                else:
                    assert a == b
            assert compatible(t.objects[e.obj_index].color, t.background)
        elif kind == "background_color":
            assert s.objects == t.objects
            assert (s.background, t.background) == (e.old_value, e.new_value)
            assert all(compatible(o.color, t.background) for o in t.objects)
        elif kind == "add_object":
            assert len(t.objects) == len(s.objects) + 1 == 2
            rest = [o for k, o in enumerate(t.objects) if k != e.obj_index]
            assert tuple(rest) == s.objects
        else:
            assert len(t.objects) == len(s.objects) - 1 == 1
            rest = [o for k, o in enumerate(s.objects) if k != e.obj_index]
            assert tuple(rest) == t.objects
        # captions: same template, differ only in the edited words
        assert e.source_caption == caption(s) and e.target_caption == caption(t)
        sw, tw = e.source_caption.split(), e.target_caption.split()
        if kind in ("object_color", "object_shape", "background_color"):
            assert len(sw) == len(tw)
            diff = [(a, b) for a, b in zip(sw, tw, strict=True) if a != b]
            # colour words; "a" -> "an" may change along with the colour
            assert 1 <= len(diff) <= 2
            assert (str(e.old_value), str(e.new_value)) in diff
        else:
            short, long = (sw, tw) if kind == "add_object" else (tw, sw)
            assert len(long) == len(short) + 4  # "a red star and" inserted
            # the short caption is the long one with one contiguous run of words removed
            i = next((k for k in range(len(short)) if short[k] != long[k]), len(short))
            assert long[:i] + long[i + 4 :] == short


def test_make_edit_rejects_inapplicable():
    s1 = _scenes(1, n_objects=1)[0]
    with pytest.raises(ValueError):
        make_edit(s1, "remove_object", np.random.default_rng(0))
    s2 = _scenes(1, n_objects=2)[0]
    with pytest.raises(ValueError):
        make_edit(s2, "add_object", np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_edit(s1, "object_color", np.random.default_rng(0), obj_index=1)


def test_captions_parse_back_for_every_template():
    for s in _scenes(60, seed=9):
        for k in range(len(TEMPLATES)):
            text = caption(s, template=k)
            assert text.isascii() and "{" not in text
            p = parse_caption(text)
            assert p is not None, text
            assert p["template"] == k
            assert p["background"] == s.background
            assert p["objects"] == [{"color": o.color, "shape": o.shape} for o in s.objects]
            assert p["texture"] in (None, s.texture)
    assert parse_caption("a cat sitting on a mat") is None
    s = Scene("blue", "stripes", 8.0, 0.0, 0.0, 0.2, (Obj("circle", "red", 20, 30, 9),), 0)
    assert caption(s) == "a red circle on a blue striped background"
    s = replace(s, objects=(Obj("star", "orange", 40, 30, 9), Obj("square", "green", 10, 30, 8)))
    assert caption(s) == "a green square and an orange star on a blue striped background"


def test_dataset_items_are_deterministic_and_collate():
    ds = SceneDataset(10, seed=4)
    assert len(ds) == 10
    a, b = ds[3], SceneDataset(10, seed=4)[3]
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype.is_floating_point
    assert (a["image"] == b["image"]).all()
    assert float(a["image"].min()) >= 0 and float(a["image"].max()) <= 1
    assert a["caption"] == caption(Scene.from_dict(a["scene"]))
    assert ds[4]["scene"] != a["scene"]
    assert SceneDataset(10, seed=5)[3]["scene"] != a["scene"]
    batch = collate_scenes([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64)
    assert len(batch["caption"]) == 4 and len(batch["scene"]) == 4
    templates = {SceneDataset(60, seed=0).scene(i).template for i in range(60)}
    assert templates == set(range(len(TEMPLATES)))
    with pytest.raises(IndexError):
        ds[10]


def test_export_folder_roundtrip(tmp_path):
    from PIL import Image

    out = export_folder(tmp_path / "data", n=5, seed=2)
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 5
    ds = SceneDataset(5, seed=2)
    for i, line in enumerate(lines):
        d = json.loads(line)
        assert d["file_name"] == f"images/{i:05d}.png"
        assert d["text"] == caption(Scene.from_dict(d["scene"]))
        img = np.asarray(Image.open(out / d["file_name"])).astype(np.float32) / 255
        assert img.shape == (64, 64, 3)
        ref = ds[i]["image"].numpy().transpose(1, 2, 0)
        assert np.abs(img - ref).max() <= 0.5 / 255 + 1e-6
    recs = load_folder(out)
    assert recs[0]["scene"] == ds.scene(0)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---- placement: where the edited object is ------------------------------------------------------
def _moved(edit, dx=None, scale=1.0):
    """The truth with the edited object moved right by `dx` (default: half its width, i.e. its
    size; left when the canvas ends) and its size scaled by `scale`."""
    objs = list(edit.target.objects)
    o = objs[edit.obj_index]
    d = o.size if dx is None else dx
    x = o.x + d if o.x + d + o.size < 64 else o.x - d
    objs[edit.obj_index] = replace(o, x=x, size=o.size * scale)
    return replace(edit.target, objects=tuple(objs))


def _placement_of(edits, scene_of):
    from dds.world.placement import edit_placement

    return edit_placement(np.stack([render(scene_of(e)) for e in edits]), edits)


@pytest.mark.parametrize("kind", ["object_color", "object_shape", "add_object"])
def test_placement_needs_the_object_where_and_as_large_as_the_truths(kind):
    """The exact truth is placed (IoU 1); the truth with the object moved by half its width, or
    shrunk to 0.6 of its size, is not; nor is the source (old colour, old shape, no object)."""
    rng = np.random.default_rng(31)
    edits = [sample_edit(rng, kind) for _ in range(60)]
    iou, placed = _placement_of(edits, lambda e: e.target)
    assert placed.all() and iou.min() > 0.9 and np.median(iou) == 1.0  # rivals: edge pixels
    iou, placed = _placement_of(edits, _moved)
    assert not placed.any() and iou.max() < 0.35
    iou, placed = _placement_of(edits, lambda e: _moved(e, 0.0, 0.6))
    assert not placed.any() and iou.max() < 0.45
    assert not _placement_of(edits, lambda e: e.source)[1].any()
    # A slightly smaller object (0.9 of its size) is still the same object at the same place.
    assert _placement_of(edits, lambda e: _moved(e, 0.0, 0.9))[1].mean() >= 0.9


def test_placement_of_background_and_removal_edits_reads_the_kept_objects():
    rng = np.random.default_rng(32)
    bg = [sample_edit(rng, "background_color") for _ in range(40)]
    iou, placed = _placement_of(bg, lambda e: e.target)
    assert placed.all() and iou.min() > 0.8
    assert _placement_of(bg, lambda e: e.source)[1].all()  # objects kept; the judge fails it
    moved = [replace(e, obj_index=0) for e in bg]  # move the first object of the truth away
    assert not _placement_of(moved, _moved)[1].any()
    rm = [sample_edit(rng, "remove_object") for _ in range(40)]
    assert _placement_of(rm, lambda e: e.target)[1].all()
    assert not _placement_of(rm, lambda e: e.source)[1].any()  # the object is still there


def test_placement_tolerates_blur_noise_and_a_colour_cast():
    """What an autoencoder does to the truth (slight blur, noise, a small cast) keeps it placed."""
    from dds.world.placement import edit_placement

    rng = np.random.default_rng(33)
    edits = [sample_edit(rng, k) for k in ("object_color", "object_shape", "background_color")
             for _ in range(30)]
    x = np.stack([render(e.target) for e in edits])
    k = np.array([0.25, 0.5, 0.25])
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = sum(k[i] * pad[:, i:i + 64, 1:-1] for i in range(3))
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    x = sum(k[j] * pad[:, :, j:j + 64] for j in range(3))
    x = np.clip(x + 0.03 + 0.03 * np.random.default_rng(0).standard_normal(x.shape), 0, 1)
    iou, placed = edit_placement(x.transpose(0, 3, 1, 2), edits)  # (N,3,H,W) works too
    assert placed.all() and iou.min() > 0.6
