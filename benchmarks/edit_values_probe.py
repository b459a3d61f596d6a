"""Where do edits fail? Success per target value, and what a failed colour edit looks like.

Held-out edits of each kind (``--kinds``) run at the model's shipped DDS default; the table gives
each kind's success per value the edit asks for (a colour, a shape, a background), placed and
attribute-only (`dds.eval.builtin_quality.by_target_value`, the split the quality report
prints). For colour edits it then reads every failure: the judge's colour on the output (the
source colour kept, a third colour, or the right colour in the wrong place), with the judge on
the exact truths and on their autoencoder round trips as the floor of what can be read. Three
checks follow for the weakest target colour:

- the other methods (SDS, FlowEdit at their defaults) on its edits and on twice as many edits
  to other colours: does any method reach it, or is it the model?
- generation: one-object prompts naming each colour (``--generation`` per colour): does the
  model draw it from noise?
- a partial edit: the decoded latent (1 - a) z_source + a z_truth at a = 1/4, 1/2, 3/4, 1: what
  a recolour made part of the way reads as.

  python benchmarks/edit_values_probe.py [--model PATH] [--n 200] [--generation 24] [--json F]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dds.eval.report import write_json


def colour_of(judge, images, edits) -> list[str | None]:
    """The judge's colour of each edit's object slot (None: no object read there)."""
    return [p["objects"][e.obj_index]["color"] if e.obj_index < len(p["objects"]) else None
            for p, e in zip(judge.predict(images), edits, strict=True)]


def failure_kinds(read: list, placed: np.ndarray, edits) -> dict[str, int]:
    """Colour edits that failed, by what the judge read: the source colour, a third colour, or
    the target colour not where the truth has the object."""
    out = Counter()
    for r, ok, e in zip(read, placed, edits, strict=True):
        if r == e.new_value and ok:
            continue
        out["source colour" if r == e.old_value else "target colour, misplaced"
            if r == e.new_value else "third colour"] += 1
    return dict(out)


def generation_by_colour(model, judge, per_colour: int, seed: int) -> dict[str, float]:
    """Share of one-object samples (30 DDIM steps, guidance 7.5) whose colour the judge reads
    as the one the prompt names, per object colour."""
    from dataclasses import replace

    from dds.eval.world_edits import decode01
    from dds.sampling import generate
    from dds.world import caption, sample_scene
    from dds.world.scene import COLOR_NAMES, INCOMPATIBLE

    rng = np.random.default_rng([seed, 7])
    out = {}
    for c in COLOR_NAMES:
        scenes = []
        while len(scenes) < per_colour:
            s = sample_scene(rng, n_objects=1)
            if (c, s.background) not in INCOMPATIBLE:
                scenes.append(replace(s, objects=(replace(s.objects[0], color=c),)))
        z = generate(model, model.encode_prompt([caption(s) for s in scenes]), 7.5, 30, seed=5)
        reads = [p["objects"][0]["color"] for p in judge.predict(decode01(model, z))]
        out[c] = float(np.mean([r == c for r in reads]))
    return out


def partial_edits(model, judge, edits, fractions=(0.25, 0.5, 0.75, 1.0)) -> dict[str, dict]:
    """What the judge reads on decoded lerps from each source latent to its truth's."""
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import decode01, images_of

    zs = encode01(model, images_of([e.source for e in edits]))
    zt = encode01(model, images_of([e.target for e in edits]))
    out = {}
    for a in fractions:
        read = colour_of(judge, decode01(model, (1 - a) * zs + a * zt), edits)
        out[str(a)] = {"target read": float(np.mean([r == e.new_value for r, e in
                                                     zip(read, edits, strict=True)])),
                       "readings": dict(Counter(str(r) for r in read).most_common(3))}
    return out


def methods_on(model, judge, groups: dict[str, list]) -> dict[str, dict[str, float]]:
    """Placed success of DDS, SDS and FlowEdit at their defaults on each group of edits."""
    from dds.eval.world_edits import prepare, run_zero_shot, score
    from dds.pipeline import edit_config

    out = {}
    for name, edits in groups.items():
        prep = prepare(model, edits)
        out[name] = {m: float(score(run_zero_shot(model, edits, edit_config(model, method=m),
                                                  prepared=prep, quiet=True), edits,
                                    judge)["success_pos"].mean())
                     for m in ("dds", "sds", "flowedit")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=200, help="held-out edits per kind")
    p.add_argument("--kinds", default="object_color,object_shape,background_color")
    p.add_argument("--seed", type=int, default=20261201, help="edit seed (held-out scenes)")
    p.add_argument("--generation", type=int, default=24, help="prompts per colour (0: skip)")
    p.add_argument("--json", default=None, help="write every figure here as well")
    args = p.parse_args()

    from dds.eval.builtin_quality import by_target_value, by_value_table
    from dds.eval.world_edits import held_out_edits, run_zero_shot, score
    from dds.models import get_model
    from dds.pipeline import edit_config
    from dds.world import Judge

    torch.set_grad_enabled(False)
    model, judge = get_model(args.model, device="cpu"), Judge.load()
    edits = held_out_edits(args.n, kinds=args.kinds.split(","), seed=args.seed)
    images = run_zero_shot(model, edits, edit_config(model, method="dds"), quiet=True)
    per = score(images, edits, judge)
    by = by_target_value({"dds": per}, edits)
    print(f"DDS at the shipped default, {args.n} held-out edits per kind (edit seed {args.seed})")
    print(by_value_table(by))
    result = {"model": args.model, "n": args.n, "seed": args.seed, "by_value": by}
    colour = [i for i, e in enumerate(edits) if e.kind == "object_color"]
    if colour:
        ce = [edits[i] for i in colour]
        read = colour_of(judge, images[colour], ce)
        result["failures"] = failure_kinds(read, per["success_pos"][colour] > 0, ce)
        result["judge_on_truth"] = partial_edits(model, judge, ce, fractions=(1.0,))["1.0"]
        worst = min(by["object_color"], key=lambda v: by["object_color"][v]["dds"]["success_pos"])
        to_worst = [e for e in ce if e.new_value == worst]
        others = [e for e in ce if e.new_value != worst][:max(len(to_worst), 1) * 2]
        result["weakest_colour"] = worst
        result["methods"] = methods_on(model, judge, {f"to {worst}": to_worst,
                                                      "to other colours": others})
        result["partial_edits"] = partial_edits(model, judge, to_worst)
        if args.generation:
            result["generation"] = generation_by_colour(model, judge, args.generation, args.seed)
        print(f"colour failures, by what the judge read: {result['failures']} (the judge reads "
              f"the target on {result['judge_on_truth']['target read']:.0%} of the truths' "
              "autoencoder round trips)")
        print(f"weakest target colour: {worst}; placed success by method: "
              + "; ".join(f"{g}: " + ", ".join(f"{m} {v:.0%}" for m, v in r.items())
                          for g, r in result["methods"].items()))
        print("a partial edit to it reads as: " + "; ".join(
            f"a = {a}: {r['readings']}" for a, r in result["partial_edits"].items()))
        if args.generation:
            print("generation, the named colour read: " + ", ".join(
                f"{c} {v:.0%}" for c, v in result["generation"].items()))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
