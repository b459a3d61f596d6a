"""How far does a caption word travel through the UNet? Block by block, shape against colour.

The caption gap (`caption_gap_probe.py`) says whether a word lowers the UNet's loss; this probe
says where a word that does not is lost. Held-out one-object scenes are noised to t (one fixed
noise per scene) and run through the UNet under their own caption and under the caption with the
object's shape or colour word changed; per block (down, mid, up) and for the noise prediction,
the change of the block's output on the object's cells, as a share of the output itself
(`dds.eval.caption_gap.word_flow`). Blocks before the first cross-attention read 0.

  python benchmarks/word_flow_probe.py [--model PATH] [--n 64] [--t 300,500,700]
"""

from __future__ import annotations

import torch
from probe_args import probe_parser


def main() -> None:
    args = probe_parser(__doc__, n=64, t="300,500,700").parse_args()

    from dds.eval.caption_gap import gap_scenes, object_cover, word_flow
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import images_of
    from dds.models import get_model
    from dds.score import noise_input

    torch.set_grad_enabled(False)
    model = get_model(args.model, device="cpu")
    scenes, captions = gap_scenes(args.n, args.seed)
    z0 = encode01(model, images_of(scenes))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed))
    states = {k: model.encode_prompt(captions[k]).embeds for k in ("own", "shape", "colour")}
    cover = object_cover(scenes, 64)
    ts = args.t
    flows = []
    for tv in ts:
        t = torch.full((args.n,), tv, dtype=torch.long)
        z_t = noise_input(z0, noise, t, model.schedule_for(z0.shape))
        flows.append(word_flow(model.unet, z_t, t, states, cover))
    print(f"model: {args.model or 'built-in'}; {args.n} held-out one-object scenes; change of "
          "each block's output on the object's cells when a word changes, as a share of it")
    print(f"{'block':<6} " + " ".join(f"{'t=' + str(tv) + ' shape / colour':>26}" for tv in ts))
    for name in flows[0]:
        cells = []
        for f in flows:
            shape, colour = f[name]["shape"], f[name]["colour"]
            cells.append(f"{shape:9.3f} / {colour:.3f} ({shape / max(colour, 1e-12):.2f})")
        print(f"{name:<6} " + " ".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
