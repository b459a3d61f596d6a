"""Writing results: JSON and CSV tables, atomic text files, and markdown tables of metrics.

Nothing here computes a measurement; the tables read each metric's label, format and direction
from the registry (`dds.eval.metrics`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from dds.eval.metrics import get_metric


def write_atomic(path: Path, text: str) -> None:
    """Write a text file by rename, so a killed run never leaves half a file."""
    from dds.atomic import atomic_write_text

    atomic_write_text(path, text)


def jsonable(x):
    """x with arrays as lists and non-finite floats as None (JSON has neither)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, Tensor)):
        return jsonable(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x).tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = []

    class _W:
        def write(self, s):
            lines.append(s)

    w = csv.DictWriter(_W(), fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(path, "".join(lines))


def fmt(x: float | None, nd: int = 3) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def metric_header(name: str) -> str:
    """A table column title: the metric's short label and which way is better."""
    m = get_metric(name)
    return f"{m.short} {'↑' if m.higher_is_better else '↓'}"


def metric_table(rows: Sequence[tuple[Sequence[str], dict]], keys: Sequence[str],
                 metrics: Sequence[str], unranked: Collection[str] = (),
                 group: int | None = None) -> str:
    """A markdown table: the `keys` columns (row labels), then one column per metric.

    rows: (labels, values) pairs, values holding the metrics by name (a missing one, e.g. in a
    report from before it was measured, shows as 'nan').  The best value of each
    metric is in bold, by the metric's registered direction, among all rows or, with `group`,
    among the rows sharing label `group`; rows with a label in `unranked` (the floors) are
    shown but never marked best.
    """
    def ranked(labels):
        return not any(label in unranked for label in labels)

    def key(labels):
        return None if group is None else labels[group]

    best = {}
    for labels, values in rows:
        if ranked(labels):
            for k in metrics:
                best.setdefault((key(labels), k), []).append(values.get(k))
    best = {gk: get_metric(gk[1]).best(v) for gk, v in best.items()}
    lines = ["| " + " | ".join([*keys, *(metric_header(k) for k in metrics)]) + " |",
             "|" + " --- |" * (len(keys) + len(metrics))]
    for labels, values in rows:
        cells = []
        for k in metrics:
            text = get_metric(k).format(values.get(k))
            top = best.get((key(labels), k))
            cells.append(f"**{text}**" if ranked(labels) and top is not None
                         and values.get(k) == top else text)
        lines.append("| " + " | ".join([*labels, *cells]) + " |")
    return "\n".join(lines) + "\n"


def signed(name: str, v) -> str:
    """A value of metric `name` in its format, always with its sign (a difference)."""
    m = get_metric(name)
    if v is None or not np.isfinite(v):
        return "n/a"
    spec = m.spec if m.spec.startswith("+") else "+" + m.spec
    return f"{v:{spec}}"


def paired_table(comparison: dict, names: Sequence[str], key: str = "edit kind") -> str:
    """A markdown table of paired differences (`dds.eval.paired.compare`'s result, or any
    {label: {metric: difference}}): per label and metric, both means, the difference with its
    interval, and the reading ('no difference' when the interval holds zero)."""
    a, b = names
    conf = next((d["confidence"] for row in comparison.values() for d in row.values()), 0.95)
    lines = [f"| {key} | measure | {a} | {b} | {a} − {b} [{conf:.0%} interval] | reading |",
             "|" + " --- |" * 6]
    for label, row in comparison.items():
        for k, d in row.items():
            m = get_metric(k)
            lines.append(f"| {label} (n={d['n']}) | {m.short} | {m.format(d['a'])} | "
                         f"{m.format(d['b'])} | {signed(k, d['difference'])} "
                         f"[{signed(k, d['low'])}, {signed(k, d['high'])}] | {d['verdict']} |")
    return "\n".join(lines) + "\n"
