"""Do a model's caption embeddings tell its shape words apart as well as its colour words?

The UNet only sees the text encoder's 77 token states. If captions that differ in one shape word
give almost the same states, no amount of UNet training can make it draw the named shape. For
every pair of captions that differ in exactly one word of a kind (shape, object colour,
background colour), the probe takes the distance between their token states (the sum over the
77 positions of the L2 distance per position; the context the UNet's cross-attention reads) and
prints the mean per kind, and each kind's ratio to the colour words'.

  python benchmarks/text_word_probe.py [--model PATH] [--model PATH ...]
"""

from __future__ import annotations

import argparse
import itertools

import torch

TEMPLATE = "a {color} {shape} on a {background} striped background"


def pairs(kind: str) -> list[tuple[str, str]]:
    from dds.world import BACKGROUND_NAMES, COLOR_NAMES, SHAPES

    base = {"color": "red", "shape": "circle", "background": "blue"}
    values = {"shape": SHAPES, "color": COLOR_NAMES, "background": BACKGROUND_NAMES}[kind]
    return [(TEMPLATE.format(**{**base, kind: a}), TEMPLATE.format(**{**base, kind: b}))
            for a, b in itertools.combinations(values, 2)]


def word_distances(backend) -> dict[str, float]:
    """Mean summed per-token distance of caption pairs that differ in one word, per kind."""
    out = {}
    for kind in ("shape", "color", "background"):
        ps = pairs(kind)
        with torch.no_grad():
            a = backend.encode_prompt([p[0] for p in ps]).embeds.float()
            b = backend.encode_prompt([p[1] for p in ps]).embeds.float()
        out[kind] = float((a - b).norm(dim=-1).sum(dim=-1).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help="model folder (repeatable; default: the built-in model)")
    args = p.parse_args()

    from dds.models import get_model

    print(f"{'model':<40} {'shape':>8} {'colour':>8} {'background':>10} {'shape/colour':>12}")
    for model in args.model or [None]:
        d = word_distances(get_model(model, device="cpu"))
        print(f"{model or 'built-in':<40} {d['shape']:8.1f} {d['color']:8.1f} "
              f"{d['background']:10.1f} {d['shape'] / d['color']:12.3f}")


if __name__ == "__main__":
    main()
