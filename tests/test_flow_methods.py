"""The editing methods on flow models (SD3, FLUX): closed forms, flow DDS, FlowEdit, fast path.

* the score functions for velocity models against formulas written here (`eps_to_velocity`,
  `flow_v_to_eps`, `flow_dds_grad`, `flowedit_inputs`), on flow and VP schedules;
* flow DDS: the paper's Figure 3 invariant on a tiny SD3 (identical prompts leave z at z_hat),
  its gradient split into (1 - s)(v_tgt - v_src) and the (1 - s)(z - z_hat) term a naive port
  drops, and on a flow whose velocity is exact for Gaussian data, measured trajectories of DDS
  and of the naive port against the closed-form recursions they follow;
* FlowEdit through `edit_latents` against a transcription of the published algorithm written
  here from the stock scheduler, pipeline encodings and direct transformer calls (SD3 with true
  CFG, FLUX.1-dev with embedded guidance), with the same noise draws;
* `FastEditor` against `edit_latents` for FlowEdit and DDS on both families;
* EditConfig's refusals of FlowEdit settings.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dds.errors import SettingError
from dds.fast import FastEditor
from dds.loop import EditConfig, edit_latents
from dds.methods import DDS
from dds.models.base import Conditioning, FlowSchedule, NoiseSchedule, expand_cond
from dds.score import (
    eps_to_velocity,
    flow_dds_grad,
    flow_v_to_eps,
    flowedit_inputs,
    flowedit_velocity,
)
from test_family_flux import make_tiny_flux
from test_family_sd3 import make_tiny_sd3

SRC = ["a photo of a cat", "a red circle on a wooden table"]
TGT = ["a photo of a dog", "a blue square on grass"]
SHAPE = (4, 6, 6)  # GaussianFlow's latents (C,h,w)


def _col(x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,1,1,1)."""
    return x.reshape(-1, 1, 1, 1)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- fixtures: tiny SD3 and FLUX.1-dev folders, models and stock pipelines ----------------------
@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("flow-sd3") / "model")


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("flow-flux") / "model")


@pytest.fixture(scope="module")
def sd3(sd3_folder):
    """Eager transformer calls, so that dds and the transcriptions run the same kernels."""
    from dds.models.sd3 import SD3Model

    return SD3Model(sd3_folder, dtype="fp32", device="cpu", trace=False)


@pytest.fixture(scope="module")
def flux(flux_folder):
    from dds.models.flux import FluxModel

    return FluxModel(flux_folder, dtype="fp32", device="cpu", trace=False)


@pytest.fixture(scope="module")
def sd3_pipe(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_folder)


@pytest.fixture(scope="module")
def flux_pipe(flux_folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_folder)


# ---- 1. closed forms ----------------------------------------------------------------------------
def _vp_schedule() -> NoiseSchedule:
    """SD's scaled-linear betas (the VP families' schedule)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return NoiseSchedule(torch.cumprod(1 - betas, 0).float())


def test_eps_to_velocity_inverts_flow_v_to_eps():
    sched = FlowSchedule(torch.arange(1, 1001) / 1000)
    t = torch.tensor([12.5, 250.0, 640.0, 987.0])
    s = _col(t / 1000)
    x0, eps = _randn(4, 3, 5, 6, seed=0), _randn(4, 3, 5, 6, seed=1)
    z_t = (1 - s) * x0 + s * eps
    # The true velocity eps - x0 is converted back to the eps that made z_t.
    torch.testing.assert_close(flow_v_to_eps(eps - x0, z_t, t, sched), eps, rtol=0, atol=2e-6)
    v = _randn(4, 3, 5, 6, seed=2)  # any velocity
    e = flow_v_to_eps(v, z_t, t, sched)
    torch.testing.assert_close(e, z_t + (1 - s) * v, rtol=0, atol=1e-6)
    # Back: (e - z_t) / (1 - s) carries e's rounding (~2e-7 here) divided by 1 - s.
    err = (eps_to_velocity(e, z_t, t, sched) - v).flatten(1).abs().amax(dim=1)
    assert torch.all(err <= 1e-6 / (1 - t / 1000)), err


def test_eps_to_velocity_on_a_vp_schedule_is_the_flow_coordinates_velocity():
    """z_t = alpha z0 + sigma eps is x_s = z_t / (alpha + sigma) = (1 - s) z0 + s eps at
    s = sigma / (alpha + sigma); an eps prediction e gives z0_hat = (z_t - sigma e) / alpha and
    the flow's velocity dx_s/ds = e - z0_hat."""
    sched = _vp_schedule()
    t = torch.tensor([10, 300, 700, 990])
    a_bar = sched.alphas_cumprod.double()[t]
    alpha, sigma = _col(a_bar.sqrt()), _col((1 - a_bar).sqrt())
    x0, eps = _randn(4, 4, 6, 6, seed=3).double(), _randn(4, 4, 6, 6, seed=4).double()
    z_t = alpha * x0 + sigma * eps
    s = sigma / (alpha + sigma)
    torch.testing.assert_close(_col(sched.flow_time(t)).double(), s)
    torch.testing.assert_close(z_t / _col(sched.flow_scale(t)).double(), (1 - s) * x0 + s * eps)
    # The true eps: the velocity of the data point's straight path, eps - z0.
    v = eps_to_velocity(eps.float(), z_t.float(), t, sched).double()
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=1e-4)
    # Any other prediction e: e - z0_hat, by the x0 formula.
    e = _randn(4, 4, 6, 6, seed=5).double()
    want = e - (z_t - sigma * e) / alpha
    v = eps_to_velocity(e.float(), z_t.float(), t, sched).double()
    torch.testing.assert_close(v, want, rtol=0, atol=1e-4 * want.abs().amax().item())
    # ... which is the derivative in s of the flow path through (z0_hat, e).
    z0_hat = (z_t - sigma * e) / alpha
    h = 1e-6
    path = [(1 - (s + d)) * z0_hat + (s + d) * e for d in (h, -h)]
    torch.testing.assert_close((path[0] - path[1]) / (2 * h), want)


def test_flowedit_inputs_couple_the_noise_in_the_flow_coordinate():
    g = torch.Generator().manual_seed(6)
    z, x_src, eps = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    flow = FlowSchedule(torch.arange(1, 1001) / 1000)
    t = torch.tensor([100.0, 500.0, 900.0])
    s = _col(t / 1000)
    zt_src, zt_tgt = flowedit_inputs(z, x_src, eps, t, flow)
    torch.testing.assert_close(zt_src, (1 - s) * x_src + s * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(zt_tgt, z + zt_src - x_src, rtol=0, atol=1e-6)
    vp, tv = _vp_schedule(), torch.tensor([100, 500, 900])
    a_bar = vp.alphas_cumprod[tv]
    alpha, sigma = _col(a_bar.sqrt()), _col((1 - a_bar).sqrt())
    c = alpha + sigma
    zt_src, zt_tgt = flowedit_inputs(z, x_src, eps, tv, vp)
    torch.testing.assert_close(zt_src, alpha * x_src + sigma * eps)
    # In flow coordinates (divide by c): zt_tgt / c = z + zt_src / c - x_src.
    torch.testing.assert_close(zt_tgt / c, z + zt_src / c - x_src, rtol=0, atol=1e-5)
    e_src, e_tgt = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    want = (c * e_tgt - zt_tgt) / alpha - (c * e_src - zt_src) / alpha
    torch.testing.assert_close(flowedit_velocity(e_src, e_tgt, zt_src, zt_tgt, tv, vp), want)


def _velocity(x, s, y, w):
    """An arbitrary nonlinear velocity field of x (B,C,h,w), flow time s (B,1,1,1) and a
    per-row 'prompt' offset y (B,C,1,1)."""
    return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w)) * (1 + s) - 0.5 * x * s + y


def test_flow_dds_grad_is_the_eps_difference_of_the_velocity_model():
    g = torch.Generator().manual_seed(7)
    b, ch = 3, 4
    z, z_hat, eps = (torch.randn(b, ch, 5, 5, generator=g) for _ in range(3))
    w = torch.randn(ch, ch, generator=g)
    y_src, y_tgt, y_un = (torch.randn(b, ch, 1, 1, generator=g) for _ in range(3))
    t = torch.tensor([80.0, 470.0, 930.0])
    s = _col(t / 1000)
    z_t, zhat_t = (1 - s) * z + s * eps, (1 - s) * z_hat + s * eps  # shared s and eps
    v_tgt, v_src = _velocity(z_t, s, y_tgt, w), _velocity(zhat_t, s, y_src, w)
    eps_diff = (z_t + (1 - s) * v_tgt) - (zhat_t + (1 - s) * v_src)
    ours = flow_dds_grad(v_tgt, v_src, z, z_hat, t / 1000)
    torch.testing.assert_close(ours, eps_diff, rtol=0, atol=1e-5)
    # The naive port's (v_tgt - v_src) misses exactly (1 - s)(z - z_hat).
    torch.testing.assert_close(ours - (1 - s) * (v_tgt - v_src), (1 - s) * (z - z_hat),
                               rtol=0, atol=1e-5)
    # DDS through the method, on the model's eps written here (guidance 1: the cond branch).
    flow = FlowSchedule(torch.arange(1, 1001) / 1000)

    def eps_fn(x, tt, y):
        ss = _col(tt / 1000)
        return x + (1 - ss) * _velocity(x, ss, y, w)

    dds = DDS()
    cond = dds.conditioning(y_un, y_src, y_tgt)
    grad = dds.grad(eps_fn, z, z_hat, cond, t, eps, flow, guidance=1.0)
    torch.testing.assert_close(grad, ours, rtol=0, atol=1e-5)


# ---- 2. flow DDS ----------------------------------------------------------------------------------
def test_flow_dds_figure3_identical_prompts_leave_the_source(sd3):
    """The paper's Figure 3 on SD3: with the source's own prompt both branches see the same
    z_t = zhat_t, so every step's gradient is zero and z stays at z_hat."""
    z_hat = _randn(2, 16, 8, 8, seed=8)
    cond = sd3.encode_prompt(SRC)
    seen = []
    z = edit_latents(sd3, z_hat, cond, cond, EditConfig(method="dds", steps=3, guidance=7.5),
                     on_step=lambda info: seen.append(float(info.grad_norm.max())))
    print(f"Figure 3 on SD3: gradient norms {seen}, max |z - z_hat| = {(z - z_hat).abs().max()}")
    assert len(seen) == 3 and max(seen) <= 1e-6, seen
    assert (z - z_hat).abs().max() <= 1e-6


def _sd3_prompts(pipe, src, tgt):
    """The pipeline's encodings on FlowEdit's batch [src_neg, src_pos, tgt_neg, tgt_pos]."""
    embeds, pooled = [], []
    for prompts in (src, tgt):
        with torch.no_grad():
            e, ne, p, npool = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                 do_classifier_free_guidance=True,
                                                 negative_prompt="")
        embeds += [ne, e]
        pooled += [npool, p]
    return torch.cat(embeds), torch.cat(pooled)


def _sd3_velocities(pipe, x, t, prompts, w_src, w_tgt):
    """One transformer call on [src_neg, src_pos, tgt_neg, tgt_pos] (x: 4B rows; t: one
    timestep or one per edit), classifier-free guidance per half on the velocities:
    (v_src, v_tgt)."""
    embeds, pooled = prompts
    timestep = t.reshape(-1).repeat(x.shape[0] // t.numel())  # per row, blocks of B
    with torch.no_grad():
        out = pipe.transformer(hidden_states=x, timestep=timestep,
                               encoder_hidden_states=embeds, pooled_projections=pooled,
                               return_dict=False)[0]
    su, sc, tu, tc = out.chunk(4)
    return su + w_src * (sc - su), tu + w_tgt * (tc - tu)


def test_flow_dds_gradient_is_the_velocity_difference_plus_z_minus_zhat(sd3, sd3_pipe):
    """One DDS step through the model on SD3: (1 - s)[(v_tgt - v_src) + (z - z_hat)], with
    v from the transformer called directly; a naive port's v_tgt - v_src lacks the second
    term, which is a sizeable part of the step."""
    z_hat, z = _randn(2, 16, 8, 8, seed=9), _randn(2, 16, 8, 8, seed=10)
    eps = _randn(2, 16, 8, 8, seed=11)
    fresh = copy.deepcopy(sd3_pipe.scheduler)
    t = fresh.timesteps[torch.tensor([100, 850])]  # high and low noise, t = 1000 s
    s = _col(t / 1000)
    z_t, zhat_t = (1 - s) * z + s * eps, (1 - s) * z_hat + s * eps
    w_src, w_tgt = 3.5, 7.5
    v_src, v_tgt = _sd3_velocities(sd3_pipe, torch.cat([zhat_t, zhat_t, z_t, z_t]), t,
                                   _sd3_prompts(sd3_pipe, SRC, TGT), w_src, w_tgt)
    dds = DDS()
    cond = dds.conditioning(expand_cond(sd3.uncond(), 2), sd3.encode_prompt(SRC),
                            sd3.encode_prompt(TGT))
    ours = dds.grad(sd3.predict_eps, z, z_hat, cond, t, eps, sd3.schedule, w_tgt, w_src)
    want = (1 - s) * ((v_tgt - v_src) + (z - z_hat))
    scale = want.abs().amax()
    assert (ours - want).abs().amax() <= 1e-4 * scale
    naive = v_tgt - v_src
    missing = ours - (1 - s) * naive
    assert (missing - (1 - s) * (z - z_hat)).abs().amax() <= 1e-4 * scale
    assert ((1 - s) * (z - z_hat)).norm() > 0.3 * ours.norm()


class GaussianFlow:
    """A flow model whose velocity is exact for data N(m_y, tau^2 I): the prompt's conditioning
    `embeds` IS the data mean m_y (B,C,h,w); the unconditional mean is 0.

    With x_s = (1 - s) x0 + s eps, D = (1 - s)^2 tau^2 + s^2 and r = x_s - (1 - s) m:
    E[eps | x_s] = s r / D, E[x0 | x_s] = m + (1 - s) tau^2 r / D, v = E[eps] - E[x0]."""

    device = torch.device("cpu")
    guidance_embedded = False

    def __init__(self, tau: float, shape):
        self.tau = tau
        self.schedule = FlowSchedule(torch.arange(1, 1001) / 1000)
        self._uncond = Conditioning(torch.zeros(1, *shape))

    def schedule_for(self, shape):
        return self.schedule

    def uncond(self):
        return self._uncond

    def velocity(self, x, s, m):
        d = (1 - s) ** 2 * self.tau ** 2 + s ** 2
        r = x - (1 - s) * m
        return s * r / d - (m + (1 - s) * self.tau ** 2 * r / d)

    def predict_eps(self, z_t, t, cond):
        s = _col(t.float() / 1000)
        return z_t + (1 - s) * self.velocity(z_t, s, cond.embeds)



def _gens(cfg: EditConfig, b: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(cfg.seed + i) for i in range(b)]


def _dds_from(model, z_hat, z0, cond_src, cond_tgt, cfg: EditConfig):
    """`edit_latents`' DDS loop (the method's conditioning, draws and step on the model's
    predict_eps) started at z0 instead of at the source z_hat."""
    dds, b = DDS(), z_hat.shape[0]
    gens = _gens(cfg, b)
    cond = dds.conditioning(expand_cond(model.uncond(), b), cond_src, cond_tgt, cfg)
    z = z0.clone()
    for i in range(cfg.steps):
        d = dds.draw(i, gens, tuple(z.shape[1:]), cfg, model.schedule)
        z, _ = dds.step(model.predict_eps, z, z_hat, cond, d, model.schedule, cfg)
    return z


def _naive_dds_from(model, z_hat, z0, m_src, m_tgt, cfg: EditConfig):
    """The naive port of DDS to a flow model, with DDS's draws and step size, from z0:
    z <- z - eta (v_tgt(z_t) - v_src(zhat_t)), v guided (classifier-free, on velocities)."""
    gens = _gens(cfg, z_hat.shape[0])
    eta, z = cfg.lr * cfg.loss_scale / cfg.reference_area, z0.clone()
    w_src = cfg.guidance if cfg.source_guidance is None else cfg.source_guidance
    for _ in range(cfg.steps):
        idx = torch.stack([torch.randint(cfg.t_min, cfg.t_max - 1, (), generator=g)
                           for g in gens])
        eps = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
        s = _col((idx + 1).float() / 1000)  # GaussianFlow's levels: (index + 1) / 1000

        def guided(x, m, w, s=s):
            vu = model.velocity(x, s, torch.zeros_like(m))
            return vu + w * (model.velocity(x, s, m) - vu)

        grad = (guided((1 - s) * z + s * eps, m_tgt, cfg.guidance)
                - guided((1 - s) * z_hat + s * eps, m_src, w_src))
        z = z - eta * grad
    return z


def _recursion(e0, delta, cfg: EditConfig, tau: float, naive: bool):
    """z - z_hat after DDS (or the naive port) on GaussianFlow, in closed form (float64).

    The eps shared by both branches cancels (the velocity is affine in x with the same slope
    for every mean), so each step is  e <- e - eta [k(s)(e - delta) (- delta if naive)]  with
    delta = w m_tgt - w_src m_src, k = (1 - s) s / D for DDS, (1 - s)(s - (1 - s) tau^2) / D
    for the naive port, at the flow times s DDS draws (recreated from the generators)."""
    eta, e = cfg.lr * cfg.loss_scale / cfg.reference_area, e0.double()
    gens = _gens(cfg, e0.shape[0])
    for _ in range(cfg.steps):
        idx = []
        for g in gens:
            idx.append(int(torch.randint(cfg.t_min, cfg.t_max - 1, (), generator=g)))
            torch.randn(SHAPE, generator=g)  # the step's eps, unused here
        s = _col(torch.tensor(idx, dtype=torch.float64) + 1) / 1000
        d = (1 - s) ** 2 * tau ** 2 + s ** 2
        k = (1 - s) * ((s - (1 - s) * tau ** 2) if naive else s) / d
        e = e - eta * (k * (e - delta) - (delta if naive else 0))
    return e


def _per_edit_norm(x):
    return x.flatten(1).norm(dim=1)


def test_flow_dds_keeps_the_source_where_the_naive_port_drifts():
    """Identical prompts, Gaussian data with tau = 1 (a broad distribution: at low noise the
    posterior mean of x0 is nearly x_t itself).  z = z_hat is a fixed point of both DDS and
    the naive port (both gradients are exactly zero there); from z_hat + delta DDS contracts
    back to z_hat while the naive port, whose step is ~ -(z - z_hat) at low noise, drifts
    away.  Both trajectories equal their closed-form recursions."""
    tau, b = 1.0, 2
    model = GaussianFlow(tau, SHAPE)
    m = _randn(b, *SHAPE, seed=12)
    z_hat = m + tau * _randn(b, *SHAPE, seed=13)  # a sample of the data
    cond = Conditioning(m)
    cfg = EditConfig(method="dds", steps=150, guidance=7.5)
    assert torch.equal(edit_latents(model, z_hat, cond, cond, cfg), z_hat)
    assert torch.equal(_dds_from(model, z_hat, z_hat, cond, cond, cfg), z_hat)
    assert torch.equal(_naive_dds_from(model, z_hat, z_hat, m, m, cfg), z_hat)
    # At low noise (s = 0.05) the naive step is ~ -(z - z_hat); DDS's is ~ 0.
    delta = 0.1 * _randn(b, *SHAPE, seed=14)
    eps, t = _randn(b, *SHAPE, seed=15), torch.full((b,), 50.0)
    s = _col(t / 1000)
    v = [model.velocity((1 - s) * x + s * eps, s, m) for x in (z_hat + delta, z_hat)]
    naive_low = v[0] - v[1]
    dds = DDS()
    ours_low = dds.grad(model.predict_eps, z_hat + delta, z_hat,
                        dds.conditioning(expand_cond(model.uncond(), b), cond, cond),
                        t, eps, model.schedule, 7.5)
    assert _per_edit_norm(naive_low + delta).max() < 0.06 * _per_edit_norm(delta).min()
    assert _per_edit_norm(ours_low).max() < 0.06 * _per_edit_norm(delta).min()
    # From the perturbed start, with the same draws.
    e_ours = _dds_from(model, z_hat, z_hat + delta, cond, cond, cfg) - z_hat
    e_naive = _naive_dds_from(model, z_hat, z_hat + delta, m, m, cfg) - z_hat
    zero = torch.zeros(())
    want_ours = _recursion(delta, zero, cfg, tau, naive=False)
    want_naive = _recursion(delta, zero, cfg, tau, naive=True)
    torch.testing.assert_close(e_ours.double(), want_ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(e_naive.double(), want_naive, rtol=0,
                               atol=1e-5 * want_naive.abs().max().item())
    d0 = _per_edit_norm(delta)
    assert torch.all(_per_edit_norm(e_ours) < 0.2 * d0), _per_edit_norm(e_ours) / d0
    assert torch.all(_per_edit_norm(e_naive) > 2 * d0), _per_edit_norm(e_naive) / d0


def test_flow_dds_reaches_the_edit_where_the_naive_port_overshoots():
    """Different prompts, Gaussian data with tau = 0.5, guidance 1: DDS from z_hat converges to
    z_hat + (m_tgt - m_src) (the map between the two Gaussians); the naive port's expected
    fixed point is z_hat + (1 + 1/E[k]) delta (~5 delta at this tau), so it overshoots the
    edit by several times its size.  Both equal their closed-form recursions."""
    tau, b = 0.5, 2
    model = GaussianFlow(tau, SHAPE)
    m_src = _randn(b, *SHAPE, seed=16)
    m_tgt = m_src + 0.5 * _randn(b, *SHAPE, seed=17)
    z_hat = m_src + tau * _randn(b, *SHAPE, seed=18)
    cfg = EditConfig(method="dds", steps=300, guidance=1.0)
    c_src, c_tgt = Conditioning(m_src), Conditioning(m_tgt)
    ours = edit_latents(model, z_hat, c_src, c_tgt, cfg)
    assert torch.equal(ours, _dds_from(model, z_hat, z_hat, c_src, c_tgt, cfg))
    naive = _naive_dds_from(model, z_hat, z_hat, m_src, m_tgt, cfg)
    delta = m_tgt - m_src
    zero = torch.zeros_like(delta)
    e_ours, e_naive = ours - z_hat, naive - z_hat
    torch.testing.assert_close(e_ours.double(), _recursion(zero, delta, cfg, tau, False),
                               rtol=0, atol=1e-5)
    want_naive = _recursion(zero, delta, cfg, tau, True)
    torch.testing.assert_close(e_naive.double(), want_naive, rtol=0,
                               atol=1e-5 * want_naive.abs().max().item())
    d = _per_edit_norm(delta)
    assert torch.all(_per_edit_norm(e_ours - delta) < 0.01 * d), _per_edit_norm(e_ours - delta) / d
    assert torch.all(_per_edit_norm(e_naive - delta) > 2 * d), _per_edit_norm(e_naive - delta) / d


# ---- 3. FlowEdit against a transcription of the published algorithm ------------------------------
def _noise_draws(gens, shape, n_avg: int) -> list[torch.Tensor]:
    """One step's noises as dds draws them: for each of n_avg, one randn per edit from that
    edit's generator (seed + i), at every step of the last n_max (the sampling steps too)."""
    return [torch.stack([torch.randn(shape, generator=g) for g in gens]) for _ in range(n_avg)]


def flowedit_sd3_reference(pipe, x_src, src, tgt, big_t, n_max, n_min, n_avg, w_src, w_tgt,
                           seed):
    """FlowEdit on SD3 as published (the official FlowEditSD3): the stock scheduler's T-step
    schedule, true CFG in one call, Euler steps on z_edit; the last n_min steps sample the
    target from the edit noised once.  Noises: `_noise_draws` (dds's order).  The official
    sampling step reads (t_im1 - t_im1), a typo that makes it a no-op; this is the intended
    (t_im1 - t_i), as its FLUX version has it."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        retrieve_timesteps,
    )

    scheduler = copy.deepcopy(pipe.scheduler)
    timesteps, big_t = retrieve_timesteps(scheduler, big_t, "cpu")
    prompts = _sd3_prompts(pipe, src, tgt)
    b = x_src.shape[0]
    gens = [torch.Generator().manual_seed(seed + k) for k in range(b)]
    zt_edit, xt_tar = x_src.clone(), None
    for i, t in enumerate(timesteps):
        if big_t - i > n_max:
            continue
        noises = _noise_draws(gens, x_src.shape[1:], n_avg)
        t_i = t / 1000
        t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
        if big_t - i > n_min:
            v_delta = torch.zeros_like(x_src)
            for noise in noises:
                zt_src = (1 - t_i) * x_src + t_i * noise
                zt_tar = zt_edit + zt_src - x_src
                v_src, v_tar = _sd3_velocities(pipe, torch.cat([zt_src, zt_src, zt_tar, zt_tar]),
                                               t, prompts, w_src, w_tgt)
                v_delta = v_delta + (1 / n_avg) * (v_tar - v_src)
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta
        else:
            if i == big_t - n_min:
                xt_src = scheduler.scale_noise(x_src, t.expand(b), noises[0])
                xt_tar = zt_edit + xt_src - x_src
            _, v_tar = _sd3_velocities(pipe, torch.cat([xt_tar] * 4), t, prompts, w_src, w_tgt)
            xt_tar = xt_tar + (t_im1 - t_i) * v_tar
    return zt_edit if n_min == 0 else xt_tar


def flowedit_flux_reference(pipe, x_src, src, tgt, big_t, n_max, n_min, n_avg, w_src, w_tgt,
                            seed):
    """FlowEdit on FLUX.1-dev as published (the official FlowEditFLUX): packed latents, the
    pipeline's sigmas linspace(1, 1/T, T) shifted with mu for the token count, guidance through
    the embedding, one transformer call per branch.  Noises: `_noise_draws` on the unpacked
    latents (dds's order), then packed."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    b, c, h, w = x_src.shape
    vsf = pipe.vae_scale_factor
    x = pipe._pack_latents(x_src, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    conf = scheduler.config
    mu = calculate_shift(x.shape[1], conf.base_image_seq_len, conf.max_image_seq_len,
                         conf.base_shift, conf.max_shift)
    timesteps, big_t = retrieve_timesteps(scheduler, big_t, "cpu",
                                          sigmas=np.linspace(1.0, 1 / big_t, big_t), mu=mu)
    with torch.no_grad():
        enc = {"src": pipe.encode_prompt(src, None, device="cpu"),
               "tgt": pipe.encode_prompt(tgt, None, device="cpu")}
    guidance = {"src": torch.full((b,), w_src), "tgt": torch.full((b,), w_tgt)}

    def velocity(latents, key, t):
        embeds, pooled, txt_ids = enc[key]
        with torch.no_grad():
            return pipe.transformer(hidden_states=latents, timestep=t.expand(b) / 1000,
                                    guidance=guidance[key], pooled_projections=pooled,
                                    encoder_hidden_states=embeds, txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False)[0]

    gens = [torch.Generator().manual_seed(seed + k) for k in range(b)]
    zt_edit, xt_tar = x.clone(), None
    for i, t in enumerate(timesteps):
        if big_t - i > n_max:
            continue
        noises = [pipe._pack_latents(n, b, c, h, w)
                  for n in _noise_draws(gens, (c, h, w), n_avg)]
        t_i, t_im1 = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        if big_t - i > n_min:
            v_delta = torch.zeros_like(x)
            for noise in noises:
                zt_src = (1 - t_i) * x + t_i * noise
                zt_tar = zt_edit + zt_src - x
                v_delta = v_delta + (1 / n_avg) * (velocity(zt_tar, "tgt", t)
                                                   - velocity(zt_src, "src", t))
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta
        else:
            if i == big_t - n_min:
                xt_tar = zt_edit + (1 - t_i) * x + t_i * noises[0] - x
            xt_tar = xt_tar + (t_im1 - t_i) * velocity(xt_tar, "tgt", t)
    out = zt_edit if n_min == 0 else xt_tar
    return pipe._unpack_latents(out, h * vsf, w * vsf, vsf)


def _flowedit_cfg(big_t, n_max, n_min, n_avg, w_src, w_tgt, seed) -> EditConfig:
    return EditConfig(method="flowedit", steps=big_t, n_max=n_max, n_min=n_min, n_avg=n_avg,
                      guidance=w_tgt, source_guidance=w_src, seed=seed)


def _check_same_edit(got, want, z_hat, what):
    """got == want to float rounding (1e-4 of the latents' scale), and the edit moved z."""
    scale = z_hat.abs().amax()
    diff, moved = (got - want).abs().amax(), (want - z_hat).abs().amax()
    print(f"{what}: max |dds - reference| = {diff:.3g}, latent scale {scale:.3g}, "
          f"edit moved z by up to {moved:.3g}")
    assert moved > 0.01 * scale
    assert diff <= 1e-4 * scale


@pytest.mark.parametrize("settings", [
    (6, 3, 0, 2, 3.5, 13.5, 3),  # T, n_max, n_min, n_avg, cfg_src, cfg_tgt, seed
    (6, 3, 1, 2, 3.5, 13.5, 8),  # the last step samples the target alone
])
def test_flowedit_sd3_is_the_published_algorithm(sd3, sd3_pipe, settings):
    z_hat = _randn(2, 16, 8, 8, seed=20)
    want = flowedit_sd3_reference(sd3_pipe, z_hat, SRC, TGT, *settings)
    got = edit_latents(sd3, z_hat, sd3.encode_prompt(SRC), sd3.encode_prompt(TGT),
                       _flowedit_cfg(*settings))
    _check_same_edit(got, want, z_hat, f"FlowEdit SD3 {settings}")


def test_flowedit_flux_dev_is_the_published_algorithm(flux, flux_pipe):
    """Guidance through the embedding; the last step samples the target alone."""
    settings = (5, 4, 1, 1, 1.5, 5.5, 11)
    z_hat = _randn(1, 16, 8, 8, seed=21)  # one edit: FLUX's 512 text tokens cost per row
    assert flux.guidance_embedded
    want = flowedit_flux_reference(flux_pipe, z_hat, SRC[1:], TGT[1:], *settings)
    got = edit_latents(flux, z_hat, flux.encode_prompt(SRC[1:]), flux.encode_prompt(TGT[1:]),
                       _flowedit_cfg(*settings))
    _check_same_edit(got, want, z_hat, f"FlowEdit FLUX.1-dev {settings}")


# ---- 4. the fast path ------------------------------------------------------------------------------
FAST_CASES = {
    "flowedit": dict(method="flowedit", steps=4, n_max=3, n_min=1, n_avg=2, guidance=13.5,
                     source_guidance=3.5, seed=4),
    "dds": dict(method="dds", steps=3, guidance=7.5, source_guidance=3.5, lr=1.0, seed=4),
}


@pytest.fixture(scope="module")
def fast_editors():
    """One FastEditor per model, kept between tests as a user keeps one (its traces too)."""
    return {}


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["flowedit", "dds"])
def test_fast_editor_is_edit_latents(request, fast_editors, family, method):
    model = request.getfixturevalue(family)
    editor = fast_editors.setdefault(family, FastEditor(model))
    assert editor.trace  # the CPU default: the denoiser's call traced, batches split by rows
    cfg = EditConfig(**FAST_CASES[method])
    b = 2 if family == "sd3" else 1  # FLUX's 512 text tokens cost per row
    z_hat = _randn(b, 16, 8, 8, seed=22)
    c_src, c_tgt = model.encode_prompt(SRC[:b]), model.encode_prompt(TGT[:b])
    want = edit_latents(model, z_hat, c_src, c_tgt, cfg)
    got = editor.edit(z_hat, c_src, c_tgt, cfg)
    assert len(editor._traced) > 0  # the step ran through traces, not the eager call
    _check_same_edit(got, want, z_hat, f"FastEditor {family} {method}")


# ---- 5. settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, field", [
    ({"steps": 10, "n_max": 11}, "n_max"),
    ({"steps": 10, "n_max": 5, "n_min": 6}, "n_min"),
    ({"steps": 10, "n_min": 11}, "n_min"),
    ({"n_avg": 0}, "n_avg"),
])
def test_edit_config_refuses_flowedit_settings(settings, field):
    with pytest.raises(SettingError) as e:
        EditConfig(method="flowedit", **settings)
    assert e.value.field == field and str(e.value).startswith(f"{field} = ")


def test_edit_config_accepts_the_edges():
    cfg = EditConfig(method="flowedit", steps=10, n_max=10, n_min=10, n_avg=1)
    assert (cfg.n_max, cfg.n_min, cfg.n_avg) == (10, 10, 1)
