"""Matplotlib figures of the experiments (Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"dds": "tab:blue", "sds": "tab:orange", "sdedit": "tab:green",
          "ddim-inversion": "tab:red"}


def _save(fig, path: Path) -> Path:
    """Save atomically (temp file, then rename) and close."""
    from dds.atomic import atomic_path

    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def band_lines(path, x, series: dict[str, tuple], xlabel: str, ylabel: str, title: str,
               ylim=None) -> Path:
    """Lines with shaded mean ± spread bands; series: label -> (mean, spread)."""
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in curves.items():
        if not pts:
            continue
        xs, ys, vs = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=name, color=COLORS.get(name))
        for x, y, v in pts:
            ax.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
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
    fig, axes = plt.subplots(1, n, figsize=(4 * n if separate else 6, 3.8), squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0, i if separate else 0]
        xs, ys = zip(*curves[name], strict=True)
        ax.plot(xs, ys, marker="o", ms=4, label=name, color=None if separate else COLORS.get(name))
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=7)
        if vline is not None:
            ax.axvline(vline, color="gray", ls="--", lw=1)
        ax.set(xlabel=xlabel, ylabel=name if separate else ylabel)
        ax.grid(alpha=0.3)
    if not separate:
        axes[0, 0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def drift(path, steps, curves: dict[str, dict[str, tuple]], title: str) -> Path:
    """Two panels (PSNR to the source, latent L2) vs step; curves: method -> metric -> (m, s)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (metric, label) in zip(axes, [("psnr_source", "PSNR to the source (dB)"),
                                          ("latent_l2", "||z - z_source||_2")], strict=True):
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
