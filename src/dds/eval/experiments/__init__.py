"""The paper's Section 5 measurements as experiments that write tables, plots and a report.

`run_experiment(name, ctx, **overrides)` runs one; `EXPERIMENTS` lists them with their
presets (the full one and a `quick` one that fits in minutes on a CPU with the built-in model).
Data: the built-in world (exact ground truth, judge) unless `data` names a folder of the user's
images with metadata.jsonl, which real models need (CLIP score and LPIPS are then the metrics).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dds.errors import DDSError
from dds.eval.experiments import common
from dds.eval.experiments.common import model_name
from dds.eval.report import write_atomic, write_json
from dds.eval.runner import Runner


@dataclass
class Experiment:
    name: str
    title: str
    run: Any  # (ctx, params) -> summary
    full: dict
    quick: dict
    needs_edits: bool = True


def _score_norms(ctx, p):
    from dds.eval.experiments.score_stats import run_score_norms

    return run_score_norms(ctx, p)


def _score_cosine(ctx, p):
    from dds.eval.experiments.score_stats import run_score_cosine

    return run_score_cosine(ctx, p)


def _guidance_sweep(ctx, p):
    from dds.eval.experiments.editing import run_guidance_sweep

    return run_guidance_sweep(ctx, p)


def _drift(ctx, p):
    from dds.eval.experiments.editing import run_drift

    return run_drift(ctx, p)


def _convergence(ctx, p):
    from dds.eval.experiments.editing import run_convergence

    return run_convergence(ctx, p)


def _schedules(ctx, p):
    from dds.eval.experiments.schedules import run_schedules

    return run_schedules(ctx, p)


# Paper scale where the CPU allows it: 100 pairs x 200 noise draws x 20 timesteps for the norms.
# n_edits counts edits per kind on the built-in world (3 kinds), or rows of metadata.jsonl.
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("score-norms", "Expected SDS gradient norm vs timestep (Figure 8, left)",
               _score_norms,
               full=dict(n_pairs=100, n_noise=200, n_t=20, guidance=7.5, pair_batch=25,
                         chunk_rows=100),
               quick=dict(n_pairs=12, n_noise=8, n_t=10, guidance=7.5, pair_batch=12,
                          chunk_rows=96), needs_edits=False),
    Experiment("score-cosine", "Cosine of the SDS directions of related pairs (Figure 8, right)",
               _score_cosine,
               full=dict(n_pairs=34, n_noise=32, n_t=20, guidance=7.5, pair_batch=50,
                         chunk_rows=100),
               quick=dict(n_pairs=4, n_noise=8, n_t=10, guidance=7.5, pair_batch=12,
                          chunk_rows=96), needs_edits=False),
    Experiment("guidance-sweep", "DDS over guidance against SDS, SDEdit and DDIM inversion "
               "(Figures 5 and 9)", _guidance_sweep,
               full=dict(n_edits=32, steps=200, batch=48,
                         guidances=[1, 3, 5, 7.5, 10, 15, 25],
                         sdedit_strengths=[0.2, 0.35, 0.5, 0.65, 0.8], sdedit_guidance=7.5,
                         inversion_guidances=[1, 3, 7.5, 15], sampler_steps=50),
               quick=dict(n_edits=2, steps=50, batch=48, guidances=[1, 7.5, 25],
                          sdedit_strengths=[0.3, 0.6], sdedit_guidance=7.5,
                          inversion_guidances=[7.5], sampler_steps=20)),
    Experiment("drift", "Drift under an unchanged prompt, SDS vs DDS (Figure 3)", _drift,
               full=dict(n_edits=16, steps=400, batch=48,
                         checkpoints=[0, 10, 25, 50, 100, 150, 200, 300, 400]),
               quick=dict(n_edits=2, steps=60, batch=48, checkpoints=[0, 15, 30, 60])),
    Experiment("convergence", "DDS quality vs number of steps", _convergence,
               full=dict(n_edits=32, batch=48, steps_list=[25, 50, 100, 200, 400]),
               quick=dict(n_edits=2, batch=48, steps_list=[25, 50, 100, 200])),
    Experiment("schedules", "Edit quality against denoiser calls, per timestep schedule "
               "(fewer steps)", _schedules,
               # full: 300 edits x 1,991 denoiser calls each, about 8.5 hours of the 2-core CPU
               # (the goal is <= 50 calls; budgets past 50 are the convergence experiment's)
               full=dict(n_edits=100, batch=50, reference_steps=200, budgets=[25, 50],
                         schedules=["reference", "descending", "stratified"],
                         step_rules=["constant", "budget", "decay"], n_avg=[1, 2],
                         optimizers={"adam": 0.01}, optimizer_rules=["constant"], tails=[0.2]),
               quick=dict(n_edits=4, batch=48, reference_steps=200, budgets=[25, 50],
                          schedules=["reference", "descending"],
                          step_rules=["constant", "budget", "decay"], n_avg=[1],
                          optimizers={"adam": 0.01}, optimizer_rules=["constant"],
                          tails=[0.2])),
]}


@dataclass
class Context:
    """Everything an experiment needs besides its parameters (injectable for tests)."""

    model: Any
    out: Path
    seed: int = 0
    quiet: bool = False
    quick: bool = False
    data: str | Path | None = None  # None: the built-in world
    size: int | None = None  # working image side for user data (default: the model's)
    judge: Any = None  # built-in world: a Judge (default: the packaged one)
    clip: Any = None  # user data: (CLIPModel, tokenizer), or a folder to load them from
    lpips: Any = None  # user data: an LPIPS module, or the AlexNet trunk file to build one
    command: str = ""
    _cache: dict = field(default_factory=dict)

    @property
    def world(self) -> bool:
        return self.data is None

    def edit_cfg(self, **overrides):
        """The model's editing settings on the paper's schedule (the reference recipe's uniform
        t and 200 steps, not a schedule the model recommends), then `overrides`."""
        from dds.pipeline import edit_config

        return edit_config(self.model, seed=self.seed, **{"schedule": "reference", **overrides})

    def runner(self, settings: dict) -> Runner:
        """The resumable runner of this run's units (under OUT/parts)."""
        return Runner(self.out, {**settings, "seed": self.seed, "model": model_name(self.model),
                                 "data": str(self.data) if self.data else "built-in world"})

    def captioned(self, n: int):
        if self.world:
            return common.world_captioned(self.model, n, self.seed)
        return common.real_captioned(self.model, self.data, n, self.size)

    def related(self, n: int):
        if self.world:
            return common.world_related(self.model, n, self.seed)
        return common.real_related(self.model, self.data, n, self.size)

    def editset(self, n: int):
        if self.world:
            return common.world_editset(self.model, n, self.seed, self.judge)
        clip, lp = self.clip, self.lpips
        if clip is None or isinstance(clip, (str, Path)):
            from dds.eval.clip_score import load_clip

            clip = load_clip(clip)
        if lp is None or isinstance(lp, (str, Path)):
            from dds.eval.lpips import load_lpips

            lp = load_lpips(lp)
        return common.real_editset(self.model, self.data, n, self.size, clip, lp)

    def finish(self, name, params, rows, summary, text, pngs, runner, title, es=None) -> None:
        """Write NAME.json (settings, seeds, summary, rows) and report.md."""
        slug = name.replace("-", "_")
        preset = "quick" if self.quick else "full"
        changed = changed_from_preset(name, preset, params)
        record = {
            "experiment": name, "title": title, "preset": preset, "changed_from_preset": changed,
            "seed": self.seed, "model": model_name(self.model),
            "data": str(self.data) if self.data else "built-in world (held-out scenes)",
            "params": params, "edit_config": json.loads(self.edit_cfg().to_json()),
            "metrics": es.metrics_doc if es is not None else {},
            "units": {"computed_this_run": runner.computed, "resumed": runner.reused},
            "environment": {"torch": torch.__version__, "device": str(self.model.device),
                            "python": platform.python_version()},
            "command": self.command, "summary": summary, "rows": rows,
        }
        write_json(self.out / f"{slug}.json", record)
        settings = ", ".join(f"{k}={v}" for k, v in params.items())
        if changed:
            settings += "; changed from the preset: " + ", ".join(
                f"{k} {c['preset']} -> {c['used']}" for k, c in changed.items())
        metrics = "".join(f"- `{k}`: {v}\n" for k, v in (es.metrics_doc if es else {}).items())
        md = (
            f"# {title}\n\n"
            f"Model `{record['model']}`, data: {record['data']}, seed {self.seed}, "
            f"{record['preset']} preset ({settings}).\n\n"
            + "".join(f"![{p}]({p})\n\n" for p in pngs)
            + f"## Findings\n\n{text}\n\n"
            + (f"## Metrics\n\n{metrics}\n" if metrics else "")
            + f"Tables: `{slug}.csv`, `{slug}.json` (with every setting). "
            + (f"Command: `{self.command}`.\n" if self.command else "\n")
        )
        write_atomic(self.out / "report.md", md)


def changed_from_preset(name: str, preset: str, params: dict) -> dict[str, dict]:
    """The settings of a run that differ from its experiment's preset: {key: {preset, used}}."""
    exp = EXPERIMENTS[name]
    base = exp.quick if preset == "quick" else exp.full
    return {k: {"preset": base.get(k), "used": v} for k, v in params.items() if base.get(k) != v}


def run_experiment(name: str, ctx: Context, **overrides) -> dict:
    """Run experiment `name` with its quick or full preset (as ctx.quick says), overridden by
    `overrides`; returns its summary (also written to ctx.out)."""
    if name not in EXPERIMENTS:
        raise DDSError(f"unknown experiment '{name}'; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    params = dict(exp.quick if ctx.quick else exp.full)
    unknown = set(overrides) - set(params)
    if unknown:
        raise DDSError(f"{name} has no setting {', '.join(sorted(unknown))}; "
                       f"it has {', '.join(params)}")
    params.update(overrides)
    ctx.out = Path(ctx.out)
    ctx.out.mkdir(parents=True, exist_ok=True)
    return exp.run(ctx, params)


__all__ = ["EXPERIMENTS", "Context", "Experiment", "run_experiment"]
