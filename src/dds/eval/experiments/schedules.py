"""`dds eval schedules`: which timestep schedule, step rule and noise averaging give the
reference recipe's edit quality in fewer denoiser calls.

Every setting edits the same held-out edits with the same seeds as the reference recipe (200
steps, uniform t, constant lr); each is compared with it edit by edit on the compared metrics
(position-aware success, PSNR gain over "no edit", SSIM outside the edit) with 95% intervals.
A setting *matches* the reference when no metric is worse outside its interval; at each budget
of denoiser calls the winner is the matching setting with the highest success, then PSNR gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dds.errors import DDSError, SettingError
from dds.eval import plots
from dds.eval.floors import measure_floors
from dds.eval.paired import compare
from dds.eval.report import fmt, write_csv
from dds.eval.runner import batches
from dds.eval.world_edits import decode01
from dds.progress import progress_bar


@dataclass(frozen=True)
class Setting:
    schedule: str
    step_rule: str
    n_avg: int
    steps: int
    optimizer: str = "sgd"
    lr: float | None = None  # None: the model's editing default
    average_tail: float = 0.0  # the result: the last latent, or the mean of the last fraction

    @property
    def calls(self) -> int:
        """Denoiser calls per edit (each a batch of the method's rows)."""
        return self.steps * self.n_avg

    @property
    def curve(self) -> str:
        avg = f", avg {self.n_avg}" if self.n_avg > 1 else ""
        tail = f", mean of last {self.average_tail:.0%}" if self.average_tail else ""
        return f"{self.schedule}, {self.step_rule} lr{avg}{self._opt(', ', ' lr ')}{tail}"

    @property
    def key(self) -> str:
        tail = f"-tail{self.average_tail:g}" if self.average_tail else ""
        return (f"{self.schedule}-{self.step_rule}-n{self.n_avg}-s{self.steps}"
                f"{self._opt('-', '')}{tail}")

    def _opt(self, sep: str, lr: str) -> str:
        if self.optimizer == "sgd" and self.lr is None:
            return ""  # the reference's optimiser: keys as before optimisers were a setting
        return f"{sep}{self.optimizer}" + (f"{lr}{self.lr:g}" if self.lr is not None else "")


def settings_of(p: dict) -> tuple[Setting, list[Setting]]:
    """The reference recipe and every setting of the grid (budgets are denoiser calls); each
    optimiser of p["optimizers"] (name: lr) adds every schedule at every budget, one draw, with
    each step rule of p["optimizer_rules"] (the presets: "constant"; "budget" scales Adam's
    per-element step as it scales SGD's, so that fewer steps may travel as far); each fraction
    of p["tails"] the same with the budget step, SGD and the mean of that last fraction of the
    latents."""
    ref = Setting("reference", "constant", 1, p["reference_steps"])
    grid = [Setting(s, r, a, b // a) for s in p["schedules"] for r in p["step_rules"]
            for a in p["n_avg"] for b in p["budgets"] if b // a >= 1]
    grid += [Setting(s, r, 1, b, o, lr) for o, lr in p.get("optimizers", {}).items()
             for r in p.get("optimizer_rules", ["constant"]) for s in p["schedules"]
             for b in p["budgets"]]
    grid += [Setting(s, "budget", 1, b, average_tail=f) for f in p.get("tails", [])
             for s in p["schedules"] for b in p["budgets"]]
    return ref, [g for g in grid if g != ref]


def _cfg(ctx, s: Setting):
    return ctx.edit_cfg(schedule=s.schedule, step_rule=s.step_rule, n_avg=s.n_avg, steps=s.steps,
                        optimizer=s.optimizer, lr=s.lr, average_tail=s.average_tail)


def _edit(ctx, es, s: Setting, sl: slice, bar) -> dict:
    from dds.loop import edit_latents

    n = sl.stop - sl.start
    cfg = _cfg(ctx, s)
    z = edit_latents(ctx.model, es.z_hat[sl], es.cond_source[sl], es.cond_target[sl], cfg,
                     on_step=lambda info: bar.update(n * s.n_avg),
                     seeds=[ctx.seed + sl.start + i for i in range(n)])
    return es.score(decode01(ctx.model, z), sl)


def recommendation(s: Setting) -> dict:
    """A setting as the EditConfig fields a model folder recommends (`dds eval schedules
    --write`): its `dds.pipeline.SCHEDULE_KEYS`, lr only where the setting has its own."""
    from dds.pipeline import SCHEDULE_KEYS

    return {k: getattr(s, k) for k in SCHEDULE_KEYS if getattr(s, k) is not None}


def matches(by_metric: dict) -> bool:
    """No compared metric is worse than the reference outside its 95% interval."""
    return not any(d["verdict"] == "reference better" for d in by_metric.values())


def run_schedules(ctx, p: dict) -> dict:
    ref, grid = settings_of(p)
    for s in [ref, *grid]:  # a setting that cannot run is refused before any unit runs
        try:
            _cfg(ctx, s)
        except SettingError as e:
            raise DDSError(f"the grid's setting {s.key} cannot run: {e.field} {e.value!r} is "
                           f"invalid ({e.why})") from None
    es = ctx.editset(p["n_edits"])
    n = len(es)
    # A unit (one setting on one batch of edits) depends on the edits, the batch and the editing
    # config, not on which other settings the grid holds: a grown grid reuses every unit.
    runner = ctx.runner({"experiment": "schedules", "n_edits": p["n_edits"], "batch": p["batch"],
                         "metrics": list(es.metrics), "edit_config": ctx.edit_cfg().to_json()})
    total = sum(s.calls for s in [ref, *grid]) * n
    bar = progress_bar(total, "schedules (edits x denoiser calls)", ctx.quiet, unit="call")
    per = {}
    for s in [ref, *grid]:
        per[s] = runner.batches((s.key,), batches(n, p["batch"]),
                                lambda sl, s=s: _edit(ctx, es, s, sl, bar),
                                on_reuse=lambda sl, s=s: bar.update((sl.stop - sl.start) * s.calls))
    bar.close()
    floors = measure_floors(runner, ctx.model, es.source01, es.z_hat, es.score,
                            batches(n, p["batch"]))
    rows, paired = [], {}
    for s in [ref, *grid]:
        c = compare(per[s], per[ref], es.compared, es.kinds, ("setting", "reference"))["all"]
        paired[s.key] = c
        rows.append({"setting": s.key, "curve": s.curve, "schedule": s.schedule,
                     "step_rule": s.step_rule, "n_avg": s.n_avg, "optimizer": s.optimizer,
                     "lr": s.lr, "average_tail": s.average_tail, "steps": s.steps,
                     "calls": s.calls,
                     **{k: float(np.nanmean(v)) for k, v in per[s].items()},
                     **{f"{m}_diff": c[m]["difference"] for m in es.compared},
                     **{f"{m}_low": c[m]["low"] for m in es.compared},
                     **{f"{m}_high": c[m]["high"] for m in es.compared},
                     "matches_reference": s == ref or matches(c)})
    summary = _summary(rows, ref, es)
    fewest = summary["fewest_calls_matching"]
    summary["recommended"] = (recommendation(next(s for s in grid if s.key == summary["winners"][
        str(fewest)])) if fewest is not None else None)
    summary["floors"] = {f: {k: float(np.mean(v)) for k, v in m.items()} for f, m in floors.items()}
    write_csv(ctx.out / "schedules.csv", rows)
    _plot(ctx, rows, ref, es, summary)
    ctx.finish("schedules", p, rows, summary, _text(rows, ref, es, summary), ["schedules.png"],
               runner, "Edit quality against denoiser calls, per timestep schedule", es=es)
    return summary


def _summary(rows: list[dict], ref: Setting, es) -> dict:
    """The winner at each budget (calls): the matching setting with the most success, then the
    most PSNR gain; None where nothing matches the reference.  `best` ranks every setting of
    the budget the same way, matching or not (what comes nearest where nothing matches)."""
    def rank(r):
        return r[es.fidelity], r.get("psnr_gain", 0.0)

    winners, best = {}, {}
    for calls in sorted({r["calls"] for r in rows if r["setting"] != ref.key}):
        at = [r for r in rows if r["calls"] == calls and r["setting"] != ref.key]
        ok = [r for r in at if r["matches_reference"]]
        winners[str(calls)] = max(ok, key=rank)["setting"] if ok else None
        best[str(calls)] = max(at, key=rank)["setting"]
    fewest = next((int(c) for c, w in winners.items() if w is not None), None)
    return {"reference": ref.key, "reference_calls": ref.calls, "winners": winners,
            "best": best, "fewest_calls_matching": fewest}


def _plot(ctx, rows, ref: Setting, es, summary) -> None:
    panels = [m for m in es.compared if m in rows[0]]
    curves = {}
    for m in panels:
        for r in rows:
            if r["setting"] == ref.key:
                continue
            label = f"{m}: {r['curve']}"
            curves.setdefault(label, []).append((r["calls"], r[m]))
    plots.curves_by_panel(ctx.out / "schedules.png", curves, panels,
                          reference={m: (ref.calls, next(r[m] for r in rows
                                                         if r["setting"] == ref.key))
                                     for m in panels},
                          xlabel="denoiser calls per edit",
                          title=f"Quality vs denoiser calls ({len(es)} edits; star: the "
                          "reference recipe)")


def _text(rows, ref: Setting, es, summary) -> str:
    lines = [f"Reference recipe: {ref.calls} calls. Each setting against it, edit by edit "
             "(difference, 95% interval); 'matches' = no compared metric worse outside its "
             "interval.\n",
             "| setting | calls | " + " | ".join(es.compared) + " | matches |",
             "| --- | --- | " + " | ".join("---" for _ in es.compared) + " | --- |"]
    for r in rows:
        cells = [f"{fmt(r[m])} ({fmt(r[m + '_diff'])} [{fmt(r[m + '_low'])}, "
                 f"{fmt(r[m + '_high'])}])" for m in es.compared]
        lines.append(f"| {r['setting']} | {r['calls']} | " + " | ".join(cells)
                     + f" | {'yes' if r['matches_reference'] else 'no'} |")
    win = ", ".join(f"{c} calls: {w or 'none matches'}" for c, w in summary["winners"].items())
    lines.append(f"\nWinner at each budget: {win}.")
    near = ", ".join(f"{c} calls: {summary['best'][c]}" for c, w in summary["winners"].items()
                     if w is None)
    if near:
        lines.append(f"Where none matches, the best setting (most success, then PSNR gain; "
                     f"its differences are in the table): {near}.")
    return "\n".join(lines)
