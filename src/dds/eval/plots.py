"""Figures of the evaluations: matplotlib plots drawn on their own Agg canvas (files only; no
pyplot, so importing or drawing never changes the process's matplotlib backend), and the
labelled image grids of samples and edits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"dds": "tab:blue", "sds": "tab:orange", "sdedit": "tab:green",
          "ddim-inversion": "tab:red", "no-edit": "black", "round-trip": "tab:gray"}


def _figure(figsize):
    """A figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Save atomically (temp file, then rename)."""
    from dds.atomic import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def band_lines(path, x, series: dict[str, tuple], xlabel: str, ylabel: str, title: str,
               ylim=None) -> Path:
    """Lines with shaded mean ± spread bands; series: label -> (mean, spread)."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    for label, (m, s) in series.items():
        m, s = np.asarray(m), np.asarray(s)
        (line,) = ax.plot(x, m, marker="o", ms=3, label=label)
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.title.set_fontsize(9)
    return _save(fig, path)


def frontier(path, curves: dict[str, list[tuple]], xlabel: str, ylabel: str, title: str,
             invert_x: bool = False) -> Path:
    """Fidelity (y) vs preservation (x) curves; each point (x, y, setting) labelled."""
    fig = _figure((6.5, 4.5))
    ax = fig.subplots()
    for name, pts in curves.items():
        if not pts:
            continue
        xs, ys, vs = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=name, color=COLORS.get(name))
        for x, y, v in pts:
            ax.annotate(f"{v:g}" if isinstance(v, (int, float)) else str(v), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                        color=COLORS.get(name))
    ax.set(xlabel=xlabel + (" (better to the left)" if invert_x else " (better to the right)"),
           ylabel=ylabel + " (better up)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.title.set_fontsize(9)
    return _save(fig, path)


def metric_vs_setting(path, curves: dict[str, list[tuple]], xlabel: str, ylabel: str, title: str,
                      separate: bool = False, vline: float | None = None) -> Path:
    """curves: name -> [(x, y)].  separate: one panel per name (different units)."""
    names = [k for k, v in curves.items() if v]
    n = len(names) if separate else 1
    fig = _figure((4 * n if separate else 6, 3.8))
    axes = fig.subplots(1, n, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0, i if separate else 0]
        xs, ys = zip(*curves[name], strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=name, color=None if separate else COLORS.get(name))
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=7)
        ax.minorticks_off()
        if vline is not None:
            ax.axvline(vline, color="gray", ls="--", lw=1)
        ax.set(xlabel=xlabel, ylabel=name if separate else ylabel)
        ax.grid(alpha=0.3)
    if not separate:
        axes[0, 0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def curves_by_panel(path, curves: dict[str, list[tuple]], panels: list[str],
                    reference: dict[str, tuple] | None = None, xlabel: str = "",
                    title: str = "") -> Path:
    """One panel per metric; curves: "METRIC: name" -> [(x, y)] drawn in METRIC's panel;
    reference: metric -> (x, y) marked with a star."""
    fig = _figure((4.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, m in enumerate(panels):
        ax = axes[i]
        for label, pts in curves.items():
            if label.split(": ", 1)[0] != m or not pts:
                continue
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(xs, ys, marker="o", ms=4, label=label.split(": ", 1)[1])
        if reference and m in reference:
            ax.plot(*reference[m], marker="*", ms=12, color="black", ls="none",
                    label="reference recipe")
        xs = sorted({x for pts in curves.values() for x, _ in pts}
                    | ({reference[m][0]} if reference and m in reference else set()))
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=7)
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel=m)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def drift(path, steps, curves: dict[str, dict[str, tuple]], title: str) -> Path:
    """Two panels (PSNR to the source, latent L2) vs step; curves: method -> metric -> (m, s)."""
    from dds.eval.metrics import get_metric

    fig = _figure((9, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("psnr_source", "latent_l2"), strict=True):
        label = get_metric(metric).label
        for method, d in curves.items():
            m, s = (np.asarray(a) for a in d[metric])
            ax.plot(steps, m, marker="o", ms=3, label=f"{method.upper()}, source caption",
                    color=COLORS.get(method))
            ax.fill_between(steps, m - s, m + s, color=COLORS.get(method), alpha=0.2)
        ax.set(xlabel="iteration", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def grid_image(rows: list[list[np.ndarray]], header: list[str], labels: list[str],
               scale: int = 3) -> Image.Image:
    """A labelled grid of (H,W,3) float images in [0,1], each upscaled `scale` times."""
    h, w = rows[0][0].shape[:2]
    cw, ch = w * scale, h * scale
    left, top, pad = 8, 22, 4
    text_h = 14
    W = left + len(header) * (cw + pad)
    H = top + len(rows) * (ch + text_h + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(header):
        draw.text((left + j * (cw + pad), 4), name, fill="black")
    for i, row in enumerate(rows):
        y = top + i * (ch + text_h + pad)
        draw.text((left, y), labels[i], fill="black")
        for j, img in enumerate(row):
            a = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
            tile = Image.fromarray(a).resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + j * (cw + pad), y + text_h))
    return canvas
