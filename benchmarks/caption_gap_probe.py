"""How much does each caption word lower the UNet's own loss? A learning signal for shape words.

The reading and its definition are `dds.eval.caption_gap`'s (the trainer's `RUN/gap.csv` is the
same reading): per held-out one-object scene, the rise of the conditional epsilon MSE when one
caption word (the object's shape, its colour, the background) is changed or the caption emptied,
over the whole latent and over the object's cells, as a mean with its 95% interval. A gap whose
interval includes zero is a word the model ignores at that noise level.

  python benchmarks/caption_gap_probe.py [--model PATH] [--n 128] [--t 100,300,500,700,900]
"""

from __future__ import annotations

from pathlib import Path

import torch
from probe_args import probe_parser

from dds.eval.report import write_json


def main() -> None:
    args = probe_parser(__doc__, n=128, extras=True).parse_args()

    from dds.eval.caption_gap import WORD_EDITS, caption_gaps, gap_scenes
    from dds.models import get_model

    words = (*WORD_EDITS, "empty")

    torch.set_grad_enabled(False)
    model = get_model(args.model, device="cpu")
    scenes, captions = gap_scenes(args.n, args.seed, args.upright)
    rows = caption_gaps(model, scenes, captions, args.t, args.seed,
                        args.batch)
    print(f"model: {args.model or 'built-in'}; {args.n} held-out one-object scenes; gap = "
          "MSE with the word changed - MSE with the own caption (x1000, mean +- 95%)")
    print("   t  region   own MSE   " + "   ".join(f"{k:>16s}" for k in words))
    for row in rows:
        cells = [f"{row[k]['gap_x1000']:8.2f} +- {row[k]['ci95']:5.2f}" for k in words]
        print(f"{row['t']:4d}  {row['region']:6s}  {row['own_mse']:8.4f}   " + "   ".join(cells))
    if args.json:
        write_json(Path(args.json), {"model": args.model, "n": args.n, "rows": rows})


if __name__ == "__main__":
    main()
