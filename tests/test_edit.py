"""The zero-shot editing loop: parity with the reference arithmetic, seeds, batches, hooks, stop."""

import threading

import pytest
import torch

from dds.errors import DDSError
from dds.loop import EditConfig, edit_latents


def reference_dds_loop(unet, a_bar, z_source, emb_u, emb_s, emb_t, draws, lr=0.1, w=7.5):
    """An independent transcription of the reference recipe's arithmetic (no dds.score)."""
    z_target = z_source.clone().requires_grad_(True)
    opt = torch.optim.SGD(params=[z_target], lr=lr)
    for t, eps in draws:
        with torch.no_grad():
            a = a_bar[t]
            z_t_source = a.sqrt() * z_source + (1 - a).sqrt() * eps
            z_t_target = a.sqrt() * z_target + (1 - a).sqrt() * eps
            z_t = torch.cat((z_t_source, z_t_target))
            latent_input = torch.cat([z_t] * 2)
            timestep = torch.cat([t.view(1)] * 4)
            embedd = torch.cat([emb_u, emb_u, emb_s, emb_t])
            e_t = unet(latent_input, timestep, encoder_hidden_states=embedd).sample
            e_t_uncond, e_t = e_t.chunk(2)
            e_t = e_t_uncond + w * (e_t - e_t_uncond)
            eps_pred_source, eps_pred_target = e_t.chunk(2)
            grad = eps_pred_target - eps_pred_source
        loss = (z_target * grad.clone()).sum() / (z_target.shape[2] * z_target.shape[3])
        opt.zero_grad()
        (2000 * loss).backward()
        opt.step()
    return z_target.detach()


def reference_draws(seed, steps, shape):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        t = torch.randint(50, 949, (), generator=g)
        out.append((t, torch.randn(shape, generator=g)))
    return out


@pytest.fixture(scope="module")
def inputs(tiny_backend):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z_hat = tiny_backend.encode(x)
    emb_s = tiny_backend.encode_prompt(["a red circle"])
    emb_t = tiny_backend.encode_prompt(["a blue square"])
    return z_hat, emb_s, emb_t


def test_parity_with_reference_transcription(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    b = tiny_backend
    draws = reference_draws(7, 4, tuple(z_hat.shape[1:]))
    # At this latent size the reference divides by h*w = 64: same arithmetic as reference_area=64.
    cfg = EditConfig(steps=4, seed=7, reference_area=z_hat.shape[2] * z_hat.shape[3])
    ours = edit_latents(b, z_hat, emb_s, emb_t, cfg)
    a_bar = b.schedule.alphas_cumprod
    ref = reference_dds_loop(b.denoiser, a_bar, z_hat, b.uncond().embeds, emb_s.embeds,
                             emb_t.embeds, draws)
    assert (ours - z_hat).abs().max() > 1e-3  # it moved
    # The CPU default splits each UNet batch by rows over threads (dds.models.trace): rounding
    # differs, and 4 steps of lr 0.1 * 2000 / 64 amplify it (to 1e-4 of the edit's move); unsplit,
    # the arithmetic is the same.
    assert (ours - ref).abs().max() <= 1e-4 * (ref - z_hat).abs().max()
    b._call_frozen.parallel = False
    try:
        ours = edit_latents(b, z_hat, emb_s, emb_t, cfg)
    finally:
        b._call_frozen.parallel = "auto"
    assert torch.allclose(ours, ref, atol=1e-5)

    # The gradient of the first step, too.
    steps = []
    edit_latents(b, z_hat, emb_s, emb_t, cfg.with_(steps=1),
                 on_step=lambda info: steps.append(info.grad_norm))
    t, eps = draws[0]
    ref1 = reference_dds_loop(b.denoiser, a_bar, z_hat, b.uncond().embeds, emb_s.embeds,
                              emb_t.embeds, [(t, eps)], lr=1.0)
    grad_ref = (z_hat - ref1) * 64 / 2000  # one SGD step at lr 1 recovers the gradient
    assert torch.allclose(steps[0], grad_ref.flatten(1).norm(dim=1), rtol=1e-4)


def test_seeded_and_reproducible(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(steps=3, seed=3)
    a = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg)
    b = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg)
    c = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg.with_(seed=4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_equals_single_edits(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    cfg = EditConfig(steps=3)
    z2 = torch.cat([z_hat, z_hat.flip(-1)])
    batch = edit_latents(tiny_backend, z2, emb_s.repeat(2), emb_t.repeat(2), cfg, seeds=[5, 6])
    one = edit_latents(tiny_backend, z2[1:], emb_s, emb_t, cfg, seeds=[6])
    assert torch.allclose(batch[1:], one, atol=1e-5)


def test_dds_identity_edit_does_not_move(tiny_backend, inputs):
    z_hat, emb_s, _ = inputs
    z = edit_latents(tiny_backend, z_hat, emb_s, emb_s, EditConfig(steps=5))
    assert (z - z_hat).abs().max() < 1e-5
    z_sds = edit_latents(tiny_backend, z_hat, emb_s, emb_s, EditConfig(steps=5, method="sds"))
    assert (z_sds - z_hat).abs().max() > 1e-2  # SDS drifts even with the source's own caption


def test_step_size_is_per_element(tiny_backend, inputs):
    """The default moves each element by lr*2000/4096 per unit gradient at every size."""
    z_hat, emb_s, emb_t = inputs
    norms = []
    cfg = EditConfig(steps=1, lr=0.3)
    z = edit_latents(tiny_backend, z_hat, emb_s, emb_t, cfg,
                     on_step=lambda info: norms.append(info.grad_norm))
    moved = (z - z_hat).flatten(1).norm(dim=1)
    assert torch.allclose(moved, norms[0] * 0.3 * 2000 / 4096, rtol=1e-4)
    assert EditConfig().step_per_element == pytest.approx(0.1 * 2000 / 64 / 64)


def test_stop_signal_ends_the_loop_after_the_current_step(tiny_backend, inputs):
    z_hat, emb_s, emb_t = inputs
    seen, latents, stop = [], {}, threading.Event()

    def on_step(info):
        seen.append((info.step, info.total))
        latents[info.step] = info.z
        if info.step == 3:
            stop.set()

    z = edit_latents(tiny_backend, z_hat, emb_s, emb_t, EditConfig(steps=10), on_step=on_step,
                     stop=stop)
    assert seen == [(1, 10), (2, 10), (3, 10)]
    assert torch.equal(z, latents[3])  # the result is the latent after the last step run
    three = edit_latents(tiny_backend, z_hat, emb_s, emb_t, EditConfig(steps=3))
    assert torch.equal(z, three)


def test_a_hooks_return_value_does_not_stop_the_loop(tiny_backend, inputs):
    """A progress hook that returns something truthy (tqdm's update does) must not stop."""
    z_hat, emb_s, emb_t = inputs
    seen = []
    edit_latents(tiny_backend, z_hat, emb_s, emb_t, EditConfig(steps=4),
                 on_step=lambda info: seen.append(info.step) or True)
    assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(guidance=float("nan")), dict(lr=0),
                                 dict(method="ddim"), dict(t_min=900, t_max=900),
                                 dict(lr=float("inf"))])
def test_invalid_config_is_refused(bad):
    with pytest.raises(DDSError, match="invalid"):
        EditConfig(**bad)


@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", 10**9), ("steps", 2.5),
                                         ("guidance", 1e308), ("guidance", -1.0), ("lr", 1e30),
                                         ("seed", 10**20), ("seed", -1), ("seed", float("nan"))])
def test_settings_out_of_range_are_refused_naming_the_field(field, value):
    from dds.errors import SettingError
    from dds.loop import LIMITS

    with pytest.raises(SettingError) as e:
        EditConfig(**{field: value})
    assert e.value.field == field
    lo, hi = LIMITS[field]
    assert str(e.value).startswith(f"{field} = ") and f"from {lo:g}"[:7] in str(e.value)
    assert "Steps" in str(e.value.relabel("Steps")) or field != "steps"


def test_the_limits_themselves_are_accepted():
    from dds.loop import LIMITS

    for field, (lo, hi) in LIMITS.items():
        room = {"steps": 5000} if field in ("n_max", "n_min") else {}  # both at most steps
        for v in (lo, hi):
            assert getattr(EditConfig(**{field: v}, **room), field) == v


class _Exploding:
    """A stand-in model whose noise prediction is `value` everywhere (the loop sees only the
    model interface, so this is all it needs)."""

    device = torch.device("cpu")

    def __init__(self, value):
        from dds.models.base import NoiseSchedule

        self.value = value
        self.schedule = NoiseSchedule(torch.linspace(0.999, 0.01, 1000))

    def uncond(self):
        from dds.models.base import Conditioning

        return Conditioning(torch.zeros(1, 2, 3))

    def schedule_for(self, shape):
        return self.schedule

    def predict_eps(self, z_t, t, cond):
        # Unconditional rows predict 0, conditional rows `value`: a huge guided difference.
        out = torch.zeros_like(z_t)
        out[z_t.shape[0] // 2:] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), 1e30])
def test_a_diverging_edit_is_reported_not_returned(value):
    from dds.errors import DivergedError
    from dds.models.base import Conditioning

    m = _Exploding(value)
    c = Conditioning(torch.ones(1, 2, 3))
    seen = []
    with pytest.raises(DivergedError, match="lower the guidance or the learning rate"):
        edit_latents(m, torch.zeros(1, 4, 8, 8), c, c, EditConfig(steps=50,
                     method="sds"), on_step=lambda info: seen.append(info.step))
    assert len(seen) < 10  # caught at the first check (every step on the CPU, every 10 on a GPU)


def test_a_sane_edit_passes_the_divergence_check():
    from dds.models.base import Conditioning

    m = _Exploding(0.0)  # predicts 0 everywhere: SDS moves z by +eps-sized steps only
    c = Conditioning(torch.ones(1, 2, 3))
    z = edit_latents(m, torch.zeros(1, 4, 8, 8), c, c, EditConfig(steps=20, method="sds"))
    assert torch.isfinite(z).all() and z.abs().max() > 0
