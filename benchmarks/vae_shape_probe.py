"""How much of an object's shape survives the autoencoder?

Every image the model generates or edits leaves through the VAE's decoder, so the judge's
accuracy on reconstructions of true scenes is a ceiling for generation and editing alike. The
probe encodes and decodes held-out single-object scenes (the same stream as `dds eval
builtin-quality`'s autoencoder figures) and prints how often the judge still reads the object's
shape, overall, per shape and per object size, beside its accuracy on the clean renders.

  python benchmarks/vae_shape_probe.py [--model PATH] [--n 500]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

SIZE_BINS = ((7, 9), (9, 11), (11, 13), (13, 15.01))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=500, help="held-out single-object scenes")
    p.add_argument("--seed", type=int, default=10_000)
    args = p.parse_args()

    from dds.eval.world_edits import decode01, images_of
    from dds.models import get_model
    from dds.world import SHAPES, Judge, sample_scene

    backend, judge = get_model(args.model, device="cpu"), Judge.load()
    rng = np.random.default_rng([args.seed, 2])
    scenes = [sample_scene(rng, n_objects=1) for _ in range(args.n)]
    x = images_of(scenes)
    with torch.no_grad():
        rec = torch.cat([decode01(backend, backend.encode(x[i:i + 100] * 2 - 1))
                         for i in range(0, args.n, 100)])
    truth = np.array([s.objects[0].shape for s in scenes])
    sizes = np.array([s.objects[0].size for s in scenes])

    def shape_right(images) -> np.ndarray:
        read = judge.predict(images)
        return np.array([r["n_objects"] == 1 and r["objects"][0]["shape"] == t
                         for r, t in zip(read, truth, strict=True)])

    clean, recon = shape_right(x), shape_right(rec)
    print(f"object shape read right: clean renders {clean.mean():.1%}, "
          f"reconstructions {recon.mean():.1%} (n={args.n})")
    for shape in SHAPES:
        m = truth == shape
        print(f"  {shape:<9} {recon[m].mean():6.1%}  (n={m.sum()})")
    for lo, hi in SIZE_BINS:
        m = (sizes >= lo) & (sizes < hi)
        print(f"  radius {lo:g}-{min(hi, 15):g} px {recon[m].mean():6.1%}  (n={m.sum()})")


if __name__ == "__main__":
    main()
