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

from dds.score import alpha_sigma, noise_input

# word -> the edit kind whose target caption changes exactly that word
WORD_EDITS = {"shape": "object_shape", "colour": "object_color", "background": "background_color"}
REGIONS = ("whole", "object")


def gap_edits(n: int, seed: int, upright: bool = False) -> tuple[list, dict[str, list]]:
    """``n`` held-out one-object scenes and, per word of `WORD_EDITS`, the edit of each scene
    that changes exactly that word (its ``target`` is the scene re-rendered with it changed).
    ``upright`` turns every object to angle 0."""
    from dds.world import make_edit, sample_scene

    rng = np.random.default_rng([seed, 6])
    scenes = [sample_scene(rng, n_objects=1) for _ in range(n)]
    if upright:
        scenes = [replace(s, objects=tuple(replace(o, angle=0.0) for o in s.objects))
                  for s in scenes]
    return scenes, {w: [make_edit(s, kind, rng) for s in scenes] for w, kind in WORD_EDITS.items()}


def gap_scenes(n: int, seed: int, upright: bool = False) -> tuple[list, dict[str, list[str]]]:
    """The scenes of `gap_edits` and their captions: "own", one per changed word of
    `WORD_EDITS`, and "empty"."""
    scenes, edits = gap_edits(n, seed, upright)
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
    z0 = clean_latents(model, scenes, batch)
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


def ideal_eps_change(z0: Tensor, z0_swapped: Tensor, t: Tensor, schedule) -> Tensor:
    """The change of the noise prediction, at a fixed z_t, that moves the clean latent it implies
    from ``z0`` to ``z0_swapped``: x0 = (z_t - sigma_t eps) / alpha_t, so the change is
    -(alpha_t / sigma_t) (z0_swapped - z0), -sqrt(SNR) times the change of the clean latent."""
    alpha, sigma = alpha_sigma(schedule, t)
    ratio = (alpha / sigma).to(z0.dtype).reshape(-1, *([1] * (z0.ndim - 1)))
    return -ratio * (z0_swapped - z0)


def swap_agreement(delta: Tensor, ideal: Tensor, weight: Tensor) -> dict[str, np.ndarray]:
    """Per scene, over the latent cells weighted by ``weight`` (B,1,h,w): the cosine of a model's
    change of prediction ``delta`` with the ``ideal`` one, and the share of the ideal change it
    makes (the projection <delta, ideal> / <ideal, ideal>: 1 is the whole change, 0 none)."""
    def inner(a: Tensor, b: Tensor) -> Tensor:
        return ((a.double() * b.double()).sum(dim=1, keepdim=True) * weight).sum(dim=(1, 2, 3))

    dot, dd, ii = inner(delta, ideal), inner(delta, delta), inner(ideal, ideal)
    cosine = dot / (dd * ii).sqrt().clamp_min(1e-24)
    return {"cosine": cosine.numpy(), "gain": (dot / ii.clamp_min(1e-24)).numpy()}


def turned(scene, angle: float):
    """The scene with every object turned by ``angle`` (radians) about its own centre."""
    return replace(scene, objects=tuple(replace(o, angle=float(o.angle + angle))
                                        for o in scene.objects))


def rotation_mean_latents(model, scenes, turns: int, batch: int = 64) -> Tensor:
    """The mean of each scene's clean latent over ``turns`` evenly spaced turns of its objects:
    what a model that knows each object's shape but not its angle can best predict."""
    return torch.stack([clean_latents(model, [turned(s, 2 * np.pi * k / turns) for s in scenes],
                                      batch) for k in range(turns)]).mean(dim=0)


def clean_latents(model, scenes, batch: int = 64) -> Tensor:
    """The model's encodings of the scenes rendered at 64x64, in batches."""
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import images_of

    return torch.cat([encode01(model, images_of(scenes[i:i + batch]))
                      for i in range(0, len(scenes), batch)])


@torch.no_grad()
def swap_directions(model, edits: dict[str, list], timesteps, seed: int, batch: int = 64,
                    turns: int = 0, by_value: bool = False) -> list[dict[str, Any]]:
    """Does a changed word move the noise prediction towards the re-rendered scene?

    ``edits``: word -> one edit per scene, all of the same source scenes (`gap_edits`). Each
    source is noised to t (one fixed noise per scene, as in `caption_gaps`); the model's change
    of conditional prediction when the own caption is replaced by the edit's is compared with
    `ideal_eps_change` on the cells either scene's objects cover. The reference change is
    "exact" (source to the edit's exact target) and, with ``turns``, also "rotation-mean" (the
    same between `rotation_mean_latents` of both). One row per (t, word, reference):
    `swap_agreement`'s cosine and gain, means with 95% half-widths. With ``by_value``, each row
    is followed by one per value the word is changed to (key "value", and "n" scenes): a word
    the model answers for most values can still fail for one.
    """
    def predict(z_t: Tensor, t: Tensor, cond) -> Tensor:
        return torch.cat([model.predict_eps(z_t[i:i + batch].to(model.device),
                                            t[i:i + batch].to(model.device),
                                            cond[i:i + batch]).float().cpu()
                          for i in range(0, len(t), batch)])

    first = next(iter(edits.values()))
    sources = [e.source for e in first]
    base = _reference_latents(model, sources, batch, turns)
    z0 = base["exact"]
    schedule = model.schedule_for(z0.shape)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    own = model.encode_prompt([e.source_caption for e in first])
    swaps = {w: _swap_references(model, sources, [e.target for e in es], base, batch, turns)
             for w, es in edits.items()}
    conds = {w: model.encode_prompt([e.target_caption for e in es]) for w, es in edits.items()}
    values = {w: np.array([str(e.new_value) for e in es]) for w, es in edits.items()}
    rows = []
    for t_value in timesteps:
        t = torch.full((len(sources),), int(t_value), dtype=torch.long)
        z_t = noise_input(z0, noise, t, schedule)
        own_eps = predict(z_t, t, own)
        for word, (weight, references) in swaps.items():
            delta = predict(z_t, t, conds[word]) - own_eps
            for name, change in references.items():
                ideal = ideal_eps_change(torch.zeros_like(change), change, t, schedule)
                found = swap_agreement(delta, ideal, weight)
                row = {"t": int(t_value), "word": word, "reference": name}
                rows.append({**row, **_means(found)})
                if by_value:
                    rows += [{**row, "value": v, "n": int((values[word] == v).sum()),
                              **_means({k: x[values[word] == v] for k, x in found.items()})}
                             for v in sorted(set(values[word]))]
    return rows


def _means(found: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per measure of `swap_agreement`: its mean and 95% half-width over the scenes."""
    return {k: dict(zip(("mean", "ci95"), mean_ci(v), strict=True)) for k, v in found.items()}


def _reference_latents(model, scenes, batch: int, turns: int) -> dict[str, Tensor]:
    """Per reference, the scenes' clean latents: "exact" and, with ``turns``, "rotation-mean"."""
    out = {"exact": clean_latents(model, scenes, batch)}
    if turns:
        out["rotation-mean"] = rotation_mean_latents(model, scenes, turns, batch)
    return out


def _swap_references(model, sources, targets, base: dict[str, Tensor], batch: int,
                     turns: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The cells either scene's objects cover, and per reference the change of the clean latent
    from the sources' (``base``, `_reference_latents`) to the targets'."""
    side = base["exact"].shape[-1]
    weight = torch.maximum(object_cover(sources, side), object_cover(targets, side)).double()
    moved = _reference_latents(model, targets, batch, turns)
    return weight, {name: moved[name] - z for name, z in base.items()}


def rotation_mean_ceiling(model, edits, turns: int, batch: int = 64) -> dict[str, tuple]:
    """How close the rotation-mean change of the clean latent comes to the exact change, per
    edit on the cells either scene's objects cover (no prediction involved): `swap_agreement`'s
    cosine and gain as (mean, 95% half-width); empty when ``turns`` is 0."""
    if not turns:
        return {}
    sources = [e.source for e in edits]
    weight, refs = _swap_references(model, sources, [e.target for e in edits],
                                    _reference_latents(model, sources, batch, turns), batch, turns)
    found = swap_agreement(refs["rotation-mean"], refs["exact"], weight)
    return {k: mean_ci(v) for k, v in found.items()}


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
