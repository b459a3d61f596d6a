"""The command line that the built-in model's probes share (model, scenes, timesteps, seed)."""

from __future__ import annotations

import argparse


def probe_parser(doc: str, n: int, t: str = "100,300,500,700,900",
                 extras: bool = False) -> argparse.ArgumentParser:
    """The parser of a probe whose docstring is ``doc``; ``extras`` adds --batch, --upright and
    --json (the probes that read the caption-gap scenes and keep their table)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=n, help="held-out single-object scenes")
    p.add_argument("--t", default=t, type=timesteps, help="comma list of timesteps")
    p.add_argument("--seed", type=int, default=10_000)
    if extras:
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--upright", action="store_true",
                       help="turn every object upright (angle 0), as a model trained so expects")
        p.add_argument("--json", default=None, help="write the table here as well")
    return p


def timesteps(text: str) -> list[int]:
    """"300,500" -> [300, 500]."""
    return [int(s) for s in text.split(",")]
