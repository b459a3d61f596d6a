"""The caption gap (`dds.eval.caption_gap`) against closed forms on a stub backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dds.eval.caption_gap import caption_gaps, gap_scenes, object_cover
from dds.models.base import NoiseSchedule
from dds.world import parse_caption


class ConstantBackend:
    """Latents are zero; the k-th prompt list encoded predicts the constant 0.1 * k everywhere
    (the own captions, encoded first, predict 0)."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def encode(self, x):
        return torch.zeros(x.shape[0], 4, 8, 8)

    def schedule_for(self, shape):
        return NoiseSchedule(torch.linspace(0.99, 0.01, 1000))

    def encode_prompt(self, prompts):
        self.calls += 1
        return torch.full((len(prompts),), 0.1 * (self.calls - 1))

    def predict_eps(self, z_t, t, cond):
        return cond[:, None, None, None].expand(z_t.shape)


def test_gap_scenes_change_exactly_one_word():
    scenes, caps = gap_scenes(12, seed=3)
    assert len(scenes) == 12 and all(len(s.objects) == 1 for s in scenes)
    assert caps["empty"] == [""] * 12
    for i in range(12):
        own = parse_caption(caps["own"][i])
        for word, field in (("shape", "shape"), ("colour", "color")):
            other = parse_caption(caps[word][i])
            assert other["objects"][0][field] != own["objects"][0][field]
            assert other["background"] == own["background"]
        assert parse_caption(caps["background"][i])["background"] != own["background"]
    upright, _ = gap_scenes(12, seed=3, upright=True)
    assert all(o.angle == 0.0 for s in upright for o in s.objects)
    assert [s.objects[0].shape for s in upright] == [s.objects[0].shape for s in scenes]


def test_caption_gap_matches_the_closed_form_of_a_constant_prediction():
    # A constant prediction c against the noise n: MSE(c) - MSE(0) = c^2 - 2 c mean(n), over the
    # whole latent and, weighted by the object's coverage, over its cells.
    scenes, caps = gap_scenes(6, seed=1)
    seed = 7
    rows = caption_gaps(ConstantBackend(), scenes, {k: caps[k] for k in ("own", "shape", "colour")},
                        [100, 800], seed, batch=4)
    noise = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).double()
    cover = object_cover(scenes, 8).double()
    n_mean = {"whole": noise.mean(dim=(1, 2, 3)).numpy(),
              "object": ((noise.mean(dim=1, keepdim=True) * cover).sum(dim=(1, 2, 3))
                         / cover.sum(dim=(1, 2, 3))).numpy()}
    assert [(r["t"], r["region"]) for r in rows] == [(100, "whole"), (100, "object"),
                                                     (800, "whole"), (800, "object")]
    for r in rows:
        assert r["own_mse"] == pytest.approx(float(noise.square().mean()), rel=0.2)
        for k, c in (("shape", 0.1), ("colour", 0.2)):
            per_scene = 1000.0 * (c * c - 2.0 * c * n_mean[r["region"]])
            assert r[k]["gap_x1000"] == pytest.approx(per_scene.mean(), abs=1e-3)
            half = 2.570582 * per_scene.std(ddof=1) / np.sqrt(6)  # t(0.975, 5 dof), tables
            assert r[k]["ci95"] == pytest.approx(half, abs=1e-3)


def test_word_flow_reads_zero_before_cross_attention_and_the_eps_change_by_hand():
    from diffusers import UNet2DConditionModel

    from dds.eval.caption_gap import word_flow

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=4, norm_num_groups=4).eval()
    z_t, t = torch.randn(3, 4, 8, 8), torch.tensor([100, 500, 900])
    own, other = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    cover = torch.rand(3, 1, 16, 16)
    flow = word_flow(unet, z_t, t, {"own": own, "same": own.clone(), "other": other}, cover)
    assert list(flow) == ["down0", "down1", "mid", "up0", "up1", "eps"]
    assert all(v["same"] == 0.0 for v in flow.values())
    assert flow["down0"]["other"] == 0.0  # no cross-attention before it
    assert all(flow[k]["other"] > 0 for k in ("down1", "mid", "up0", "up1", "eps"))
    # The noise prediction's entry from two plain calls and the coverage pooled by hand.
    with torch.no_grad():
        a = unet(z_t, t, encoder_hidden_states=own).sample
        b = unet(z_t, t, encoder_hidden_states=other).sample
    w = cover.reshape(3, 1, 8, 2, 8, 2).mean(dim=(3, 5))
    w = w / w.sum(dim=(1, 2, 3), keepdim=True)
    expect = (((b - a).norm(dim=1, keepdim=True) * w).sum(dim=(1, 2, 3))
              / ((a.norm(dim=1, keepdim=True) * w).sum(dim=(1, 2, 3)))).mean()
    assert flow["eps"]["other"] == pytest.approx(float(expect), rel=1e-5)
    assert not unet._forward_hooks and not unet.down_blocks[0]._forward_hooks


class SwapOracle:
    """Latents are the images average-pooled to 8x8 (RGB and their mean). The k-th prompt list
    encoded stands for the clean latent src + f (latents[k] - src): a model whose noise
    prediction, (z_t - alpha x0) / sigma, makes the share f of each caption's change exactly."""

    device = torch.device("cpu")

    def __init__(self, latents: list[torch.Tensor], f: float):
        self.latents, self.f, self.calls = latents, f, 0

    def encode(self, x):
        z = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([z, z.mean(dim=1, keepdim=True)], dim=1)

    def schedule_for(self, shape):
        return NoiseSchedule(torch.linspace(0.99, 0.01, 1000))

    def encode_prompt(self, prompts):
        src, k = self.latents[0], self.calls
        self.calls += 1
        return src + self.f * (self.latents[k] - src)

    def predict_eps(self, z_t, t, x0):
        alpha, sigma = self.schedule_for(z_t.shape).alpha_sigma(t)
        return (z_t - alpha[:, None, None, None] * x0) / sigma[:, None, None, None]


@pytest.mark.parametrize("f", [1.0, 0.3, -0.5])
def test_swap_directions_read_an_exact_oracle_as_cosine_one_and_its_share_of_the_change(f):
    from dds.eval.caption_gap import clean_latents, gap_edits, swap_directions

    scenes, edits = gap_edits(5, seed=2)
    edits = {w: edits[w] for w in ("shape", "colour")}
    probe = SwapOracle([], f)
    probe.latents = [clean_latents(probe, ss) for ss in
                     (scenes, [e.target for e in edits["shape"]], [e.target for e in edits["colour"]])]
    rows = swap_directions(probe, edits, [200, 700], seed=4, batch=2)
    assert [(r["t"], r["word"], r["reference"]) for r in rows] == [
        (200, "shape", "exact"), (200, "colour", "exact"),
        (700, "shape", "exact"), (700, "colour", "exact")]
    for r in rows:
        assert r["cosine"]["mean"] == pytest.approx(np.sign(f), abs=1e-6)
        assert r["gain"]["mean"] == pytest.approx(f, abs=1e-6)
        assert r["gain"]["ci95"] == pytest.approx(0.0, abs=1e-6)


def test_swap_agreement_and_the_ideal_change_by_hand():
    from dds.eval.caption_gap import ideal_eps_change, swap_agreement

    # Two cells of one channel; the second has no weight, so the model's change there is unseen.
    ideal = torch.tensor([[[[2.0, 1.0]]]])
    weight = torch.tensor([[[[1.0, 0.0]]]])
    found = swap_agreement(torch.tensor([[[[1.0, 5.0]]]]), ideal, weight)
    assert found["cosine"][0] == pytest.approx(1.0) and found["gain"][0] == pytest.approx(0.5)
    # Orthogonal on the weighted cells: (1, 1) against (1, -1), equal weights.
    found = swap_agreement(torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[1.0, -1.0]]]]),
                           torch.ones(1, 1, 1, 2))
    assert found["cosine"][0] == pytest.approx(0.0) and found["gain"][0] == pytest.approx(0.0)
    # -alpha / sigma times the change of the clean latent, at t = 0 and t = 999 of the schedule.
    schedule = NoiseSchedule(torch.linspace(0.99, 0.01, 1000))
    z0, z1 = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    got = ideal_eps_change(z0, z1, torch.tensor([0, 999]), schedule).flatten()
    expect = [-(0.99 / 0.01) ** 0.5, -(0.01 / 0.99) ** 0.5]
    assert got.tolist() == pytest.approx(expect, rel=1e-5)


def test_rotation_mean_latents_keep_a_shape_its_symmetry_keeps():
    from dds.eval.caption_gap import gap_edits, rotation_mean_latents, turned
    from dds.eval.experiments.common import encode01
    from dds.eval.world_edits import images_of

    scenes, _ = gap_edits(40, seed=5)
    square = next(s for s in scenes if s.objects[0].shape == "square")
    star = next(s for s in scenes if s.objects[0].shape == "star")
    probe = SwapOracle([], 1.0)
    own = encode01(probe, images_of([square, star]))
    assert turned(square, 0.5).objects[0].angle == pytest.approx(square.objects[0].angle + 0.5)
    # Quarter turns leave a square as it is, fifths of a turn a five-pointed star.
    quarters = rotation_mean_latents(probe, [square], 4)
    fifths = rotation_mean_latents(probe, [star], 5)
    assert torch.allclose(quarters, own[:1], atol=2e-3)
    assert torch.allclose(fifths, own[1:], atol=2e-3)
    # Eighths of a turn do not (a square at 45 degrees is another image).
    assert (rotation_mean_latents(probe, [square], 8) - own[:1]).abs().max() > 0.02


def test_swap_directions_by_value_split_the_scenes_by_the_value_changed_to():
    from dds.eval.caption_gap import clean_latents, gap_edits, swap_directions

    scenes, edits = gap_edits(8, seed=3)
    edits = {"colour": edits["colour"]}
    values = [e.new_value for e in edits["colour"]]
    first = sorted(set(values))[0]
    # The oracle makes the whole change towards the first colour and half of every other one.
    share = torch.tensor([1.0 if v == first else 0.5 for v in values]).view(-1, 1, 1, 1)
    probe = SwapOracle([], 1.0)
    src = clean_latents(probe, scenes)
    probe.latents = [src, src + share * (clean_latents(probe, [e.target for e in edits["colour"]])
                                         - src)]
    rows = swap_directions(probe, edits, [500], seed=4, batch=4, by_value=True)
    assert "value" not in rows[0]
    assert rows[0]["gain"]["mean"] == pytest.approx(float(share.mean()), abs=1e-6)
    split = rows[1:]
    assert [r["value"] for r in split] == sorted(set(values))
    assert [r["n"] for r in split] == [values.count(v) for v in sorted(set(values))]
    for r in split:
        assert r["cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
        assert r["gain"]["mean"] == pytest.approx(1.0 if r["value"] == first else 0.5, abs=1e-6)
