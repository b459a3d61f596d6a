"""LPIPS perceptual distance (Zhang et al. 2018, AlexNet variant v0.1), with offline weights.

Nothing here downloads.  Two pieces of weights are needed:
- the AlexNet trunk (ImageNet-trained `features`), a local file the user gives (`--lpips-trunk`):
  a torchvision `alexnet` state dict (`features.N.weight` keys, or the bare `N.weight` keys of
  `features` alone), as .pth or .safetensors;
- the five 1x1 linear layers, read from the `lpips` wheel (`lpips/weights/v0.1/alex.pth`),
  which installs without its dependencies (`pip install --no-deps lpips`).

When the `lpips` package itself imports (it needs torchvision and scipy) we use its network;
otherwise an equivalent one written here: the same scaling layer, channel-unit normalisation,
squared difference, 1x1 linear layers, spatial mean and sum over the five ReLU outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from dds.errors import DDSError

CHANNELS = (64, 192, 384, 256, 256)
# Index ranges of torchvision's alexnet().features that end at relu1..relu5 (LPIPS's slices).
SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))


def alexnet_features() -> nn.Sequential:
    """torchvision's `alexnet().features`, layer for layer (so its state dict loads)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def packaged_linear_weights() -> Path | None:
    """Path of `alex.pth` inside the installed `lpips` wheel, or None when it is absent."""
    spec = importlib.util.find_spec("lpips")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "weights" / "v0.1" / "alex.pth"
        if p.is_file():
            return p
    return None


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def trunk_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The AlexNet `features` weights from a local file, keyed as `features` alone ("0.weight")."""
    p = Path(path)
    if not p.is_file():
        raise DDSError(f"LPIPS trunk weights '{p}' not found; give a local AlexNet state dict "
                       "(torchvision alexnet .pth or .safetensors) with --lpips-trunk")
    try:
        sd = _load_state(p)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise DDSError(f"LPIPS trunk weights '{p}' cannot be read ({e})") from None
    out = {k.removeprefix("features."): v for k, v in sd.items()
           if k.startswith("features.") or k.split(".")[0].isdigit()}
    if "0.weight" not in out:
        raise DDSError(f"'{p}' holds no AlexNet 'features' weights; give torchvision's alexnet "
                       "state dict with --lpips-trunk")
    return out


class LPIPS(nn.Module):
    """LPIPS distance d(x0, x1) per image; inputs (B,3,H,W) in [0,1] (H, W >= 32)."""

    def __init__(self, trunk: dict[str, Tensor] | None = None,
                 linear: dict[str, Tensor] | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = alexnet_features()
        if trunk is not None:
            self.features.load_state_dict(trunk)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        for k, lin in enumerate(self.lins):
            w = linear[f"lin{k}.model.1.weight"] if linear is not None else None
            lin.weight.data.copy_(w if w is not None else torch.full_like(lin.weight, 1.0 / CHANNELS[k]))
        self.requires_grad_(False).eval()

    def _feats(self, x: Tensor) -> list[Tensor]:
        h = (x * 2 - 1 - self.shift) / self.scale  # the scaling layer, on [-1,1] input
        out = []
        for a, b in SLICES:
            h = self.features[a:b](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit over channels
        return out

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        f0, f1 = self._feats(x0.float()), self._feats(x1.float())
        d = [lin((a - b).pow(2)).mean((2, 3)) for lin, a, b in zip(self.lins, f0, f1, strict=True)]
        return torch.stack(d).sum(0).flatten()  # (B,)


class _PackageLPIPS(nn.Module):
    """The `lpips` package's network with a locally loaded trunk; inputs in [0,1]."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return self.net(x0.float(), x1.float(), normalize=True).flatten()


def load_lpips(trunk_path: str | Path | None, allow_uniform: bool = False) -> nn.Module:
    """An LPIPS module from local weights; one clear DDSError when any are missing.

    `allow_uniform` (tests only) replaces missing linear-layer weights by uniform ones.
    """
    if trunk_path is None:
        raise DDSError("LPIPS needs AlexNet trunk weights that cannot be downloaded here; give "
                       "a local torchvision alexnet state dict with --lpips-trunk PATH")
    trunk = trunk_state_dict(trunk_path)
    try:
        import lpips as lpips_pkg  # needs torchvision and scipy
    except Exception:  # noqa: BLE001 - any import failure means: use our own network
        lpips_pkg = None
    if lpips_pkg is not None:
        net = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        for k, (a, b) in enumerate(SLICES, 1):
            sl = getattr(net.net, f"slice{k}")
            sl.load_state_dict({f"{i}.{n}": trunk[f"{i}.{n}"]
                                for i in range(a, b) for n in ("weight", "bias")
                                if f"{i}.{n}" in trunk})
        return _PackageLPIPS(net)
    lin_path = packaged_linear_weights()
    if lin_path is None and not allow_uniform:
        raise DDSError("LPIPS linear-layer weights not found; install them with "
                       "`pip install --no-deps lpips` (they ship inside its wheel)")
    return LPIPS(trunk, _load_state(lin_path) if lin_path else None)


@torch.no_grad()
def lpips_distance(model: nn.Module, x0: Tensor, x1: Tensor, batch_size: int = 32) -> Tensor:
    """Per-image LPIPS (B,) between two (B,3,H,W) batches in [0,1], with an injected model."""
    out = [model(x0[i:i + batch_size], x1[i:i + batch_size]).cpu()
           for i in range(0, x0.shape[0], batch_size)]
    return torch.cat(out)
