"""The traced, row-split UNet call (dds.models.trace) against the eager module."""

import pytest
import torch

from dds.models.base import Conditioning
from dds.models.trace import TracedUNet, row_chunks


def test_row_chunks_cover_rows_in_order():
    assert row_chunks(5, 2) == [slice(0, 3), slice(3, 5)]
    assert row_chunks(4, 4) == [slice(i, i + 1) for i in range(4)]
    for n, k in [(7, 3), (192, 2), (1, 1)]:
        ch = row_chunks(n, k)
        assert [c.start for c in ch[1:]] == [c.stop for c in ch[:-1]]
        assert ch[0].start == 0 and ch[-1].stop == n
        sizes = [c.stop - c.start for c in ch]
        assert max(sizes) - min(sizes) <= 1


@pytest.fixture
def unet_inputs(tiny_backend):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([10, 250, 500, 750, 990])
    emb = torch.randn(5, 77, 16, generator=g)
    unet = tiny_backend.denoiser
    with torch.no_grad():  # each row alone: independent of any batching
        rows = torch.cat([unet(z[i:i + 1], t[i:i + 1], encoder_hidden_states=emb[i:i + 1]).sample
                          for i in range(5)])
    return unet, z, t, Conditioning(emb), rows


@pytest.mark.parametrize("parallel", [False, True])
def test_traced_call_equals_eager_rows(unet_inputs, parallel):
    unet, z, t, cond, rows = unet_inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        call = TracedUNet(parallel=parallel)
        with torch.no_grad():
            out = call(unet, z, t, cond)
        assert call.workers(z) == (2 if parallel else 1)
        assert len(call) == (2 if parallel else 1)  # chunks of 3 and 2 rows: two traces
        assert torch.get_num_threads() == 2  # restored after the split call
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(out, rows, atol=1e-5)  # every row in its place
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_one_thread_or_one_row_is_not_split(unet_inputs):
    unet, z, *_ = unet_inputs
    threads = torch.get_num_threads()
    call = TracedUNet(parallel=True)
    try:
        torch.set_num_threads(1)
        assert call.workers(z) == 1
        torch.set_num_threads(2)
        assert call.workers(z[:1]) == 1
        assert TracedUNet().workers(z) == 2  # "auto": on for CPU tensors
    finally:
        torch.set_num_threads(threads)


def test_grad_mode_or_disabled_runs_eager(unet_inputs):
    unet, z, t, cond, rows = unet_inputs
    off = TracedUNet(enabled=False)
    with torch.no_grad():
        out = off(unet, z, t, cond)
    assert len(off) == 0 and torch.allclose(out, rows, atol=1e-5)
    on = TracedUNet(parallel=False)
    with torch.enable_grad():
        out = on(unet, z[:2], t[:2], cond[:2])
    assert len(on) == 0 and torch.allclose(out, rows[:2], atol=1e-5)
