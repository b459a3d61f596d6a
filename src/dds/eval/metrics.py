"""Image metrics on (B,3,H,W) tensors in [0,1]: PSNR and SSIM, optionally over a region."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def as_tensor(x) -> Tensor:
    """(B,H,W,3)/(B,3,H,W) array or tensor in [0,1] -> (B,3,H,W) float32 tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    return t


def dilate(mask: Tensor, px: int) -> Tensor:
    """Grow a (B,H,W) mask in [0,1] by `px` pixels (max filter)."""
    if px <= 0:
        return mask
    return F.max_pool2d(mask.unsqueeze(1), 2 * px + 1, stride=1, padding=px).squeeze(1)


def outside(mask, px: int = 2) -> Tensor:
    """Weight (B,H,W) of the pixels clearly outside a region: 1 - dilate(mask > 0.01, px).

    The margin keeps anti-aliased edges and the autoencoder's blur at an edge out of
    'unedited' pixels.
    """
    m = torch.as_tensor(np.asarray(mask)).float()
    m = m.unsqueeze(0) if m.ndim == 2 else m
    return 1.0 - dilate((m > 0.01).float(), px)


def psnr(a, b, weight=None, peak: float = 1.0) -> Tensor:
    """Per-image PSNR in dB; with `weight` (B,H,W), the MSE is the weighted mean."""
    a, b = as_tensor(a), as_tensor(b)
    se = (a - b).pow(2).mean(1)  # (B,H,W)
    if weight is None:
        mse = se.flatten(1).mean(1)
    else:
        w = torch.as_tensor(weight).float().expand_as(se)
        mse = (se * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(a, b, weight=None, peak: float = 1.0) -> Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5), averaged over the
    channels and over the pixels (weighted by `weight` (B,H,W) when given)."""
    a, b = as_tensor(a), as_tensor(b)
    win = _gaussian_window().to(a)
    pad = win.shape[-1] // 2

    def blur(x):
        return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), win, groups=3)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    s = s.mean(1)  # (B,H,W)
    if weight is None:
        return s.flatten(1).mean(1)
    w = torch.as_tensor(weight).float().expand_as(s)
    return (s * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
