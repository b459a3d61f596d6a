"""Edits on the built-in world, scored against their exact ground truth.

Every edit changes one attribute of a procedural scene; the re-render of the edited scene is
the exact answer.  A method's output is scored by
- success: the judge reads the edited attribute as its target value (text fidelity);
- psnr_gt: PSNR to the ground-truth re-render (the whole image);
- psnr_out / ssim_out: PSNR and SSIM to the source outside the edited region (preservation of
  what the prompt does not mention: texture, position, the other object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dds.loop import EditConfig, edit_latents
from dds.eval.metrics import outside, psnr, ssim
from dds.progress import progress_bar
from dds.world import Edit, edit_mask, render, sample_edit

# Seeds of held-out evaluation scenes live far from the training seeds (0..99).
HELD_OUT_SEED = 10_000
EDIT_KINDS_MAIN = ("object_color", "object_shape", "background_color")


def held_out_edits(n_per_kind: int, kinds: Sequence[str] = EDIT_KINDS_MAIN,
                   seed: int = HELD_OUT_SEED) -> list[Edit]:
    """`n_per_kind` random edits of each kind, deterministic in `seed`."""
    out = []
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, k])
        out += [sample_edit(rng, kind) for _ in range(n_per_kind)]
    return out


def images_of(scenes) -> torch.Tensor:
    """Scenes -> (B,3,64,64) in [0,1]."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float()


@dataclass
class Prepared:
    """Source latents and prompt embeddings for a list of edits."""

    z_hat: torch.Tensor
    emb_source: torch.Tensor
    emb_target: torch.Tensor


def prepare(backend, edits: Sequence[Edit]) -> Prepared:
    x = images_of([e.source for e in edits]) * 2 - 1
    z_hat = torch.cat([backend.encode(x[i:i + 64]) for i in range(0, len(edits), 64)])
    cache: dict[str, torch.Tensor] = {}

    def emb(prompts):
        new = sorted({p for p in prompts if p not in cache})
        if new:
            for p, e in zip(new, backend.encode_prompt(new), strict=True):
                cache[p] = e
        return torch.stack([cache[p] for p in prompts])

    return Prepared(z_hat, emb([e.source_caption for e in edits]),
                    emb([e.target_caption for e in edits]))


def decode01(backend, z: torch.Tensor) -> torch.Tensor:
    out = torch.cat([backend.decode(z[i:i + 64]) for i in range(0, z.shape[0], 64)])
    return ((out.cpu() + 1) / 2).clamp(0, 1)


def run_zero_shot(backend, edits: Sequence[Edit], cfg: EditConfig, batch_size: int = 32,
                  prepared: Prepared | None = None, desc: str = "", quiet: bool = False,
                  step_callback=None) -> torch.Tensor:
    """DDS or SDS on every edit (edit i seeded cfg.seed + i); returns (N,3,64,64) in [0,1]."""
    p = prepared or prepare(backend, edits)
    outs = []
    bar = progress_bar(len(edits) * cfg.steps, desc or cfg.method, quiet=quiet)
    for i in range(0, len(edits), batch_size):
        sl = slice(i, i + batch_size)
        n = p.z_hat[sl].shape[0]

        def cb(step, z, gnorm, n=n, i=i):
            bar.update(n)
            if step_callback is not None:
                return step_callback(i, step, z, gnorm)

        z = edit_latents(backend, p.z_hat[sl], p.emb_source[sl], p.emb_target[sl], cfg,
                         callback=cb, seeds=[cfg.seed + i + j for j in range(n)])
        outs.append(decode01(backend, z))
    bar.close()
    return torch.cat(outs)


def score(images: torch.Tensor, edits: Sequence[Edit], judge) -> dict[str, np.ndarray]:
    """Per-edit metrics (see the module docstring).  images: (N,3,64,64) in [0,1]."""
    src = images_of([e.source for e in edits])
    gt = images_of([e.target for e in edits])
    w_out = torch.stack([outside(edit_mask(e))[0] for e in edits])  # (N,64,64)
    return {
        "success": judge.edit_success(images, edits).astype(float),
        "psnr_gt": psnr(images, gt).numpy(),
        "psnr_out": psnr(images, src, w_out).numpy(),
        "ssim_out": ssim(images, src, w_out).numpy(),
    }


def summarise(metrics: dict[str, np.ndarray], edits: Sequence[Edit]) -> dict[str, dict]:
    """Mean of every metric per edit kind, and over all edits ('all')."""
    kinds = np.array([e.kind for e in edits])
    out = {}
    for kind in [*dict.fromkeys(kinds.tolist()), "all"]:
        sel = kinds == kind if kind != "all" else np.ones(len(kinds), bool)
        out[kind] = {k: float(np.mean(v[sel])) for k, v in metrics.items()}
        out[kind]["n"] = int(sel.sum())
    return out
