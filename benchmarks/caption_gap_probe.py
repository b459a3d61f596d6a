"""How much does each caption word lower the UNet's own loss? A learning signal for shape words.

The judge reads a shape in a generated sample only once the model draws it well enough; before
that, a shape reading sits at chance (20%) and 64 or 128 prompts cannot tell a model that has
started to bind shape words from one that has not. This probe reads the training objective
directly. Held-out one-object scenes are noised to a few timesteps (one fixed noise per scene),
and the conditional noise prediction is scored against the true noise (the epsilon MSE the UNet
is trained on) under the scene's own caption and under the same caption with one word changed:
the object's shape, the object's colour, the background colour; and the empty caption. A word
the model uses raises the loss when it is wrong:

    gap(word, t) = MSE(eps(z_t, caption with word changed), noise) - MSE(eps(z_t, caption), noise)

reported as a mean over scenes with a 95% interval (paired: the same scene, noise and t), over
the whole latent and over the latent cells the object covers (weighted by its coverage). A gap
whose interval includes zero is a word the model ignores at that noise level.

  python benchmarks/caption_gap_probe.py [--model PATH] [--n 128] [--t 100,300,500,700,900]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

WORDS = ("shape", "colour", "background", "empty")


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval."""
    return float(x.mean()), float(1.96 * x.std(ddof=1) / np.sqrt(len(x)))


def per_scene_mse(pred: torch.Tensor, noise: torch.Tensor, w: torch.Tensor) -> tuple:
    """(whole latent, object cells weighted by coverage) mean squared error, one per scene."""
    err = (pred - noise).square().mean(dim=1, keepdim=True)  # (B,1,h,w): mean over channels
    whole = err.mean(dim=(1, 2, 3))
    obj = (err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    return whole.numpy(), obj.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=128, help="held-out single-object scenes")
    p.add_argument("--t", default="100,300,500,700,900", help="comma list of timesteps")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--upright", action="store_true",
                   help="turn every object upright (angle 0), as a model trained so expects")
    p.add_argument("--json", default=None, help="write the table here as well")
    args = p.parse_args()

    from dds.builtin.train import object_weights
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import images_of
    from dds.models import get_model
    from dds.score import noise_input
    from dds.world import make_edit, sample_scene

    torch.set_grad_enabled(False)
    model = get_model(args.model, device="cpu")
    rng = np.random.default_rng([args.seed, 6])
    scenes = [sample_scene(rng, n_objects=1) for _ in range(args.n)]
    if args.upright:
        scenes = [replace(s, objects=tuple(replace(o, angle=0.0) for o in s.objects))
                  for s in scenes]
    edits = {kind: [make_edit(s, kind, rng) for s in scenes]
             for kind in ("object_shape", "object_color", "background_color")}
    captions = {"own": [e.source_caption for e in edits["object_shape"]],
                "shape": [e.target_caption for e in edits["object_shape"]],
                "colour": [e.target_caption for e in edits["object_color"]],
                "background": [e.target_caption for e in edits["background_color"]],
                "empty": [""] * args.n}
    z0 = torch.cat([encode01(model, images_of(scenes[i:i + args.batch]))
                    for i in range(0, args.n, args.batch)])
    schedule = model.schedule_for(z0.shape)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed))
    w = object_weights([s.to_dict() for s in scenes], 64, z0.shape[-1], 1.0) - 1.0
    conds = {k: model.encode_prompt(v) for k, v in captions.items()}

    def mse(z_t, t, key) -> tuple:
        parts = [per_scene_mse(model.predict_eps(z_t[i:i + args.batch], t[i:i + args.batch],
                                                 conds[key][i:i + args.batch]).float(),
                               noise[i:i + args.batch], w[i:i + args.batch])
                 for i in range(0, args.n, args.batch)]
        return tuple(np.concatenate([q[j] for q in parts]) for j in range(2))

    rows = []
    print(f"model: {args.model or 'built-in'}; {args.n} held-out one-object scenes; gap = "
          "MSE with the word changed - MSE with the own caption (x1000, mean +- 95%)")
    print("   t  region   own MSE   " + "   ".join(f"{k:>16s}" for k in WORDS))
    for t_value in (int(s) for s in args.t.split(",")):
        t = torch.full((args.n,), t_value, dtype=torch.long)
        z_t = noise_input(z0, noise, t, schedule)
        own = mse(z_t, t, "own")
        gaps = {k: mse(z_t, t, k) for k in WORDS}
        for r, region in enumerate(("whole", "object")):
            row = {"t": t_value, "region": region, "own_mse": float(own[r].mean())}
            cells = []
            for k in WORDS:
                m, h = mean_ci(1000.0 * (gaps[k][r] - own[r]))
                row[k] = {"gap_x1000": m, "ci95": h}
                cells.append(f"{m:8.2f} +- {h:5.2f}")
            rows.append(row)
            print(f"{t_value:4d}  {region:6s}  {row['own_mse']:8.4f}   " + "   ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
