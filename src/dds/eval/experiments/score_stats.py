"""Figure 8: statistics of the SDS gradient itself.

score-norms  (left)  E_eps ||grad_z L_SDS(z, y)||_2 per timestep, for aligned pairs (an image and
                     its own caption) and unaligned ones (the captions permuted).  The paper's
                     reading: aligned norms are far from zero (the bias direction delta_bias that
                     DDS removes) yet below the unaligned ones.
score-cosine (right) cosine between the SDS gradients of two related pairs (a scene and its
                     one-attribute edit, each with its own caption, same t and eps), against
                     unrelated pairs (the edit of another scene).  High cosine means the bias
                     of one can cancel the other's: the premise of DDS.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dds.eval import plots
from dds.eval.experiments.common import derangement, timesteps_grid
from dds.eval.report import fmt, write_csv
from dds.eval.runner import batches
from dds.eval.seeds import COSINE_STREAM, NORMS_STREAM, seed_gen
from dds.models.base import cat_cond, expand_cond
from dds.progress import progress_bar
from dds.score import guided_eps_captions, noise_input, sds_grad


def _rows(z, d: int):
    """(B,...) -> (d*B,...), the d copies draw-major (row k*B + i is pair i, draw k); a latent
    tensor or a conditioning."""
    if not isinstance(z, Tensor):
        return z.repeat(d)
    return z.unsqueeze(0).expand(d, *z.shape).reshape(d * z.shape[0], *z.shape[1:])


@torch.no_grad()
def sds_grads_shared(model, zs: list[Tensor], conds: list, t: int, eps: Tensor,
                     guidance: float) -> list[Tensor]:
    """SDS gradients (Eq. 1) of several (z, y) sets under the SAME t and eps, in one model batch.

    zs[k]: (N,C,h,w); conds[k]: conditionings of N rows; eps (N,C,h,w).  Returns one (N,C,h,w)
    per set.
    """
    n = eps.shape[0]
    dev = model.device
    z = torch.cat(zs).to(dev)
    e = torch.cat([eps] * len(zs)).to(dev)
    y = cat_cond(conds).to(dev)
    tt = torch.full((z.shape[0],), t, dtype=torch.long, device=dev)
    cond_u = expand_cond(model.uncond().to(dev), z.shape[0])
    g = sds_grad(model.predict_eps, z, cond_u, y, tt, e, model.schedule, guidance)
    return list(g.float().cpu().split(n))


@torch.no_grad()
def sds_grads_captions(model, z: Tensor, conds: list, t: int, eps: Tensor,
                       guidance: float) -> list[Tensor]:
    """SDS gradients (Eq. 1) of ONE latent batch under several captions, same t and eps.

    z_t is the same for every caption, so the unconditional branch is evaluated once
    (`guided_eps_captions`).  z, eps: (N,C,h,w); conds[k]: conditionings of N rows.  Returns
    one (N,C,h,w) per caption.
    """
    dev = model.device
    n = z.shape[0]
    tt = torch.full((n,), t, dtype=torch.long, device=dev)
    eps = eps.to(dev)
    z_t = noise_input(z.to(dev), eps, tt, model.schedule.to(dev))
    cond_u = expand_cond(model.uncond().to(dev), n)
    gs = guided_eps_captions(model.predict_eps, z_t, tt, cond_u, [c.to(dev) for c in conds],
                             guidance)
    return [(g - eps).float().cpu() for g in gs]


def noise_draws(n_noise: int, b: int, shape, chunk_rows: int, gen: torch.Generator):
    """Yield eps chunks (d*B, C, h, w) until n_noise draws per pair are done."""
    d_max = max(1, chunk_rows // b)
    done = 0
    while done < n_noise:
        d = min(d_max, n_noise - done)
        yield d, torch.randn((d * b, *shape), generator=gen)
        done += d


def norms_unit(model, z: Tensor, cond_aligned, cond_unaligned, t: int,
               n_noise: int, guidance: float, gen: torch.Generator, chunk_rows: int = 32,
               bar=None) -> dict[str, list[float]]:
    """Per pair: mean and std over n_noise draws of the SDS norm, aligned and unaligned.

    Both captions see the same eps, so their difference is not blurred by noise; they also
    share the unconditional branch (3 UNet rows per draw instead of 4).
    """
    b = z.shape[0]
    s = torch.zeros(2, b, dtype=torch.float64)
    s2 = torch.zeros(2, b, dtype=torch.float64)
    for d, eps in noise_draws(n_noise, b, z.shape[1:], chunk_rows, gen):
        ga, gu = sds_grads_captions(model, _rows(z, d),
                                    [_rows(cond_aligned, d), _rows(cond_unaligned, d)], t, eps,
                                    guidance)
        nrm = torch.stack([ga.flatten(1).norm(dim=1), gu.flatten(1).norm(dim=1)])  # (2, d*B)
        nrm = nrm.view(2, d, b).double()
        s += nrm.sum(1)
        s2 += nrm.pow(2).sum(1)
        if bar is not None:
            bar.update(d * b)
    mean = s / n_noise
    std = (s2 / n_noise - mean**2).clamp_min(0).sqrt()
    return {"aligned": mean[0].tolist(), "unaligned": mean[1].tolist(),
            "aligned_noise_std": std[0].tolist(), "unaligned_noise_std": std[1].tolist()}


def cosine_unit(model, z_a: Tensor, cond_a, z_b: Tensor, cond_b, z_c: Tensor, cond_c, t: int, n_noise: int, guidance: float, gen: torch.Generator,
                chunk_rows: int = 32, bar=None) -> dict[str, list[float]]:
    """Per pair, mean over draws of cos(g(z_a,y_a), g(z_b,y_b)) (related) and of
    cos(g(z_a,y_a), g(z_c,y_c)) (unrelated), all three under the same t and eps."""
    b = z_a.shape[0]
    s = torch.zeros(2, b, dtype=torch.float64)
    for d, eps in noise_draws(n_noise, b, z_a.shape[1:], chunk_rows, gen):
        ga, gb, gc = sds_grads_shared(
            model, [_rows(z_a, d), _rows(z_b, d), _rows(z_c, d)],
            [_rows(cond_a, d), _rows(cond_b, d), _rows(cond_c, d)], t, eps, guidance)
        cos = torch.nn.functional.cosine_similarity
        c = torch.stack([cos(ga.flatten(1), gb.flatten(1), dim=1),
                         cos(ga.flatten(1), gc.flatten(1), dim=1)])
        s += c.view(2, d, b).double().sum(1)
        if bar is not None:
            bar.update(d * b)
    m = s / n_noise
    return {"related": m[0].tolist(), "unrelated": m[1].tolist()}


def _stats(v: np.ndarray) -> tuple[float, float, float]:
    """mean, std and standard error over the last axis."""
    n = v.shape[-1]
    sd = v.std(-1, ddof=1) if n > 1 else np.zeros(v.shape[:-1])
    return v.mean(-1), sd, sd / np.sqrt(n)


def draws_share(estimates: np.ndarray, noise_std: np.ndarray, n_noise: int) -> np.ndarray:
    """Share of the spread between pairs that the finite number of noise draws accounts for.

    estimates, noise_std: (..., pairs), each pair's mean over n_noise draws and the draws' std
    (population std, as `norms_unit` returns it).  Returns mean_i(s_i^2 / n_noise) /
    var_i(estimate_i) over the last axis, s_i^2 the draws' unbiased variance: near 0 means the
    standard errors come from the pairs themselves, and more draws would not narrow them.
    """
    from_draws = (noise_std**2 / max(n_noise - 1, 1)).mean(-1)
    n = estimates.shape[-1]
    between = estimates.var(-1, ddof=1) if n > 1 else np.zeros(estimates.shape[:-1])
    return from_draws / np.maximum(between, 1e-30)


# ---- score-norms ------------------------------------------------------------------------------
def run_score_norms(ctx, p: dict) -> dict:
    """Figure 8 left.  p: n_pairs, n_noise, n_t, guidance, pair_batch, chunk_rows."""
    data = ctx.captioned(p["n_pairs"])
    n = data.z.shape[0]
    perm = derangement(n, ctx.seed)
    cond_un = data.cond[torch.as_tensor(perm)]
    ts = timesteps_grid(p["n_t"])
    runner = ctx.runner({"experiment": "score-norms", **p, "timesteps": ts})
    bar = progress_bar(len(ts) * n * p["n_noise"], "score-norms (pairs x draws)", ctx.quiet,
                       unit="grad")
    al, un, al_sd, un_sd = (np.zeros((len(ts), n)) for _ in range(4))
    for i, t in enumerate(ts):
        for j, sl in enumerate(batches(n, p["pair_batch"])):
            r = runner.unit(f"t-{t}-b-{j}", lambda sl=sl, t=t, j=j: norms_unit(
                ctx.model, data.z[sl], data.cond[sl], cond_un[sl], t, p["n_noise"], p["guidance"],
                seed_gen(ctx.seed, NORMS_STREAM, t, j), p["chunk_rows"], bar),
                lambda sl=sl: bar.update((sl.stop - sl.start) * p["n_noise"]))
            al[i, sl], un[i, sl] = r["aligned"], r["unaligned"]
            al_sd[i, sl], un_sd[i, sl] = r["aligned_noise_std"], r["unaligned_noise_std"]
    bar.close()
    a_share, u_share = (draws_share(v, sd, p["n_noise"]) for v, sd in ((al, al_sd), (un, un_sd)))
    numel = int(np.prod(data.z.shape[1:]))
    (am, asd, ase), (um, usd, use) = _stats(al), _stats(un)
    dm, dsd, dse = _stats(un - al)  # paired: same image, same draws
    rows = [{"t": t, "aligned_mean": am[i], "aligned_std": asd[i], "aligned_se": ase[i],
             "unaligned_mean": um[i], "unaligned_std": usd[i], "unaligned_se": use[i],
             "gap_mean": dm[i], "gap_se": dse[i], "ratio": am[i] / um[i],
             "aligned_rms_per_element": am[i] / np.sqrt(numel),
             "aligned_draws_share": a_share[i], "unaligned_draws_share": u_share[i]}
            for i, t in enumerate(ts)]
    write_csv(ctx.out / "score_norms.csv", rows)
    plots.band_lines(ctx.out / "score_norms.png", ts,
                     {"aligned (own caption)": (am, asd), "unaligned (permuted captions)": (um, usd)},
                     xlabel="timestep t", ylabel="E_eps ||grad L_SDS||_2",
                     title=f"Expected SDS gradient norm (mean ± std over {n} pairs, "
                           f"{p['n_noise']} draws each)")
    below = int(np.sum(am < um))
    significant = int(np.sum(dm > 2 * dse))
    ratio = float(np.mean(am / um))
    nonzero = bool(np.all(am > 0.1 * um))
    ok = bool(nonzero and below >= 0.9 * len(ts))
    summary = {
        "claim": "aligned SDS norms are non-negligible (not zero) and below the unaligned ones",
        "reproduces": ok, "timesteps": len(ts), "aligned_below_unaligned_at": below,
        "gap_above_2se_at": significant, "mean_ratio_aligned_over_unaligned": ratio,
        "aligned_mean_over_t": float(am.mean()), "unaligned_mean_over_t": float(um.mean()),
        "aligned_min_over_t": float(am.min()), "latent_elements": numel,
        "draws_share_max": float(max(a_share.max(), u_share.max())),
    }
    text = (
        f"Aligned pairs: mean SDS norm {fmt(am.mean())} (per element {fmt(am.mean() / np.sqrt(numel))}),"
        f" smallest {fmt(am.min())} at t = {ts[int(am.argmin())]}; unaligned: {fmt(um.mean())}. "
        f"Aligned is below unaligned at {below} of {len(ts)} timesteps (gap above 2 standard errors "
        f"at {significant}); aligned / unaligned = {fmt(ratio)} on average. The {p['n_noise']} "
        f"noise draws per pair account for at most {100 * summary['draws_share_max']:.1f}% of the "
        f"spread between pairs at any t (the rest is the pairs themselves).\n\n"
        f"**Claim (aligned norms non-zero and below unaligned): "
        f"{'reproduces' if ok else 'does NOT reproduce'}** "
        f"(criteria: aligned > 10% of unaligned at every t: {nonzero}; aligned < unaligned at "
        f">= 90% of timesteps: {below >= 0.9 * len(ts)})."
    )
    ctx.finish("score-norms", p, rows, summary, text, ["score_norms.png"], runner,
               "Figure 8 (left): expected SDS gradient norm vs timestep, aligned vs unaligned")
    return summary


# ---- score-cosine -----------------------------------------------------------------------------
def run_score_cosine(ctx, p: dict) -> dict:
    """Figure 8 right.  p: n_pairs (per edit kind on the world), n_noise, n_t, guidance, ..."""
    data = ctx.related(p["n_pairs"])
    n = data.z_a.shape[0]
    perm = derangement(n, ctx.seed + 1)
    z_c, cond_c = data.z_b[perm], data.cond_b[torch.as_tensor(perm)]
    ts = timesteps_grid(p["n_t"])
    runner = ctx.runner({"experiment": "score-cosine", **p, "timesteps": ts})
    bar = progress_bar(len(ts) * n * p["n_noise"], "score-cosine (pairs x draws)", ctx.quiet,
                       unit="pair")
    rel = np.zeros((len(ts), n))
    unr = np.zeros((len(ts), n))
    for i, t in enumerate(ts):
        for j, sl in enumerate(batches(n, p["pair_batch"])):
            r = runner.unit(f"t-{t}-b-{j}", lambda sl=sl, t=t, j=j: cosine_unit(
                ctx.model, data.z_a[sl], data.cond_a[sl], data.z_b[sl], data.cond_b[sl], z_c[sl],
                cond_c[sl], t, p["n_noise"], p["guidance"], seed_gen(ctx.seed, COSINE_STREAM, t, j),
                p["chunk_rows"], bar), lambda sl=sl: bar.update((sl.stop - sl.start) * p["n_noise"]))
            rel[i, sl], unr[i, sl] = r["related"], r["unrelated"]
    bar.close()
    (rm, rsd, rse), (um, usd, use) = _stats(rel), _stats(unr)
    dm, _, dse = _stats(rel - unr)
    rows = [{"t": t, "related_mean": rm[i], "related_std": rsd[i], "related_se": rse[i],
             "unrelated_mean": um[i], "unrelated_std": usd[i], "unrelated_se": use[i],
             "gap_mean": dm[i], "gap_se": dse[i]} for i, t in enumerate(ts)]
    write_csv(ctx.out / "score_cosine.csv", rows)
    plots.band_lines(ctx.out / "score_cosine.png", ts,
                     {"related (scene and its edit)": (rm, rsd), "unrelated (another scene)": (um, usd)},
                     xlabel="timestep t", ylabel="cos(grad_SDS(z, y), grad_SDS(z', y'))",
                     title=f"Cosine of SDS directions (mean ± std over {n} pairs)", ylim=(-1, 1))
    above = int(np.sum(rm > um))
    high = float(rm.mean())
    ok = bool(above >= 0.9 * len(ts) and high >= 0.5)
    summary = {
        "claim": "SDS directions of related pairs are highly correlated, more than unrelated",
        "reproduces": ok, "timesteps": len(ts), "related_above_unrelated_at": above,
        "gap_above_2se_at": int(np.sum(dm > 2 * dse)), "related_mean_over_t": high,
        "unrelated_mean_over_t": float(um.mean()), "related_min_over_t": float(rm.min()),
        "related_max_over_t": float(rm.max()),
    }
    text = (
        f"Related pairs: mean cosine {fmt(high)} (range {fmt(rm.min())} to {fmt(rm.max())} over t); "
        f"unrelated: {fmt(um.mean())}. Related above unrelated at {above} of {len(ts)} timesteps "
        f"(gap above 2 standard errors at {summary['gap_above_2se_at']}).\n\n"
        f"**Claim (related-pair cosine high and above unrelated): "
        f"{'reproduces' if ok else 'does NOT reproduce'}** (criteria: related mean >= 0.5: "
        f"{high >= 0.5}; related > unrelated at >= 90% of timesteps: {above >= 0.9 * len(ts)})."
    )
    ctx.finish("score-cosine", p, rows, summary, text, ["score_cosine.png"], runner,
               "Figure 8 (right): cosine of SDS directions of related vs unrelated pairs")
    return summary

