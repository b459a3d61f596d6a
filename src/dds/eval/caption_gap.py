"""The caption gap: how much each caption word lowers a model's own noise-prediction loss.

A judge's reading of generated samples sits at chance until a model draws an attribute well
enough to be read; the training objective shows a word's use long before. Held-out one-object
scenes are noised to a timestep t (one fixed noise per scene), and the conditional noise
prediction is scored against the true noise under the scene's own caption and under the same
caption with one word changed (the caption of a one-attribute edit):

    gap(word, t) = MSE(eps(z_t, caption with the word changed), noise) - MSE(eps(z_t, caption), noise)

per scene (paired: the same scene, noise and t), over the whole latent and over the latent cells
the object covers (weighted by its coverage). A gap whose 95% interval includes zero is a word
the model does not use at that noise level.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dds.score import noise_input

# word -> the edit kind whose target caption changes exactly that word
WORD_EDITS = {"shape": "object_shape", "colour": "object_color", "background": "background_color"}
REGIONS = ("whole", "object")


def gap_scenes(n: int, seed: int, upright: bool = False) -> tuple[list, dict[str, list[str]]]:
    """``n`` held-out one-object scenes and their captions: "own", one per changed word of
    `WORD_EDITS`, and "empty". ``upright`` turns every object to angle 0."""
    from dds.world import make_edit, sample_scene

    rng = np.random.default_rng([seed, 6])
    scenes = [sample_scene(rng, n_objects=1) for _ in range(n)]
    if upright:
        scenes = [replace(s, objects=tuple(replace(o, angle=0.0) for o in s.objects))
                  for s in scenes]
    edits = {w: [make_edit(s, kind, rng) for s in scenes] for w, kind in WORD_EDITS.items()}
    captions = {"own": [e.source_caption for e in edits["shape"]],
                **{w: [e.target_caption for e in es] for w, es in edits.items()},
                "empty": [""] * n}
    return scenes, captions


def object_cover(scenes, latent_size: int, image_size: int = 64) -> Tensor:
    """(B,1,h,w): the share of each latent cell that the scene's objects cover."""
    from dds.world.scene import object_masks

    cover = np.stack([object_masks(s, image_size).max(axis=0, initial=0.0) for s in scenes])
    return F.adaptive_avg_pool2d(torch.from_numpy(cover)[:, None], latent_size)


def per_scene_mse(pred: Tensor, noise: Tensor, cover: Tensor) -> dict[str, np.ndarray]:
    """Squared error per scene: the whole latent's mean, and the object cells' mean weighted
    by ``cover`` (B,1,h,w)."""
    err = (pred.float() - noise).square().mean(dim=1, keepdim=True)
    obj = (err * cover).sum(dim=(1, 2, 3)) / cover.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    return {"whole": err.mean(dim=(1, 2, 3)).numpy(), "object": obj.numpy()}


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval: the paired t interval every paired figure
    of the project uses (`dds.eval.paired`)."""
    from dds.eval.paired import paired_t_interval

    low, high = paired_t_interval(x)
    return float(np.mean(x)), (high - low) / 2


@torch.no_grad()
def caption_gaps(model, scenes, captions: dict[str, list[str]], timesteps, seed: int,
                 batch: int = 64) -> list[dict[str, Any]]:
    """One row per (t, region): the own caption's MSE and, per changed caption, the gap's mean
    and 95% half-width, both x 1000. ``model``: any backend of `dds.models` (encode,
    encode_prompt, predict_eps, schedule_for); ``scenes`` are rendered at 64x64."""
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import images_of

    z0 = torch.cat([encode01(model, images_of(scenes[i:i + batch]))
                    for i in range(0, len(scenes), batch)])
    schedule = model.schedule_for(z0.shape)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    cover = object_cover(scenes, z0.shape[-1])
    conds = {k: model.encode_prompt(v) for k, v in captions.items()}
    rows = []
    for t_value in timesteps:
        t = torch.full((len(scenes),), int(t_value), dtype=torch.long)
        z_t = noise_input(z0, noise, t, schedule)
        mse = {}
        for key, cond in conds.items():
            parts = [per_scene_mse(model.predict_eps(z_t[i:i + batch].to(model.device),
                                                     t[i:i + batch].to(model.device),
                                                     cond[i:i + batch]).cpu(),
                                   noise[i:i + batch], cover[i:i + batch])
                     for i in range(0, len(scenes), batch)]
            mse[key] = {r: np.concatenate([p[r] for p in parts]) for r in REGIONS}
        for region in REGIONS:
            own = mse["own"][region]
            row: dict[str, Any] = {"t": int(t_value), "region": region,
                                   "own_mse": float(own.mean())}
            for key in (k for k in conds if k != "own"):
                m, h = mean_ci(1000.0 * (mse[key][region] - own))
                row[key] = {"gap_x1000": m, "ci95": h}
            rows.append(row)
    return rows


def unet_blocks(unet) -> dict[str, torch.nn.Module]:
    """The blocks of a diffusers ``UNet2DConditionModel`` in the order a call runs them."""
    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks["mid"] = unet.mid_block
    return {**blocks, **{f"up{i}": b for i, b in enumerate(unet.up_blocks)}}


@torch.no_grad()
def word_flow(unet, z_t: Tensor, t: Tensor, states: dict[str, Tensor],
              cover: Tensor) -> dict[str, dict[str, float]]:
    """How far a changed caption travels through a diffusers ``UNet2DConditionModel``.

    ``states``: the text encoder's token states of the scenes' own captions ("own") and of each
    changed caption; ``cover`` (B,1,H,W): the objects' coverage at any resolution. Per block
    (`unet_blocks`) and for the noise prediction ("eps"): the change of the block's output when
    the own states are replaced by another caption's, as a share of the own output, both as
    channel norms weighted by the coverage pooled to the block's grid, averaged over scenes.
    A block that runs before the first cross-attention reads exactly 0; a word the network
    carries but does not draw fades between the coarse blocks and "eps".
    """
    blocks = unet_blocks(unet)
    seen: dict[str, Tensor] = {}
    hooks = [b.register_forward_hook(
        lambda mod, args, out, k=k: seen.__setitem__(k, out[0] if isinstance(out, tuple) else out))
        for k, b in blocks.items()]
    outs = {}
    try:
        for key, s in states.items():
            seen.clear()
            eps = unet(z_t, t, encoder_hidden_states=s).sample
            outs[key] = {**seen, "eps": eps}
    finally:
        for h in hooks:
            h.remove()
    flow: dict[str, dict[str, float]] = {}
    for name, own in outs["own"].items():
        w = F.adaptive_avg_pool2d(cover.to(own), own.shape[-1])
        w = w / w.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        base = _weighted_norm(own, w).clamp_min(1e-12)
        flow[name] = {k: float((_weighted_norm(o[name] - own, w) / base).mean())
                      for k, o in outs.items() if k != "own"}
    return flow


def _weighted_norm(x: Tensor, w: Tensor) -> Tensor:
    """Per scene: the channel norm of x (B,C,H,W) averaged over cells with weights w (B,1,H,W)."""
    return (x.float().norm(dim=1, keepdim=True) * w).sum(dim=(1, 2, 3))
