"""Does a changed word move the UNet's prediction towards the scene it names? Shape against colour.

The caption gap says whether a word lowers the loss, the word flow how far it travels through
the UNet; this probe says whether the change it makes points the right way. Held-out one-object
scenes are noised to t (one fixed noise per scene, the caption gap's scenes and noise) and run
under their own caption and under the caption with the object's shape or colour word changed.
The world re-renders each scene with that word changed exactly, so the ideal change of the
prediction is known: -sqrt(SNR_t) times the change of the clean latent. Per scene, on the cells
either scene's object covers: the cosine of the model's change with the ideal one, and the
share of the ideal change it makes (projection; guidance w multiplies it by w). A word coded
per cell but not drawn reads a cosine near 0; an outline drawn faintly, a clear cosine and a
small share (`dds.eval.caption_gap.swap_directions`). The caption names no angle, so where the
noise hides it the best a model can do is the change between the two scenes averaged over
``--turns`` turns of the object ("rotation-mean"), which is read as a second reference; the
first lines give how close that average comes to the exact change. ``--by-value`` adds a row per
value the word is changed to (a colour the model cannot move to shows there, not in the mean).

  python benchmarks/swap_direction_probe.py [--model PATH] [--n 128] [--t 100,300,500,700,900]
                                            [--by-value]
"""

from __future__ import annotations

from pathlib import Path

import torch
from probe_args import probe_parser

from dds.eval.report import write_json


def main() -> None:
    p = probe_parser(__doc__, n=128, extras=True)
    p.add_argument("--turns", type=int, default=12,
                   help="turns of the object for the rotation-mean reference (0: exact only)")
    p.add_argument("--by-value", action="store_true",
                   help="also a row per value the word is changed to (its scenes only)")
    args = p.parse_args()

    from dds.eval.caption_gap import gap_edits, rotation_mean_ceiling, swap_directions
    from dds.models import get_model

    torch.set_grad_enabled(False)
    model = get_model(args.model, device="cpu")
    _, edits = gap_edits(args.n, args.seed, args.upright)
    edits = {w: edits[w] for w in ("shape", "colour")}
    rows = swap_directions(model, edits, args.t, args.seed,
                           args.batch, args.turns, args.by_value)
    ceiling = rotation_mean_ceiling(model, edits["shape"], args.turns, args.batch)
    print(f"model: {args.model or 'built-in'}; {args.n} held-out one-object scenes; the change of "
          "the conditional prediction against the ideal one, on the object's cells (mean +- 95%)")
    if ceiling:
        cos, gain = ceiling["cosine"], ceiling["gain"]
        print(f"shape swap, rotation-mean change against the exact one (no model): cosine "
              f"{cos[0]:+.3f} +- {cos[1]:.3f}, share {gain[0]:+.3f} +- {gain[1]:.3f}")
    print("   t  word    reference      to        n    cosine with it    share of its change")
    for r in rows:
        cos, gain = r["cosine"], r["gain"]
        to, n = (r["value"], r["n"]) if "value" in r else ("(all)", args.n)
        print(f"{r['t']:4d}  {r['word']:6s}  {r['reference']:13s}  {to:8s} {n:4d}  "
              f"{cos['mean']:+7.3f} +- {cos['ci95']:5.3f}   {gain['mean']:+8.4f} +- "
              f"{gain['ci95']:6.4f}")
    if args.json:
        write_json(Path(args.json), {"model": args.model, "n": args.n, "turns": args.turns,
                                     "rows": rows, "rotation_mean_vs_exact": ceiling})


if __name__ == "__main__":
    main()
