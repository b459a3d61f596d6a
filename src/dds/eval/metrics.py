"""Image metrics on (B,3,H,W) tensors in [0,1] (PSNR and SSIM, optionally over a region), and
the registry of every metric the evaluations report (`METRICS`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dds.errors import DDSError


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


# ---- the registry ------------------------------------------------------------------------------
# Every metric an evaluation reports is registered once, with how to compute it and how to read
# it; tables, plots and reports take labels, formats and directions from here.
@dataclass
class References:
    """What outputs are scored against; each tensor or list has one row per edit.

    source: (N,3,H,W) source images in [0,1]; truth: the exact edited images (built-in world);
    outside: (N,H,W) weight of the pixels an edit must keep; edits and judge: world edits and
    the judge that reads them; targets, clip, lpips: target captions and the models of the
    real-image metrics; z_source: (N,C,h,w) source latents.
    """

    source: Tensor
    truth: Tensor | None = None
    outside: Tensor | None = None
    edits: list | None = None
    judge: Any = None
    targets: list[str] | None = None
    clip: Any = None
    lpips: Any = None
    z_source: Tensor | None = None

    def __getitem__(self, sl: slice) -> References:
        return replace(self, **{f.name: getattr(self, f.name)[sl] for f in fields(self)
                                if isinstance(getattr(self, f.name), (Tensor, list))})


@dataclass(frozen=True)
class Metric:
    """name: the key in tables; fn(outputs, refs) -> per-edit values (N,); outputs are images
    (N,3,H,W) in [0,1] unless `on` says latents.  label: axis title; short: column title;
    spec: format spec of one value; doc: one line for reports; binary: per-edit values are 0/1
    (a success), so its mean is a proportion (`dds.eval.paired` picks its interval by this)."""

    name: str
    fn: Callable[[Tensor, References], np.ndarray]
    higher_is_better: bool
    label: str
    short: str
    spec: str = ".3f"
    doc: str = ""
    on: str = "images"
    binary: bool = False

    def format(self, v) -> str:
        if v is None or not np.isfinite(v):
            return "nan"
        return f"{v:{self.spec}}"

    def best(self, values):
        """The best of `values` by this metric's direction (None when there are none)."""
        vals = [v for v in values if v is not None and np.isfinite(v)]
        if not vals:
            return None
        return max(vals) if self.higher_is_better else min(vals)

    def sign(self) -> float:
        """+1 or -1: multiplied in, larger is better."""
        return 1.0 if self.higher_is_better else -1.0


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    METRICS[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise DDSError(f"unknown metric '{name}'; known: {', '.join(METRICS)}")
    return METRICS[name]


def score_outputs(outputs: Tensor, refs: References, names) -> dict[str, np.ndarray]:
    """Per-edit values of the metrics `names` (in that order) for outputs of edits `refs`."""
    return {k: np.asarray(get_metric(k).fn(outputs, refs)) for k in names}


def _success(x, r):
    return r.judge.edit_success(x, r.edits).astype(float)


def _success_placed(x, r):
    return r.judge.edit_success_placed(x, r.edits).astype(float)


def _psnr_gain(x, r):
    """PSNR to the truth of the output less that of the source ('no edit'), per edit."""
    return (psnr(x, r.truth) - psnr(r.source, r.truth)).numpy()


def _clip(x, r):
    from dds.eval.clip_score import clip_score

    return clip_score(r.clip[0], r.clip[1], x, r.targets).numpy()


def _lpips(x, r):
    from dds.eval.lpips import lpips_distance

    return lpips_distance(r.lpips, x, r.source).numpy()


def _latent_l2(z, r):
    return (z.float().cpu() - r.z_source).flatten(1).norm(dim=1).numpy()


for _m in (
    Metric("success_pos", _success_placed, True, "edit success (judge and position)",
           "success (placed)", ".1%",
           "judge reads the edited attribute as its target value AND the edited object is where "
           "the truth's is (silhouette IoU >= 0.5; shape edits nearer the target shape than the "
           "source's; background edits keep every object)", binary=True),
    Metric("success", _success, True, "edit success (judge, attribute only)",
           "success (attribute)", ".1%",
           "judge reads the edited attribute as its target value, wherever the object is",
           binary=True),
    Metric("psnr_gt", lambda x, r: psnr(x, r.truth).numpy(), True,
           "PSNR to the exact ground truth (dB)", "PSNR to ground truth", ".2f",
           "PSNR (dB) to the exact ground-truth re-render"),
    Metric("psnr_gain", _psnr_gain, True, "PSNR gain over no edit (dB)", "PSNR gain", "+.2f",
           "PSNR to the truth less the source's own PSNR to the truth, per edit (dB; > 0: the "
           "edit moved the image towards the truth)"),
    Metric("psnr_out", lambda x, r: psnr(x, r.source, r.outside).numpy(), True,
           "PSNR outside the edit (dB)", "PSNR outside edit", ".2f",
           "PSNR (dB) to the source outside the edited region (preservation)"),
    Metric("ssim_out", lambda x, r: ssim(x, r.source, r.outside).numpy(), True,
           "SSIM outside the edit", "SSIM outside edit", ".3f",
           "SSIM to the source outside the edited region"),
    Metric("clip", _clip, True, "CLIP score to the target", "CLIP score", ".3f",
           "CLIP score of the output and the target caption (100 x cosine)"),
    Metric("lpips", _lpips, False, "LPIPS to the source (lower = closer)", "LPIPS", ".3f",
           "LPIPS (AlexNet) between the output and the source (lower keeps more)"),
    Metric("psnr_source", lambda x, r: psnr(x, r.source).numpy(), True,
           "PSNR to the source (dB)", "PSNR to source", ".2f",
           "PSNR (dB) of the whole output to the source image"),
    Metric("latent_l2", _latent_l2, False, "||z - z_source||_2", "latent L2", ".3f",
           "L2 distance of the latent from the source latent", on="latents"),
):
    register_metric(_m)

WORLD_METRICS = ("success_pos", "success", "psnr_gt", "psnr_gain", "psnr_out", "ssim_out")
REAL_METRICS = ("clip", "lpips")
# What two methods are compared by, edit by edit (`dds.eval.paired`).
WORLD_COMPARED = ("success_pos", "psnr_gain", "ssim_out")
REAL_COMPARED = REAL_METRICS
