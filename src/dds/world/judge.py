"""The judge: a small CNN that reads every scene attribute back from a 64 x 64 image.

For object slots 0 and 1 (left to right) it predicts the shape and the colour, for slot 1 also
whether an object is present; and for the whole image the background colour and the texture.
It is trained on freshly rendered scenes, with mild augmentation (Gaussian noise, slight blur,
small colour jitter) so that it also reads slightly imperfect generated images.

Besides the attribute labels, training uses dense auxiliary targets that exact renders make
free: the shape under each cell of the 8 x 8 feature map, the texture on object-free cells, and
each slot's object mask as the target of that slot's attention map. They are training-only.

The committed weights ``dds/assets/judge.safetensors`` were made, with
``torch.set_num_threads(1)`` on CPU, by::

    train_judge("src/dds/assets/judge.safetensors", steps=2000, batch_size=64, seed=0)

(see :data:`COMMITTED_TRAINING`; the call, the held-out accuracies on 2000 clean renders and
the training time are stored in the file's metadata, ``Judge.load().training_info``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dds.world.placement import edit_placed
from dds.world.scene import (
    BACKGROUND_NAMES,
    CANVAS,
    COLOR_NAMES,
    SHAPES,
    TEXTURES,
    Edit,
    Scene,
    object_masks,
    render,
    sample_scene,
)

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "judge.safetensors"

# The call that produced the committed weights (kept in sync with the module docstring).
COMMITTED_TRAINING: dict[str, Any] = {"steps": 2000, "batch_size": 64, "seed": 0, "threads": 1}

ATTRIBUTES: tuple[str, ...] = (
    "obj0_shape",
    "obj0_color",
    "obj1_present",
    "obj1_shape",
    "obj1_color",
    "background",
    "texture",
)


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = CANVAS
    channels: tuple[int, ...] = (24, 32, 48, 64, 64, 96)
    strides: tuple[int, ...] = (2, 2, 1, 2, 1, 1)  # first layer is a 4x4 stem
    hidden: int = 128
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLOR_NAMES
    backgrounds: tuple[str, ...] = BACKGROUND_NAMES
    textures: tuple[str, ...] = TEXTURES
    training: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def head_sizes(self) -> dict[str, int]:
        return {
            "obj0_shape": len(self.shapes),
            "obj0_color": len(self.colors),
            "obj1_present": 2,
            "obj1_shape": len(self.shapes),
            "obj1_color": len(self.colors),
            "background": len(self.backgrounds),
            "texture": len(self.textures),
        }

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> JudgeConfig:
        d = json.loads(text)
        for k in ("channels", "strides", "shapes", "colors", "backgrounds", "textures"):
            if k in d:
                d[k] = tuple(d[k])
        return JudgeConfig(**d)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2 if k % 2 else 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    """Convolutional backbone to an 8 x 8 feature map, then two kinds of readout.

    Global attributes (background, texture, whether a second object exists) come from mean-
    and max-pooled features. Each object slot has a spatial attention map (softmax over the
    8 x 8 positions, computed from the features and the pixel coordinates, so it can pick the
    leftmost / rightmost object); the attended features go through a shared shape/colour head.
    Pooling keeps the object heads translation invariant, which makes training sample-efficient.
    """

    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        # Input: RGB plus two coordinate channels.
        layers = [_conv(5, c[0], k=4, stride=cfg.strides[0])]
        for cin, cout, st in zip(c[:-1], c[1:], cfg.strides[1:], strict=True):
            layers.append(_conv(cin, cout, stride=st))
        self.features = nn.Sequential(*layers)
        h = cfg.hidden
        n = cfg.head_sizes()
        self.global_mlp = nn.Sequential(nn.Linear(2 * c[-1], h), nn.ReLU(inplace=True))
        self.global_heads = nn.ModuleDict(
            {k: nn.Linear(h, n[k]) for k in ("obj1_present", "background", "texture")}
        )
        self.attn = nn.Sequential(
            nn.Conv2d(c[-1] + 2, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 2, 1),
        )
        self.obj_mlp = nn.Sequential(nn.Linear(c[-1], h), nn.ReLU(inplace=True))
        self.shape_head = nn.Linear(h, n["obj0_shape"])
        # Training-only dense head: per feature cell, the shape under it (or "no object").
        self.dense_shape = nn.Conv2d(c[-1], n["obj0_shape"] + 1, 1)
        # ... and the background texture on cells free of objects.
        self.dense_texture = nn.Conv2d(c[-1], n["texture"], 1)
        self.color_head = nn.Linear(h, n["obj0_color"])
        lin = torch.linspace(-1.0, 1.0, cfg.image_size)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self.register_buffer("coords", torch.stack([xx, yy])[None], persistent=False)

    def forward(self, x: torch.Tensor, aux: bool = False) -> dict[str, torch.Tensor]:
        """Logits per attribute; with ``aux`` also the training-only dense outputs."""
        b = x.shape[0]
        x = x * 2.0 - 1.0
        x = torch.cat([x, self.coords.expand(b, -1, -1, -1)], dim=1)
        f = self.features(x)  # (b, c, s, s)
        fl = f.flatten(2)  # (b, c, s*s)
        g = self.global_mlp(torch.cat([fl.mean(2), fl.amax(2)], dim=1))
        out = {k: head(g) for k, head in self.global_heads.items()}
        pc = F.adaptive_avg_pool2d(self.coords, f.shape[-2:]).expand(b, -1, -1, -1)
        a_logits = self.attn(torch.cat([f, pc], dim=1)).flatten(2)  # (b, 2, s*s)
        a = a_logits.softmax(-1)
        z = self.obj_mlp(torch.einsum("bkn,bcn->bkc", a, fl))  # (b, 2, h)
        shape = self.shape_head(z)
        color = self.color_head(z)
        out["obj0_shape"], out["obj1_shape"] = shape[:, 0], shape[:, 1]
        out["obj0_color"], out["obj1_color"] = color[:, 0], color[:, 1]
        if aux:
            out["attn_logits"] = a_logits
            out["dense_shape"] = self.dense_shape(f)
            out["dense_texture"] = self.dense_texture(f)
        return out


# --------------------------------------------------------------------------------------------
# Labels and data
# --------------------------------------------------------------------------------------------


def scene_labels(scenes: Sequence[Scene | dict[str, Any]], cfg: JudgeConfig) -> dict[str, Any]:
    """Integer labels per attribute (LongTensor (n,)); -100 where an attribute is absent."""
    out = {k: [] for k in ATTRIBUTES}
    for s in scenes:
        s = s if isinstance(s, Scene) else Scene.from_dict(s)
        objs = s.objects
        o0 = objs[0] if objs else None
        o1 = objs[1] if len(objs) > 1 else None
        out["obj0_shape"].append(cfg.shapes.index(o0.shape) if o0 else -100)
        out["obj0_color"].append(cfg.colors.index(o0.color) if o0 else -100)
        out["obj1_present"].append(1 if o1 else 0)
        out["obj1_shape"].append(cfg.shapes.index(o1.shape) if o1 else -100)
        out["obj1_color"].append(cfg.colors.index(o1.color) if o1 else -100)
        out["background"].append(cfg.backgrounds.index(s.background))
        out["texture"].append(cfg.textures.index(s.texture))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def render_scenes(scenes: Sequence[Scene], size: int = CANVAS) -> torch.Tensor:
    """(n, 3, size, size) float tensor."""
    arr = np.stack([render(s, size) for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild degradations: random blur, colour/brightness jitter, Gaussian noise."""
    n = x.shape[0]
    # Blur half of the batch with a random-width 3x3 Gaussian.
    sigma = torch.rand(n, generator=g) * 0.9 + 0.1
    blur = torch.rand(n, generator=g) < 0.5
    t = torch.tensor([-1.0, 0.0, 1.0])
    k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # (n, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    xb = F.conv2d(
        xp.reshape(1, n * 3, *xp.shape[2:]),
        k2.repeat_interleave(3, 0)[:, None],
        groups=n * 3,
    ).reshape_as(x)
    x = torch.where(blur[:, None, None, None], xb, x)
    # Per-image brightness/contrast and per-channel gain.
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.06
    bias = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.06
    x = x * gain + bias
    # Gaussian noise of random strength.
    std = torch.rand(n, 1, 1, 1, generator=g) * 0.04
    x = x + torch.randn(x.shape, generator=g) * std
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------


def _to_batch(images: Any, size: int) -> torch.Tensor:
    """Accept (B,3,H,W) / (3,H,W) tensors or (B,H,W,3) / (H,W,3) arrays; floats in [0,1]."""
    if isinstance(images, np.ndarray):
        arr = images
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        if arr.ndim == 3:
            arr = arr[None]
        if arr.shape[-1] == 3 and arr.shape[1] != 3:
            arr = arr.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    elif isinstance(images, (list, tuple)):
        return torch.cat([_to_batch(im, size) for im in images])
    else:
        x = images.detach()
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.ndim == 3:
            x = x[None]
        x = x.float().cpu()
    if x.shape[1] != 3:
        raise ValueError(f"expected 3-channel images, got shape {tuple(x.shape)}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.clamp(0.0, 1.0)


class Judge:
    """A trained :class:`JudgeNet` with decoding helpers. Runs on CPU in eval mode."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()
        self.cfg = net.cfg

    @staticmethod
    def load(path: str | os.PathLike[str] | None = None) -> Judge:
        """Load weights and config from a safetensors file (default: the packaged judge)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path) if path is not None else DEFAULT_PATH
        if not p.is_file():
            raise FileNotFoundError(
                f"judge weights not found at {p}; train them with dds.world.judge.train_judge"
            )
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = JudgeConfig.from_json(meta["config"]) if "config" in meta else JudgeConfig()
        net = JudgeNet(cfg)
        net.load_state_dict(load_file(str(p)))
        return Judge(net)

    @property
    def training_info(self) -> dict[str, Any]:
        return dict(self.cfg.training)

    @torch.no_grad()
    def logits(self, images: Any, batch_size: int = 256) -> dict[str, torch.Tensor]:
        x = _to_batch(images, self.cfg.image_size)
        outs: dict[str, list[torch.Tensor]] = {}
        for i in range(0, x.shape[0], batch_size):
            for k, v in self.net(x[i : i + batch_size]).items():
                outs.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in outs.items()}

    def predict_indices(self, images: Any) -> dict[str, np.ndarray]:
        return {k: v.argmax(1).numpy() for k, v in self.logits(images).items()}

    def predict(self, images: Any) -> list[dict[str, Any]]:
        """Per image: ``{"objects": [{"shape", "color"}, ...], "background", "texture"}``."""
        p = self.predict_indices(images)
        c = self.cfg
        out = []
        for i in range(len(p["texture"])):
            objs = [{"shape": c.shapes[p["obj0_shape"][i]], "color": c.colors[p["obj0_color"][i]]}]
            if p["obj1_present"][i] == 1:
                objs.append(
                    {"shape": c.shapes[p["obj1_shape"][i]], "color": c.colors[p["obj1_color"][i]]}
                )
            out.append(
                {
                    "objects": objs,
                    "n_objects": len(objs),
                    "background": c.backgrounds[p["background"][i]],
                    "texture": c.textures[p["texture"][i]],
                }
            )
        return out

    def attribute_accuracy(
        self, images: Any, scenes: Sequence[Scene | dict[str, Any]]
    ) -> dict[str, float]:
        """Accuracy per attribute (slot-1 shape/colour only over scenes with two objects)."""
        p = self.predict_indices(images)
        y = scene_labels(scenes, self.cfg)
        return _accuracies(p, y)

    def edit_success(self, images: Any, edits: Sequence[Edit]) -> np.ndarray:
        """Per image: was the edited attribute read as the edit's target value?

        object_color / object_shape: the edited slot's colour / shape; background_color: the
        background; add_object / remove_object: the object count.
        """
        preds = self.predict(images)
        if len(preds) != len(edits):
            raise ValueError(f"{len(preds)} images for {len(edits)} edits")
        ok = np.zeros(len(edits), dtype=bool)
        for i, (p, e) in enumerate(zip(preds, edits, strict=True)):
            if e.kind in ("object_color", "object_shape"):
                key = "color" if e.kind == "object_color" else "shape"
                objs = p["objects"]
                ok[i] = e.obj_index < len(objs) and objs[e.obj_index][key] == e.new_value
            elif e.kind == "background_color":
                ok[i] = p["background"] == e.new_value
            elif e.kind in ("add_object", "remove_object"):
                ok[i] = p["n_objects"] == len(e.target.objects)
            else:
                raise ValueError(f"unknown edit kind {e.kind!r}")
        return ok


    def edit_success_placed(self, images: Any, edits: Sequence[Edit]) -> np.ndarray:
        """Per image: the edited attribute read right (:meth:`edit_success`) AND the edited
        object where the truth's is (:func:`dds.world.placement.edit_placed`: silhouette IoU
        with the truth's object >= 1/2; for shape edits nearer the target shape than the source
        shape; for background edits every object kept)."""
        return self.edit_success(images, edits) & edit_placed(images, edits)


def _accuracies(p: dict[str, np.ndarray], y: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for k in ATTRIBUTES:
        yy = y[k].numpy()
        m = yy != -100
        out[k] = float((p[k][m] == yy[m]).mean()) if m.any() else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _aux_targets(
    scenes: Sequence[Scene], cfg: JudgeConfig, cells: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scene: slot masks pooled to ``cells`` x ``cells`` (b, 2, n), which slots exist
    (b, 2), and the per-cell shape label (b, cells, cells; -100 on barely covered cells)."""
    size = cfg.image_size
    k = size // cells
    masks = np.zeros((len(scenes), 2, size, size), dtype=np.float32)
    shape_ids = np.full((len(scenes), 2), -1, dtype=np.int64)
    for i, s in enumerate(scenes):
        m = object_masks(s, size)
        masks[i, : len(m)] = m
        for j, o in enumerate(s.objects):
            shape_ids[i, j] = cfg.shapes.index(o.shape)
    pooled = masks.reshape(len(scenes), 2, cells, k, cells, k).mean(axis=(3, 5))
    present = (shape_ids >= 0).astype(np.float32)
    cover = pooled.sum(1)
    dense = np.full((len(scenes), cells, cells), len(cfg.shapes), dtype=np.int64)
    best = pooled.argmax(1)
    ids = np.take_along_axis(
        shape_ids[:, :, None, None].repeat(cells, 2).repeat(cells, 3), best[:, None], 1
    )[:, 0]
    dense = np.where(cover >= 0.25, ids, dense)
    dense = np.where((cover > 0.02) & (cover < 0.25), -100, dense)
    return (
        torch.from_numpy(pooled.reshape(len(scenes), 2, -1)),
        torch.from_numpy(present),
        torch.from_numpy(dense),
    )


def _aux_loss(
    out: dict[str, torch.Tensor], scenes: Sequence[Scene], cfg: JudgeConfig
) -> torch.Tensor:
    """Dense shape and texture labels, slot-attention targets (the slot's own object mask)."""
    cells = out["dense_shape"].shape[-1]
    pooled, present, dense = _aux_targets(scenes, cfg, cells)
    loss = F.cross_entropy(out["dense_shape"], dense, ignore_index=-100)
    tex = torch.tensor([cfg.textures.index(s.texture) for s in scenes])
    free = dense == len(cfg.shapes)  # cells without objects
    tex_dense = torch.where(free, tex[:, None, None].expand_as(dense), -100)
    loss = loss + F.cross_entropy(out["dense_texture"], tex_dense, ignore_index=-100)
    target = pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-6)
    logp = out["attn_logits"].log_softmax(-1)
    attn = -(target * logp).sum(-1)  # (b, 2)
    return loss + 0.5 * (attn * present).sum() / present.sum().clamp_min(1.0)


def _held_out(seed: int, n: int, size: int) -> tuple[torch.Tensor, list[Scene]]:
    rng = np.random.default_rng([seed, 7_777_777])
    scenes = [sample_scene(rng) for _ in range(n)]
    return render_scenes(scenes, size), scenes


def train_judge(
    out_path: str | os.PathLike[str],
    steps: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    lr: float = 3e-3,
    n_eval: int = 2000,
    cfg: JudgeConfig | None = None,
) -> dict[str, float]:
    """Train a judge from scratch on freshly rendered scenes; save it; return held-out accuracy.

    Deterministic given ``seed`` (and the number of torch threads). The held-out set is
    ``n_eval`` clean renders from a seed stream disjoint from the training stream.
    """
    cfg = cfg or JudgeConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    net = JudgeNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    net.train()
    for step in range(steps):
        scenes = [sample_scene(rng) for _ in range(batch_size)]
        x = _augment(render_scenes(scenes, cfg.image_size), g)
        y = scene_labels(scenes, cfg)
        out = net(x, aux=True)
        loss = sum(F.cross_entropy(out[k], y[k], ignore_index=-100) for k in ATTRIBUTES)
        loss = loss + _aux_loss(out, scenes, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    net.eval()
    judge = Judge(net)
    xe, se = _held_out(seed, n_eval, cfg.image_size)
    acc = judge.attribute_accuracy(xe, se)
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "n_eval": n_eval,
        "held_out_accuracy": acc,
        "train_seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    cfg = JudgeConfig(**{**asdict(cfg), "training": info})
    net.cfg = cfg
    save_judge(net, out_path)
    if progress:
        print("held-out accuracy:", json.dumps(acc), flush=True)
    return acc


def save_judge(net: JudgeNet, path: str | os.PathLike[str]) -> None:
    """Save weights with the config JSON in the safetensors metadata (atomic replace)."""
    from safetensors.torch import save_file

    from dds.atomic import atomic_path

    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": net.cfg.to_json(), "format": "pt"})
