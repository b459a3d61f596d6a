"""How fast the procedural world draws and renders scenes (scenes per second, one core).

    python benchmarks/bench_world.py [--n 2000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> int:
    from dds.world import render, sample_scene

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    scenes = [sample_scene(rng) for _ in range(args.n)]
    t_sample = time.perf_counter() - t
    t = time.perf_counter()
    for s in scenes:
        render(s)
    t_render = time.perf_counter() - t
    print(f"sample: {args.n / t_sample:,.0f} scenes/s   render 64x64: {args.n / t_render:,.0f} "
          f"scenes/s   both: {args.n / (t_sample + t_render):,.0f} scenes/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
