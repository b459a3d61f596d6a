"""Score distillation's timestep schedules, noise averaging and step rules: what each draws,
and that the loop and the fast path run them alike."""

from __future__ import annotations

import pytest
import torch

from dds.errors import SettingError
from dds.loop import EditConfig, edit_latents
from dds.methods import (
    DDS,
    TIMESTEP_SCHEDULES,
    descending_levels,
    draw_t_eps,
    stratified_levels,
    uniform_levels,
)


def _levels(fn, steps, cfg, seeds=(0, 1, 2)):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.stack([fn(i, steps, gens, cfg) for i in range(steps)])  # (S, B)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_descending_levels_fall_through_every_stratum(steps):
    cfg = EditConfig(steps=steps)
    lo, hi = cfg.t_min, cfg.t_max - 1
    t = _levels(descending_levels, steps, cfg)
    assert t.min() >= lo and t.max() < hi
    width = (hi - lo) / steps
    for i in range(steps):  # step i lies in stratum i counted from the noisiest
        top = hi - i * width
        assert ((t[i] >= top - width - 1) & (t[i] < top)).all(), (i, t[i])
    assert (t[1:] <= t[:-1]).all()  # never rises


def test_stratified_levels_visit_each_stratum_once_in_a_fixed_order():
    steps = 20
    cfg = EditConfig(steps=steps, seed=5)
    lo, hi = cfg.t_min, cfg.t_max - 1
    t = _levels(stratified_levels, steps, cfg)
    strata = ((t - lo).float() * steps / (hi - lo)).floor().long()
    for b in range(t.shape[1]):
        assert sorted(strata[:, b].tolist()) == list(range(steps))  # each stratum once
    assert (strata == strata[:, :1]).all()  # the same order for every edit
    other = _levels(stratified_levels, steps, EditConfig(steps=steps, seed=9))
    assert torch.equal(((other - lo).float() * steps / (hi - lo)).floor().long(), strata)
    assert not (t[1:] <= t[:-1]).all()  # not descending


def test_reference_draws_are_the_recipes():
    cfg = EditConfig()
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    a = uniform_levels(0, 200, gens, cfg)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    b, _ = draw_t_eps(gens, (4, 2, 2), cfg)
    assert torch.equal(a, b) and set(TIMESTEP_SCHEDULES) == {"reference", "descending",
                                                            "stratified"}


class Linear:
    """eps(z_t) = A z_t + c(cond): an analytic denoiser for closed-form checks."""

    device = torch.device("cpu")
    guidance_embedded = False

    def __init__(self):
        from dds.models.base import NoiseSchedule

        self.schedule = NoiseSchedule(torch.linspace(0.999, 0.01, 1000))

    def schedule_for(self, shape):
        return self.schedule

    def uncond(self):
        return torch.zeros(1, 1, 8)

    def predict_eps(self, z_t, t, emb):
        return 0.5 * z_t + emb.reshape(z_t.shape)


class Const(Linear):
    """eps = c(cond): DDS's gradient is then the same at every z, t and noise."""

    def predict_eps(self, z_t, t, emb):
        return emb.reshape(z_t.shape)


def test_noise_averaging_is_the_mean_of_the_draws_gradients():
    model, z_hat = Linear(), torch.randn(2, 2, 2, 2)
    cs, ct = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    cfg = EditConfig(steps=1, n_avg=3, schedule="descending", seed=1)
    out = edit_latents(model, z_hat, cs, ct, cfg)
    # By hand: the same draws (level, then three noises, per edit), the mean of three grads.
    m = DDS()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    d = m.draw(0, gens, (2, 2, 2), cfg, model.schedule)
    assert d.eps.shape == (3, 2, 2, 2, 2)
    cond = m.conditioning(model.uncond().expand(2, 1, 8), cs, ct, cfg)
    grads = [m.grad(model.predict_eps, z_hat, z_hat, cond, d.t, e, model.schedule, 7.5)
             for e in d.eps]
    want = z_hat - cfg.lr * cfg.loss_scale / cfg.reference_area * (sum(grads) / 3)
    assert torch.allclose(out, want, atol=1e-6)


def test_budget_rule_travels_as_far_as_the_reference():
    ref, short = EditConfig(), EditConfig(steps=50, step_rule="budget")
    assert short.step_per_element * 50 == pytest.approx(ref.step_per_element * 200)
    assert EditConfig(steps=50).step_per_element == ref.step_per_element


def test_decay_rule_travels_as_far_as_budget_in_falling_steps():
    """With a gradient that does not depend on z, SGD's path is the sum of its steps: decay's
    steps are budget's times 2 (S - i) / (S + 1), and the whole edit moves as far."""
    from dds.methods import step_factor

    S = 7
    decay, budget = EditConfig(steps=S, step_rule="decay"), EditConfig(steps=S, step_rule="budget")
    assert [step_factor(i, decay) for i in range(S)] == pytest.approx(
        [2 * (S - i) / (S + 1) for i in range(S)])
    assert sum(step_factor(i, decay) for i in range(S)) == pytest.approx(S)
    assert step_factor(3, budget) == 1.0 and decay.step_per_element == budget.step_per_element
    model, z_hat = Const(), torch.zeros(2, 2, 2, 2)
    cs, ct = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    moved = {r: edit_latents(model, z_hat, cs, ct, EditConfig(steps=S, step_rule=r, lr=0.05))
             for r in ("decay", "budget")}
    assert (moved["budget"] - z_hat).abs().max() > 1e-3
    assert torch.allclose(moved["decay"], moved["budget"], atol=1e-6)
    # ... along another path: step i moves 2 (S - i) / (S + 1) times budget's step
    paths = {r: [] for r in ("decay", "budget")}
    for r, seen in paths.items():
        edit_latents(model, z_hat, cs, ct, EditConfig(steps=S, step_rule=r, lr=0.05),
                     on_step=lambda info, seen=seen: seen.append(info.z.clone()))
    step = {r: [b - a for a, b in zip([z_hat, *p[:-1]], p, strict=True)]
            for r, p in paths.items()}
    for i in range(S):
        assert torch.allclose(step["decay"][i], step["budget"][i] * 2 * (S - i) / (S + 1),
                              atol=1e-6), i
    with pytest.raises(SettingError, match="Adam normalises") as e:
        EditConfig(step_rule="decay", optimizer="adam")
    assert e.value.field == "step_rule"


@pytest.mark.parametrize("field, value", [("schedule", "cosine"), ("step_rule", "adam"),
                                          ("optimizer", "lbfgs")])
def test_unknown_options_are_refused(field, value):
    with pytest.raises(SettingError) as e:
        EditConfig(**{field: value})
    assert e.value.field == field and "use one of" in str(e.value)


def test_flowedit_has_no_optimizer():
    with pytest.raises(SettingError, match="no optimiser") as e:
        EditConfig(method="flowedit", optimizer="adam")
    assert e.value.field == "optimizer"


@pytest.mark.parametrize("name, make", [
    ("momentum", lambda p, lr: torch.optim.SGD([p], lr=lr, momentum=0.9)),
    ("adam", lambda p, lr: torch.optim.Adam([p], lr=lr)),
])
def test_optimizers_are_torch_optims_on_the_surrogate_loss(name, make):
    """Each edit step equals torch.optim's step on the reference surrogate loss
    scale * <z, sg(w(t) grad)>, run by hand with the same draws."""
    model, z_hat = Linear(), torch.randn(2, 2, 2, 2)
    cs, ct = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    cfg = EditConfig(steps=5, optimizer=name, lr=0.02, seed=4)
    out = edit_latents(model, z_hat, cs, ct, cfg)
    m, scale = DDS(), cfg.loss_scale / cfg.reference_area
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    cond = m.conditioning(model.uncond().expand(2, 1, 8), cs, ct, cfg)
    z = z_hat.clone().requires_grad_(True)
    opt = make(z, cfg.lr)
    for i in range(cfg.steps):
        d = m.draw(i, gens, (2, 2, 2), cfg, model.schedule)
        with torch.no_grad():
            g = m.grad(model.predict_eps, z, z_hat, cond, d.t, d.eps, model.schedule, 7.5)
        opt.zero_grad()
        (scale * (z * g).sum()).backward()
        opt.step()
    assert (out - z_hat).abs().max() > 1e-3
    assert torch.allclose(out, z.detach(), atol=1e-6), (out - z).abs().max()
    sgd = edit_latents(model, z_hat, cs, ct, EditConfig(steps=5, lr=0.02, seed=4))
    assert (out - sgd).abs().max() > 1e-4  # a different path from plain SGD


@pytest.mark.parametrize("schedule, optimizer, rule, tail", [
    ("descending", "sgd", "budget", 0.0), ("stratified", "sgd", "budget", 0.5),
    ("reference", "adam", "budget", 0.0), ("descending", "momentum", "decay", 0.0)])
def test_fast_path_runs_the_schedules(tiny_backend, schedule, optimizer, rule, tail):
    from dds.fast import FastEditor

    torch.manual_seed(0)
    z_hat = torch.randn(2, 4, 8, 8)
    cs = tiny_backend.encode_prompt(["a red circle", "a blue square"])
    ct = tiny_backend.encode_prompt(["a green circle", "a blue star"])
    cfg = EditConfig(steps=6, schedule=schedule, n_avg=2, step_rule=rule, seed=2,
                     optimizer=optimizer, lr=0.02 if optimizer == "adam" else 0.1,
                     average_tail=tail)
    slow = edit_latents(tiny_backend, z_hat, cs, ct, cfg)
    fast = FastEditor(tiny_backend).edit(z_hat, cs, ct, cfg)
    assert (slow - z_hat).abs().max() > 1e-3
    assert (fast - slow).abs().max() < 1e-4


def test_average_tail_is_the_mean_of_the_last_steps_latents():
    """The result is the mean of the latents after the last round(F x steps) steps, as the
    step hook saw them (each step's own latent); 0 keeps the last latent, bit for bit; the
    trajectory itself is the plain edit's."""
    import threading

    model, z_hat = Linear(), torch.randn(2, 2, 2, 2)
    cs, ct = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    seen, plain = [], []
    cfg = EditConfig(steps=10, lr=0.5, seed=3, average_tail=0.3)
    out = edit_latents(model, z_hat, cs, ct, cfg, on_step=lambda i: seen.append(i.z.clone()))
    last = edit_latents(model, z_hat, cs, ct, cfg.with_(average_tail=0.0),
                        on_step=lambda i: plain.append(i.z.clone()))
    assert all(torch.equal(a, b) for a, b in zip(seen, plain, strict=True))
    assert torch.equal(last, plain[-1])
    want = (seen[7] + seen[8] + seen[9]) / 3
    assert torch.allclose(out, want, atol=1e-6) and (out - last).abs().max() > 1e-4
    # A whole-edit mean, and one step: the mean of one latent is that latent.
    full = edit_latents(model, z_hat, cs, ct, cfg.with_(average_tail=1.0))
    assert torch.allclose(full, torch.stack(seen).mean(0), atol=1e-6)
    one = edit_latents(model, z_hat, cs, ct, cfg.with_(average_tail=0.01))
    assert torch.equal(one, last)
    # Stopped before the tail: the latest latent; inside it: the mean of the tail so far.
    for at, expect in ((5, seen[4]), (9, (seen[7] + seen[8]) / 2)):
        stop = threading.Event()
        got = edit_latents(model, z_hat, cs, ct, cfg, stop=stop,
                           on_step=lambda i, at=at, stop=stop: i.step == at and stop.set())
        assert torch.allclose(got, expect, atol=1e-6), at


@pytest.mark.parametrize("kw, why", [({"average_tail": 1.5}, "from 0 to 1"),
                                     ({"average_tail": -0.1}, "from 0 to 1"),
                                     ({"average_tail": 0.2, "method": "flowedit"}, "ODE")])
def test_average_tail_out_of_range_or_on_flowedit_is_refused(kw, why):
    with pytest.raises(SettingError, match=why) as e:
        EditConfig(**kw)
    assert e.value.field == "average_tail"
