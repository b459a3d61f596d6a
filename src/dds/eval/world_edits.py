"""Edits on the built-in world, scored against their exact ground truth.

Every edit changes one attribute of a procedural scene; the re-render of the edited scene is
the exact answer.  A method's output is scored by the metrics `WORLD_METRICS` of the registry
(`dds.eval.metrics`): success with the edited object in the truth's place
(`dds.world.placement`) and the judge's reading of the attribute alone (text fidelity), PSNR to
the ground-truth re-render and its gain over the source's, and PSNR/SSIM to the source outside
the edited region (preservation of what the prompt does not mention: texture, position, the
other object).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dds.eval.metrics import WORLD_METRICS, References, outside, score_outputs
from dds.eval.seeds import HELD_OUT_SEED
from dds.loop import EditConfig, edit_latents
from dds.methods import get_method
from dds.models.base import cat_cond
from dds.progress import progress_bar
from dds.world import Edit, edit_mask, render, sample_edit

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


class PromptTable:
    """Each distinct prompt encoded once; a call returns the conditioning of a prompt list.

    The prompts new to a call are encoded together (sorted, or in order of first use) in
    batches of `chunk` (None: one batch), so a caller's batches are reproducible.
    """

    def __init__(self, model, sort: bool = True, chunk: int | None = None):
        self.model, self.sort, self.chunk = model, sort, chunk
        self.rows: dict[str, object] = {}

    def __call__(self, prompts: Sequence[str]):
        fresh = [p for p in prompts if p not in self.rows]
        new = sorted(set(fresh)) if self.sort else list(dict.fromkeys(fresh))
        size = self.chunk or max(len(new), 1)
        for i in range(0, len(new), size):
            cond = self.model.encode_prompt(new[i:i + size])
            for j, p in enumerate(new[i:i + size]):
                self.rows[p] = cond[j:j + 1]
        return cat_cond([self.rows[p] for p in prompts])


@dataclass
class Prepared:
    """Source latents and prompt conditionings for a list of edits."""

    z_hat: torch.Tensor
    cond_source: object  # Conditioning, one row per edit
    cond_target: object


def prepare(model, edits: Sequence[Edit]) -> Prepared:
    x = images_of([e.source for e in edits]) * 2 - 1
    z_hat = torch.cat([model.encode(x[i:i + 64]) for i in range(0, len(edits), 64)])
    table = PromptTable(model)
    return Prepared(z_hat, table([e.source_caption for e in edits]),
                    table([e.target_caption for e in edits]))


def decode01(model, z: torch.Tensor) -> torch.Tensor:
    out = torch.cat([model.decode(z[i:i + 64]) for i in range(0, z.shape[0], 64)])
    return ((out.cpu() + 1) / 2).clamp(0, 1)


def run_zero_shot(model, edits: Sequence[Edit], cfg: EditConfig, batch_size: int = 32,
                  prepared: Prepared | None = None, desc: str = "",
                  quiet: bool = False) -> torch.Tensor:
    """The configured method on every edit (edit i seeded cfg.seed + i); returns (N,3,64,64)
    in [0,1]."""
    p = prepared or prepare(model, edits)
    outs = []
    bar = progress_bar(len(edits) * get_method(cfg.method).num_steps(cfg), desc or cfg.method,
                       quiet=quiet)
    for i in range(0, len(edits), batch_size):
        sl = slice(i, i + batch_size)
        n = p.z_hat[sl].shape[0]
        z = edit_latents(model, p.z_hat[sl], p.cond_source[sl], p.cond_target[sl], cfg,
                         on_step=lambda info, n=n: bar.update(n),
                         seeds=[cfg.seed + i + j for j in range(n)])
        outs.append(decode01(model, z))
    bar.close()
    return torch.cat(outs)


def world_refs(edits: Sequence[Edit], judge) -> References:
    """What outputs of `edits` are scored against: source, exact truth, outside region."""
    return References(
        source=images_of([e.source for e in edits]), truth=images_of([e.target for e in edits]),
        outside=torch.stack([outside(edit_mask(e))[0] for e in edits]),  # (N,64,64)
        edits=list(edits), judge=judge)


def score(images: torch.Tensor, edits: Sequence[Edit], judge) -> dict[str, np.ndarray]:
    """Per-edit `WORLD_METRICS`.  images: (N,3,64,64) in [0,1]."""
    return score_outputs(images, world_refs(edits, judge), WORLD_METRICS)


def summarise(metrics: dict[str, np.ndarray], edits: Sequence[Edit]) -> dict[str, dict]:
    """Mean of every metric per edit kind, and over all edits ('all')."""
    kinds = np.array([e.kind for e in edits])
    out = {}
    for kind in [*dict.fromkeys(kinds.tolist()), "all"]:
        sel = kinds == kind if kind != "all" else np.ones(len(kinds), bool)
        out[kind] = {k: float(np.mean(v[sel])) for k, v in metrics.items()}
        out[kind]["n"] = int(sel.sum())
    return out
