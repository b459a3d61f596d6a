"""At which noise level does the UNet decide an object's shape, and does the caption move it?

Free generation and shape edits both need the denoiser to draw the shape its caption names. The
probe noises held-out one-object scenes to a few timesteps (one fixed noise per scene), asks the
model for its guided estimate of the clean latent, x0 = (z_t - sigma_t eps_w) / alpha_t, decodes
it and lets the judge read the object's shape, twice per scene:

- **kept**: the scene's own caption; the shape read must be the true one (how long a true shape
  survives the denoiser, compared with the autoencoder's round trip, the ceiling);
- **moved**: the caption of a shape edit (same template, one word changed); the shape read must
  be the edit's target shape (what a shape edit asks of the score; chance is 1 in 5).

  python benchmarks/x0_shape_probe.py [--model PATH] [--n 64] [--t 100,300,500,700,900]
"""

from __future__ import annotations

import numpy as np
import torch
from probe_args import probe_parser


def main() -> None:
    p = probe_parser(__doc__, n=64)
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args()

    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import decode01, images_of
    from dds.models import get_model
    from dds.score import guided_eps_captions, noise_input, x0_from_eps
    from dds.world import Judge, make_edit, sample_scene

    model, judge = get_model(args.model, device="cpu"), Judge.load()
    rng = np.random.default_rng([args.seed, 5])
    edits = [make_edit(sample_scene(rng, n_objects=1), "object_shape", rng) for _ in range(args.n)]
    x = images_of([e.source for e in edits])
    kept_shape = [e.source.objects[0].shape for e in edits]
    moved_shape = [e.target.objects[0].shape for e in edits]
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        z0 = encode01(model, x)
        schedule = model.schedule_for(z0.shape)
        noise = torch.randn(z0.shape, generator=gen)
        uncond = model.uncond().expand(args.n)
        c_src = model.encode_prompt([e.source_caption for e in edits])
        c_tgt = model.encode_prompt([e.target_caption for e in edits])
        eps_fn = model.predict_eps

        def read(images, wanted) -> float:
            got = judge.predict(images)
            return float(np.mean([r["n_objects"] == 1 and r["objects"][0]["shape"] == s
                                  for r, s in zip(got, wanted, strict=True)]))

        print(f"autoencoder round trip: true shape read {read(decode01(model, z0), kept_shape):.1%}"
              f" (n={args.n}; clean renders {read(x, kept_shape):.1%})")
        print("   t   kept (own caption)   moved (edit caption, target shape)   moved (source shape)")
        for t_value in args.t:
            t = torch.full((args.n,), t_value, dtype=torch.long)
            z_t = noise_input(z0, noise, t, schedule)
            e_src, e_tgt = guided_eps_captions(eps_fn, z_t, t, uncond, [c_src, c_tgt],
                                               args.guidance)
            kept = decode01(model, x0_from_eps(z_t, e_src, t, schedule))
            moved = decode01(model, x0_from_eps(z_t, e_tgt, t, schedule))
            print(f"{t_value:4d}   {read(kept, kept_shape):18.1%}   {read(moved, moved_shape):34.1%}"
                  f"   {read(moved, kept_shape):20.1%}")


if __name__ == "__main__":
    main()
