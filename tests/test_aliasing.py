"""Operands that share memory with what an op writes, on every backend that implements the op
(``helpers.cases``: reference and cpu on CPU tensors, triton and cuda on CUDA tensors, triton on
CPU tensors under TRITON_INTERPRET=1). design §9.4: "inputs may alias outputs in any way ...
every backend reads inputs as they were before the call".

- a written tensor that is also its own input (``aw_combine_(g_r, g_r, ...)``, ``out=x0``);
- written tensors that share a buffer but no element (disjoint or interleaved views);
- inputs overlapping an output: the very same view at another position, a view shifted by one
  element, gradients that are overlapping views of one buffer.

Each kernel backend has its own path for these calls (csrc/include/nk/overlap.h's overlap
tests, shared by the CPU kernels and the CUDA binding; triton's ``_common.safe_inputs``), so
each test runs on all of them. The overlapping tensors span more than one chunk of every
backend (CPU and CUDA kChunk 32768 elements, triton CHUNK 8192), so an overlap crosses the
kernels' unit of parallel work.
The oracle is the reference on float64 copies of the inputs taken before the call, or the
float64 expression, judged with the one tolerance table of tests/helpers.py. Written tensors
that share an element are refused before any backend runs (tests/test_inplace_autograd.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_close, cases, cfg_oracle, make, same_bits
from listops import doubles, tensor_list

import nats_kernels as nk

# Longer than one chunk of every backend, and not a multiple of any block: 32768 + 5 elements.
N = 32768 + 5


def _t(seed, n=7, device="cpu"):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------- a written tensor as input


@pytest.mark.parametrize("device,backend", cases("aw_combine_", "iga_correction_", "cfg_step_"))
def test_written_tensor_may_be_its_own_input(device, backend):
    """out[p] is g_r[p] (AWLoss writes into the gradients it got), g_G[p] is gf_G[p], grad is x,
    out is x0: elementwise, each element is read before it is written."""
    r, f = _t(0, device=device), _t(1, device=device)
    expect = 0.5 * r + 2.0 * f
    nk.aw_combine_([r], [r], [f], 0.5, 2.0)
    torch.testing.assert_close(r, expect)
    g = _t(2, device=device)
    nk.iga_correction_([g], [g], 0.25)
    torch.testing.assert_close(g, 0.75 * _t(2, device=device))
    x = _t(3, device=device)
    nk.cfg_step_(x, x, 1.0, eta=1.0)
    torch.testing.assert_close(x, 2 * _t(3, device=device))
    nk.cfg_accumulate(x, [_t(4, device=device)], torch.ones(1, device=device), out=x)
    torch.testing.assert_close(x, 2 * _t(3, device=device) + _t(4, device=device))


# ------------------------------------------- written tensors sharing a buffer but no element


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
def test_disjoint_views_of_one_buffer_are_fine(device, backend):
    """Gradients kept as views of one flat buffer (as DDP's gradient_as_bucket_view): disjoint,
    so accepted."""
    buf, other = torch.zeros(10, device=device), torch.ones(10, device=device)
    nk.aw_combine_([buf[:4], buf[4:]], [other[:4], other[4:]], [other[:4], other[4:]], 1.0, 2.0)
    assert torch.equal(buf, torch.full((10,), 3.0, device=device))


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
def test_interleaved_strided_outputs_are_fine(device, backend):
    """buf[0::2] and buf[1::2] span the same bytes but share no element: accepted (undecided
    overlap is let through, as PyTorch does), and each gets its own result."""
    buf = torch.zeros(8, device=device)
    a, b = torch.arange(4.0, device=device), torch.ones(4, device=device)
    nk.aw_combine_([buf[0::2], buf[1::2]], [a, b], [a, b], 1.0, 1.0)
    assert torch.equal(buf[0::2], 2 * a) and torch.equal(buf[1::2], 2 * b)


# -------------------------------------------------------------- inputs overlapping an output


@pytest.mark.parametrize("device,backend", cases("cfg_accumulate_list"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["out-is-x0", "out-is-a-grad", "out-overlaps-x0",
                                   "out-overlaps-a-grad"])
def test_cfg_out_may_be_or_overlap_an_input(device, backend, dtype, where):
    """out may be x0 (or a gradient) itself; an out that partly overlaps an input still gets
    the value computed from the inputs as they were before the call."""
    shape = (4, 3001)  # samples of 3001 elements: the per-sample scale changes mid-block
    n = math.prod(shape)
    buf = make((2 * n + 5,), dtype, device, seed=11)
    x0 = buf[:n].view(shape)
    grads = [make(shape, dtype, device, seed=12), buf[n + 5:].view(shape),
             make(shape, dtype, device, seed=13)]
    weights = torch.tensor([0.5, -1.25, 2.0], device=device)
    scale = make((3, 4), torch.float32, device, seed=14)
    expected = cfg_oracle(x0, grads, weights, 0.8, scale)
    out = {
        "out-is-x0": x0,
        "out-is-a-grad": grads[1],
        "out-overlaps-x0": buf[3:n + 3].view(shape),
        "out-overlaps-a-grad": buf[n + 2:2 * n + 2].view(shape),
    }[where]
    result = nk.cfg_accumulate(x0, grads, weights, eta=0.8, scale=scale, out=out)
    assert result is out
    assert_close(out, expected, dtype, where)


@pytest.mark.parametrize("device,backend", cases("cfg_accumulate_list"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_grads_may_be_overlapping_views_of_one_buffer(device, backend, dtype):
    """The gradients of the list form are views of one flat buffer, two of them the same view
    and one shifted by an element from another: read where they lie, and the buffer is left
    bit for bit as it was."""
    shape = (5, 97)
    n = math.prod(shape)
    flat = make((4 * n + 3,), dtype, device, seed=8)
    grads = [flat[3 + m * n: 3 + (m + 1) * n].view(shape) for m in range(4)]
    grads += [grads[1], flat[4: 4 + n].view(shape)]
    before = flat.clone()
    x0 = make(shape, dtype, device, seed=9)
    weights = make((6,), torch.float64, device, seed=10)
    out = nk.cfg_accumulate(x0, grads, weights, eta=-0.75)
    assert_close(out, cfg_oracle(x0, grads, weights, -0.75, None), dtype, "views of one buffer")
    assert same_bits(flat, before), "the gradient buffer was modified"


@pytest.mark.parametrize("device,backend", cases("aw_combine_", "iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("extra", [0, 40], ids=["3-tensors", "43-tensors"])
def test_list_ops_out_may_alias_inputs_at_other_positions(device, backend, dtype, extra):
    """out[p] aliasing an input at another position, or overlapping one shifted by an element:
    the result is computed from the inputs as they were before the call. With ``extra`` more
    positions (small tensors in one shared buffer, each its own input): the C++ overlap test
    checks short lists pair by pair and long ones through sorted spans, both covered here."""
    shapes = [(N,), (N,), (7, 9)] + [(3,)] * extra
    flat = make((2 * N + 1,), dtype, device, seed=20)
    side = make((3 * extra,), dtype, device, seed=26)
    tail_r = [side[3 * k:3 * k + 3] for k in range(extra)]
    g_r = [flat[:N], flat[N + 1:], make((7, 9), dtype, device, seed=21)] + tail_r
    g_f = tensor_list(shapes, dtype, device, seed=22, layout="mixed")
    # out[0] is g_r[1]; out[1] is g_r[0] shifted by one element. (Outputs that overlap each
    # other would be a write-write conflict: refused before dispatch.) The extra outputs are
    # their own inputs, disjoint views of one buffer.
    out = [g_r[1], flat[1:N + 1], make((7, 9), dtype, device, seed=23)] + tail_r
    expected = [0.3 * r - 1.7 * f for r, f in zip(doubles(g_r), doubles(g_f))]
    nk.aw_combine_(out, g_r, g_f, 0.3, -1.7)
    for p in range(len(shapes)):
        assert_close(out[p], expected[p], dtype, f"aw_combine_ out[{p}]")

    g = tensor_list(shapes, dtype, device, seed=24, layout="contiguous")
    # gf[0] is g[1], gf[1] is g[0]; the extra gf[p] are g[p] itself.
    gf = [g[1], g[0], make((7, 9), dtype, device, seed=25)] + g[3:]
    expected = [x - 0.6 * y for x, y in zip(doubles(g), doubles(gf))]
    nk.iga_correction_(g, gf, 0.6)
    for p in range(len(shapes)):
        assert_close(g[p], expected[p], dtype, f"iga_correction_ g[{p}]")
