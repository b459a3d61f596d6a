"""Paired differences between two methods, with 95% intervals.

Two methods are compared on the same edits with the same seeds (edit i seeded the same way for
both), so each edit gives one difference and the comparison is paired: what varies from edit to
edit (a hard scene, an unlucky noise draw) cancels.  The intervals are closed forms, with no
resampling and so no seed of their own:

- a mean (PSNR gain, SSIM outside the edit, ...): the paired t interval,
  mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n), d_i = a_i - b_i;
- a success proportion (a metric registered `binary`): the Agresti-Min interval for the
  difference of paired proportions (Agresti and Min, Statistics in Medicine 24:729-740, 2005):
  add 1/2 to each cell of the 2x2 table of (a succeeded, b succeeded) and take the Wald interval
  of the adjusted table, (n10 - n01) / n' +- z * sqrt((n10 + n01) - (n10 - n01)^2 / n') / n',
  with n10, n01 the adjusted discordant counts and n' = n + 2.  A t interval on 0/1 differences
  has zero width when every pair agrees and is too narrow with a few discordant pairs; this one
  keeps close to its nominal coverage down to small n.

An interval that contains zero is reported as "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from dds.eval.metrics import get_metric

CONFIDENCE = 0.95
NO_DIFFERENCE = "no difference"


def t_cdf(x: float, df: float) -> float:
    """Student's t distribution function (Simpson's rule on the density, error < 1e-9)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    u = np.linspace(0.0, x, 4001)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(u * u / df))
    h = x / 4000
    return 0.5 + float(h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)), by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_t_interval(d: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The paired t interval of the mean of differences `d` ((-inf, inf) for fewer than 2)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 2:
        return -math.inf, math.inf
    half = t_quantile(0.5 + confidence / 2, n - 1) * float(np.std(d, ddof=1)) / math.sqrt(n)
    m = float(np.mean(d))
    return m - half, m + half


def paired_proportion_interval(a: np.ndarray, b: np.ndarray,
                               confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Agresti-Min interval of P(a) - P(b) for paired 0/1 outcomes `a`, `b` (clipped to [-1, 1])."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = len(a) + 2.0
    n10 = float(np.sum(a & ~b)) + 0.5
    n01 = float(np.sum(~a & b)) + 0.5
    diff = (n10 - n01) / n
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(
        max((n10 + n01) - (n10 - n01) ** 2 / n, 0.0)) / n
    return max(diff - half, -1.0), min(diff + half, 1.0)


def verdict(metric: str, low: float, high: float, a: str = "a", b: str = "b") -> str:
    """'no difference' when [low, high] holds zero, else which of `a`, `b` is better by the
    metric's direction."""
    if not low > 0 and not high < 0:
        return NO_DIFFERENCE
    ahead = (low > 0) == get_metric(metric).higher_is_better
    return f"{a if ahead else b} better"


def paired_difference(metric: str, a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("a", "b"),
                      confidence: float = CONFIDENCE) -> dict:
    """Mean of a, of b, of a - b and its interval over the edits where both are finite."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    binary = get_metric(metric).binary
    low, high = (paired_proportion_interval(a > 0.5, b > 0.5, confidence) if binary
                 else paired_t_interval(a - b, confidence))
    def mean(v):
        return float(np.mean(v)) if len(v) else math.nan

    return {"a": mean(a), "b": mean(b), "difference": mean(a - b), "low": low, "high": high,
            "n": int(ok.sum()), "interval": "Agresti-Min" if binary else "paired t",
            "confidence": confidence, "verdict": verdict(metric, low, high, *names)}


def compare(per_a: dict[str, np.ndarray], per_b: dict[str, np.ndarray], metrics: Sequence[str],
            kinds: Sequence[str] | None = None, names: tuple[str, str] = ("a", "b")) -> dict:
    """Paired differences of per-edit metrics, per kind of edit and over all of them:
    {kind: {metric: paired_difference(...)}}; `kinds` labels each edit (None: all only)."""
    n = len(next(iter(per_a.values())))
    labels = np.array(kinds if kinds is not None else ["all"] * n)
    out = {}
    for kind in [*dict.fromkeys(labels.tolist()), "all"]:
        sel = labels == kind if kind != "all" else np.ones(n, bool)
        out[kind] = {m: paired_difference(m, np.asarray(per_a[m])[sel], np.asarray(per_b[m])[sel],
                                          names) for m in metrics}
    return out


PAIRED = "paired"  # the key of a method comparison beside the methods' and floors' figures


def compare_methods(per: dict[str, dict[str, np.ndarray]], kinds: Sequence[str],
                    metrics: Sequence[str], a: str = "dds", b: str = "sds",
                    labels: tuple[str, str] | None = None) -> dict:
    """Method `a` against method `b` ({method: per-edit metrics}, same edits and seeds), per
    kind of edit and over all: {"a", "b", "labels", "by": {kind: {metric: difference}}};
    labels name the two in tables and readings (default: the keys in capitals)."""
    labels = tuple(labels or (a.upper(), b.upper()))
    return {"a": a, "b": b, "labels": list(labels),
            "by": compare(per[a], per[b], metrics, kinds, labels)}


def comparison_text(c: dict) -> str:
    """The paired comparison `compare_methods` made, as a sentence and a markdown table."""
    from dds.eval.report import paired_table

    a, b = c.get("labels") or (c["a"].upper(), c["b"].upper())
    return (f"{a} against {b}, edit by edit (same edits, same seeds): the difference of the "
            "means with its 95% interval (paired t for means, Agresti-Min for success "
            "proportions); an interval holding zero reads 'no difference'.\n\n"
            + paired_table(c["by"], (a, b)))
