"""Score math: closed forms on an analytic denoiser, invariants, and the surrogate loss."""

import pytest
import torch

from dds.errors import DDSError
from dds.score import (
    alpha_sigma,
    cfg,
    dds_grad,
    grad_to_loss,
    guided_eps,
    guided_eps_captions,
    noise_input,
    sds_grad,
    timestep_weight,
    v_to_eps,
    x0_from_eps,
)

T = 1000
A_BAR = torch.linspace(0.9991, 0.0047, T)  # any decreasing schedule in (0, 1)


def gaussian_denoiser(z_t, t, emb):
    """Exact E[eps | z_t] for data z ~ N(m, I), where m = emb[:, 0, 0] (per sample).

    With alpha^2 + sigma^2 = 1 the posterior mean of eps is sigma (z_t - alpha m).
    """
    alpha, sigma = alpha_sigma(A_BAR, t)
    m = emb[:, 0, 0].view(-1, 1, 1, 1)
    return sigma.view(-1, 1, 1, 1) * (z_t - alpha.view(-1, 1, 1, 1) * m)


def emb_of(m, b=2):
    return torch.full((b, 3, 5), float(m))


def test_noise_input_closed_form():
    z, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 700])
    z_t = noise_input(z, eps, t, A_BAR)
    for i in range(2):
        a = A_BAR[t[i]]
        assert torch.allclose(z_t[i], a.sqrt() * z[i] + (1 - a).sqrt() * eps[i])


def test_x0_from_eps_inverts_the_forward_process():
    z, eps = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    t = torch.tensor([0, 450, 999])
    assert torch.allclose(x0_from_eps(noise_input(z, eps, t, A_BAR), eps, t, A_BAR), z, atol=1e-4)
    # one scalar t for the whole batch, against the closed form
    t0 = torch.tensor(300)
    z_t = noise_input(z, eps, t0, A_BAR)
    want = (z_t - (1 - A_BAR[300]).sqrt() * eps) / A_BAR[300].sqrt()
    assert torch.equal(x0_from_eps(z_t, eps, t0, A_BAR), want)


def test_cfg_limits():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert torch.equal(cfg(u, c, 0.0), u)
    # u + 1 * (c - u) is c up to float32 rounding of the order of |u| eps, not of |c| eps
    assert torch.allclose(cfg(u, c, 1.0), c, rtol=0, atol=1e-6)
    assert torch.allclose(cfg(u, c, 7.5), u + 7.5 * (c - u), rtol=0, atol=1e-6)


def test_sds_closed_form_on_gaussian_denoiser():
    z, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, w = torch.tensor([100, 800]), 7.5
    g = sds_grad(gaussian_denoiser, z, emb_of(0.0), emb_of(2.0), t, eps, A_BAR, w)
    alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(A_BAR, t))
    m_w = 0.0 + w * (2.0 - 0.0)
    expected = sigma * alpha * (z - m_w) - alpha**2 * eps
    assert torch.allclose(g, expected, atol=1e-5)


def test_dds_closed_form_cancels_noise():
    """On the Gaussian denoiser DDS = sigma alpha [(z - zhat) - w (m_y - m_yhat)]: no eps."""
    z, zhat = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, w = torch.tensor([300, 600]), 5.0
    grads = [dds_grad(gaussian_denoiser, z, zhat, emb_of(0.0), emb_of(3.0), emb_of(1.0), t,
                      torch.randn(2, 4, 3, 3), A_BAR, w) for _ in range(2)]
    alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(A_BAR, t))
    expected = sigma * alpha * ((z - zhat) - w * (3.0 - 1.0))
    assert torch.allclose(grads[0], expected, atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)  # independent of the noise draw


class Net(torch.nn.Module):
    """A small nonlinear, text-conditioned noise predictor (deterministic weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(5, 4)
        self.calls = []

    def forward(self, z_t, t, emb):
        self.calls.append(z_t.shape[0])
        bias = self.proj(emb.mean(1)).view(-1, 4, 1, 1)
        return torch.tanh(self.conv(z_t)) * (1 + t.view(-1, 1, 1, 1) / 1000) + bias


def test_dds_is_difference_of_sds_and_one_batched_call():
    net = Net()
    z, zhat, eps = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    t = torch.tensor([50, 400, 948])
    eu, et, es = torch.randn(3, 7, 5), torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    with torch.no_grad():
        d = dds_grad(net, z, zhat, eu, et, es, t, eps, A_BAR, 7.5)
        assert net.calls == [12]  # (source, target) x (uncond, cond) in one batch
        s1 = sds_grad(net, z, eu, et, t, eps, A_BAR, 7.5)
        s2 = sds_grad(net, zhat, eu, es, t, eps, A_BAR, 7.5)
    assert torch.allclose(d, s1 - s2, atol=1e-5)  # Eq. 4
    assert d.abs().max() > 1e-3


def test_guided_eps_captions_shares_the_unconditional_branch():
    net = Net()
    z_t = torch.randn(3, 4, 6, 6)
    t = torch.tensor([10, 500, 990])
    eu, e1, e2 = torch.randn(3, 7, 5), torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    with torch.no_grad():
        g1, g2 = guided_eps_captions(net, z_t, t, eu, [e1, e2], 7.5)
        assert net.calls == [9]  # one unconditional batch + two conditional ones
        for g, e in ((g1, e1), (g2, e2)):  # each equals its own two-branch CFG
            u, c = net(z_t, t, eu), net(z_t, t, e)
            assert torch.allclose(g, u + 7.5 * (c - u), atol=1e-5)
            assert torch.allclose(g, guided_eps(net, z_t, t, eu, e, 7.5), atol=1e-5)
    assert (g1 - g2).abs().max() > 1e-3


def test_dds_zero_for_identical_pairs():
    net = Net()
    z, eps, t = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.tensor([77, 900])
    eu, e = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    with torch.no_grad():
        d = dds_grad(net, z, z.clone(), eu, e, e.clone(), t, eps, A_BAR, 7.5)
    assert d.abs().max() < 1e-6  # exact up to float rounding across batch positions


def test_surrogate_gradient_is_the_score():
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.randn(2, 4, 5, 5)
    grad_to_loss(z, g).backward()
    assert torch.equal(z.grad, g)
    z.grad = None
    (3.0 * grad_to_loss(z, g)).backward()
    assert torch.allclose(z.grad, 3.0 * g)


def test_v_prediction_to_eps():
    z0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([5, 999])
    alpha, sigma = (s.view(-1, 1, 1, 1) for s in alpha_sigma(A_BAR, t))
    z_t = alpha * z0 + sigma * eps
    v = alpha * eps - sigma * z0  # the definition of v (Salimans & Ho)
    assert torch.allclose(v_to_eps(v, z_t, t, A_BAR), eps, atol=1e-5)


def test_timestep_weight():
    t = torch.tensor([0, 500, 999])
    assert torch.equal(timestep_weight(A_BAR, t), torch.ones(3))
    alpha, sigma = alpha_sigma(A_BAR, t)
    assert torch.allclose(timestep_weight(A_BAR, t, 1.0, 2.0), alpha * sigma**2)


def test_sds_and_dds_accept_a_scalar_timestep():
    """A 0-dim t means the same t for every edit, for both scores."""
    net = Net()
    z, zhat, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    eu, et, es = torch.randn(2, 7, 5), torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    t0, t2 = torch.tensor(321), torch.tensor([321, 321])
    with torch.no_grad():
        assert torch.equal(sds_grad(net, z, eu, et, t0, eps, A_BAR, 7.5),
                           sds_grad(net, z, eu, et, t2, eps, A_BAR, 7.5))
        assert torch.equal(dds_grad(net, z, zhat, eu, et, es, t0, eps, A_BAR, 7.5),
                           dds_grad(net, z, zhat, eu, et, es, t2, eps, A_BAR, 7.5))


def test_methods_are_the_score_functions():
    """The method classes compute exactly dds_grad and sds_grad, and build one batch each."""
    from dds.methods import DDS, SDS, get_method

    net = Net()
    z, zhat, eps = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    t = torch.tensor([50, 400, 948])
    eu, et, es = torch.randn(3, 7, 5), torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    with torch.no_grad():
        d = DDS().grad(net, z, zhat, DDS().conditioning(eu, es, et), t, eps, A_BAR, 7.5)
        s = SDS().grad(net, z, zhat, SDS().conditioning(eu, es, et), t, eps, A_BAR, 7.5)
        assert torch.equal(d, dds_grad(net, z, zhat, eu, et, es, t, eps, A_BAR, 7.5))
        assert torch.equal(s, sds_grad(net, z, eu, et, t, eps, A_BAR, 7.5))
    assert net.calls[:2] == [3 * DDS.rows, 3 * SDS.rows]
    assert get_method("dds").uses_source and not get_method("sds").uses_source
    with pytest.raises(DDSError, match="method 'ddim'"):
        get_method("ddim")


def test_conditioning_objects_flow_through_the_math():
    """Scores take Conditioning objects (with pooled parts) exactly as plain tensors."""
    from dds.models.base import Conditioning

    seen = {}

    def eps_fn(z_t, t, cond):
        seen["pooled"] = cond.pooled
        return gaussian_denoiser(z_t, t, cond.embeds) + cond.pooled.view(-1, 1, 1, 1)

    def plain(z_t, t, emb):
        return gaussian_denoiser(z_t, t, emb)

    z, zhat, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([100, 700])
    u, s, y = emb_of(0.0), emb_of(1.0), emb_of(2.0)
    zero = torch.zeros(2, 1)
    cu, cs, cy = (Conditioning(e, zero) for e in (u, s, y))
    d = dds_grad(eps_fn, z, zhat, cu, cy, cs, t, eps, A_BAR, 3.0)
    assert seen["pooled"].shape == (8, 1)  # the pooled part was batched with the embeddings
    assert torch.equal(d, dds_grad(plain, z, zhat, u, y, s, t, eps, A_BAR, 3.0))


def test_sgd_step_is_torch_sgd_on_the_surrogate_bit_for_bit():
    from dds.score import sgd_step

    z0, g = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=0.1)
    (2000 / 4096 * grad_to_loss(z, g)).backward()
    opt.step()
    assert torch.equal(sgd_step(z0, g, 0.1, 2000 / 4096), z.detach())


def test_noise_schedule_object_equals_the_bare_tensor():
    from dds.models.base import NoiseSchedule

    sched = NoiseSchedule(A_BAR)
    t = torch.tensor([0, 37, 999])
    a, s = sched.alpha_sigma(t)
    assert torch.allclose(a, A_BAR[t].sqrt()) and torch.allclose(s, (1 - A_BAR[t]).sqrt())
    z, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(noise_input(z, eps, t, sched), noise_input(z, eps, t, A_BAR))
