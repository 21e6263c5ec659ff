"""iga_ratio, iga_correction_ (design §5, BRC / IGA) against float64 oracles written here, and the
sanity properties of design §5 on tiny GANs.

Every oracle upcasts the same, already rounded inputs to float64; nothing here calls the library's
reference functions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import AWKWARD, DTYPES, TOL, assert_close, cases, make, raises_before_dispatch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from listops import LAYOUTS, acc, assert_unchanged, snapshot, tensor_list

import nats_kernels as nk

# The autouse fixtures (backend, threads) are function scoped; they set the same environment
# variable and thread count for every example of a test, so sharing them is what we want.
pytestmark = pytest.mark.single_thread

PROPERTY = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# Lists of shapes: awkward sizes, 0-d and zero-size tensors mixed in, one huge-ish tensor among
# many tiny ones, single-element lists.
SHAPE_LISTS = {
    "awkward": [(n,) for n in AWKWARD] + [(7, 59), (97, 1, 7), (3, 1025)],
    "0d-and-empty": [(), (0,), (59,), (3, 0, 7), (), (1,), (7, 97), (0, 5)],
    # 42025 elements: more than one CPU grain (32768) and dozens of GPU blocks.
    "huge-among-tiny": [(), (1,), (7,), (0,), (59,)] * 6 + [(1025, 41)] + [(1, 1), (), (7,)] * 6,
    "single": [(97, 59)],
    "single-0d": [()],
}
def oracle_ratio(gf, gF, eps) -> torch.Tensor:
    """<gf, gF> / (<gf, gf> + eps) in float64."""
    num = den = torch.zeros((), dtype=torch.float64)
    for x, y in zip(gf, gF):
        x = x.double().flatten()
        num = num + (x * y.double().flatten()).sum()
        den = den + (x * x).sum()
    return num / (den + eps)


def value(r) -> float:
    return float(r.double()) if isinstance(r, torch.Tensor) else float(r)


def oracle_correction(g, gf, r):
    return [x.double() - value(r) * y.double() for x, y in zip(g, gf)]


# ------------------------------------------------------------------------------------ iga_ratio


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iga_ratio_matches_oracle(device, backend, dtype, shapes, layout):
    gf = tensor_list(shapes, dtype, device, seed=1, layout=layout, which=0)
    # gF partly along gf, so that r is O(1) and not a cancellation-dominated small number.
    gF = tensor_list(shapes, dtype, device, seed=2, layout=layout, which=1)
    for x, y in zip(gf, gF):
        y.copy_(0.7 * x.double() + 0.5 * y.double())  # keeps gF's layout
    before_f, before_F = snapshot(gf), snapshot(gF)
    r = nk.iga_ratio(gf, gF)
    assert r.shape == () and r.device.type == device
    assert_close(r, oracle_ratio(gf, gF, 1e-12), acc(dtype), "iga_ratio")
    assert_unchanged(gf, before_f, "gf_D")
    assert_unchanged(gF, before_F, "gF_D")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_ratio_threaded(device, backend, dtype, threads):
    threads()
    shapes = SHAPE_LISTS["huge-among-tiny"]
    gf = tensor_list(shapes, dtype, device, seed=7, layout="mixed", which=0)
    gF = tensor_list(shapes, dtype, device, seed=8, layout="mixed", which=2)
    for x, y in zip(gf, gF):
        y.copy_(-1.3 * x.double() + 0.5 * y.double())
    assert_close(nk.iga_ratio(gf, gF), oracle_ratio(gf, gF, 1e-12), acc(dtype), "threaded")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3, 2.5, 3])
def test_iga_ratio_eps(device, backend, dtype, eps):
    gf = tensor_list([(7, 5), (), (59,)], dtype, device, seed=3, layout="mixed", scale=0.05)
    gF = tensor_list([(7, 5), (), (59,)], dtype, device, seed=4, layout="mixed", which=1)
    r = nk.iga_ratio(gf, gF, eps=eps)
    assert r.dtype == acc(dtype)
    assert_close(r, oracle_ratio(gf, gF, eps), acc(dtype), f"iga_ratio eps={eps}")
    if eps == 1e-12:
        assert_close(nk.iga_ratio(gf, gF), r, acc(dtype), "default eps")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_ratio_zero_gradient(device, backend, dtype):
    """df/dD = 0: r = 0 / (0 + eps) = 0; with eps = 0 it is 0/0 = NaN, as the expression is."""
    gf = [torch.zeros(3, 4, dtype=dtype, device=device), torch.zeros((), dtype=dtype,
                                                                    device=device)]
    gF = tensor_list([(3, 4), ()], dtype, device, seed=5, layout="contiguous")
    assert nk.iga_ratio(gf, gF) == 0
    assert nk.iga_ratio(gf, gF, eps=0.0).isnan()
    empty = [torch.empty(0, dtype=dtype, device=device)]
    assert nk.iga_ratio(empty, [e.clone() for e in empty]) == 0


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
def test_iga_ratio_nan_inf_propagate(device, backend):
    gf = [torch.ones(4, device=device), torch.ones(2, device=device)]
    gF = [torch.ones(4, device=device), torch.ones(2, device=device)]
    gF[1][0] = math.nan
    assert nk.iga_ratio(gf, gF).isnan()
    gF[1][0] = math.inf
    assert nk.iga_ratio(gf, gF) == math.inf
    gf[0][0] = math.inf  # inf / inf
    assert nk.iga_ratio(gf, gF).isnan()


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_iga_ratio_half_inputs_do_not_overflow(device, backend, dtype):
    gf = tensor_list([(1025,), (97, 7)], dtype, device, seed=6, layout="strided", scale=300.0)
    gF = [(-2 * t.double()).to(dtype) for t in gf]
    r = nk.iga_ratio(gf, gF)
    assert r.dtype == torch.float32 and torch.isfinite(r)
    assert_close(r, oracle_ratio(gf, gF, 1e-12), torch.float32, "half large")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@PROPERTY
@given(
    shapes=st.lists(st.sampled_from([(), (0,), (1,), (7,), (59,), (3, 5), (97, 2)]),
                    min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    k=st.integers(-3, 3),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_iga_ratio_scales_with_gF(device, backend, shapes, dtype, k, sign, seed):
    """r(gf, c gF) = c r(gf, gF). With c a signed power of two the scaled inputs are exact;
    the rare draws where float16 scaling would round into subnormals are rejected, since they
    change the input rather than the op."""
    gf = tensor_list(shapes, dtype, device, seed=seed, layout="mixed")
    gF = tensor_list(shapes, dtype, device, seed=seed + 1, layout="mixed", which=1)
    c = sign * 2.0**k
    scaled = [t * c for t in gF]
    assume(all(torch.equal(s.double(), t.double() * c) for s, t in zip(scaled, gF)))
    r = nk.iga_ratio(gf, gF)
    assert_close(nk.iga_ratio(gf, scaled), r.double() * c, acc(dtype), "scaling")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@PROPERTY
@given(
    shapes=st.lists(st.sampled_from([(), (1,), (7,), (59,), (3, 5)]), min_size=1, max_size=5),
    c=st.floats(-1e3, 1e3).filter(lambda c: abs(c) > 1e-3),
    seed=st.integers(0, 2**16),
)
def test_iga_ratio_scales_with_any_c_float64(device, backend, shapes, c, seed):
    """Any factor in float64: the result moves by c, up to the rounding of c * gF and of the
    sums, bounded by rtol * |c| * sum|gf gF| / <gf, gf>."""
    gf = tensor_list(shapes, torch.float64, device, seed=seed, layout="mixed")
    gF = tensor_list(shapes, torch.float64, device, seed=seed + 1, layout="mixed", which=1)
    r_c = nk.iga_ratio(gf, [t * c for t in gF], eps=0.0)
    r = nk.iga_ratio(gf, gF, eps=0.0)
    den = sum(float((x * x).sum()) for x in gf)
    mag = sum(float((x * y).abs().sum()) for x, y in zip(gf, gF))
    bound = 4 * TOL[torch.float64]["rtol"] * abs(c) * mag / den + TOL[torch.float64]["atol"]
    assert abs(float(r_c) - c * float(r)) <= bound


# ------------------------------------------------------------------------------ iga_correction_

R_KINDS = {
    "python-float": lambda r, device, dtype: r,
    "python-int": lambda r, device, dtype: int(round(r)) or 2,
    "0d-acc": lambda r, device, dtype: torch.tensor(r, dtype=acc(dtype), device=device),
    "0d-float64": lambda r, device, dtype: torch.tensor(r, dtype=torch.float64, device=device),
    "0d-bfloat16": lambda r, device, dtype: torch.tensor(r, dtype=torch.bfloat16, device=device),
}


def strided_g(shapes, dtype, device, seed):
    """``g`` as every other element of wider buffers, so that writes outside the views would
    show in the buffers. Returns (g, buffers)."""
    bufs = [make(tuple(s[:-1]) + (2 * s[-1],) if s else (2,), dtype, device, seed=seed + p)
            for p, s in enumerate(shapes)]
    return [b[..., ::2] if s else b[0] for b, s in zip(bufs, shapes)], bufs


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iga_correction_matches_oracle(device, backend, dtype, shapes, layout):
    gf = tensor_list(shapes, dtype, device, seed=11, layout=layout, which=1)
    if layout == "contiguous":
        g, bufs = tensor_list(shapes, dtype, device, seed=12, layout=layout), None
    else:
        g, bufs = strided_g(shapes, dtype, device, seed=12)
    before_gf = snapshot(gf)
    before_bufs = snapshot(bufs) if bufs else None
    ptrs = [t.data_ptr() for t in g]
    r = torch.tensor(-0.6180339, dtype=acc(dtype), device=device)
    expected = oracle_correction(g, gf, r)
    assert nk.iga_correction_(g, gf, r) is None
    for p, (t, e) in enumerate(zip(g, expected)):
        assert t.data_ptr() == ptrs[p] and t.dtype == dtype
        assert_close(t, e, dtype, f"iga_correction_ g_G[{p}]")
    assert_unchanged(gf, before_gf, "gf_G")
    assert r == torch.tensor(-0.6180339, dtype=acc(dtype))
    if bufs:
        for p, (b, b0) in enumerate(zip(bufs, before_bufs)):
            rest = (b[..., 1::2], b0[..., 1::2]) if shapes[p] else (b[1], b0[1])
            assert torch.equal(*rest), f"wrote outside g_G[{p}]"


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_kind", R_KINDS.values(), ids=R_KINDS.keys())
@pytest.mark.parametrize("r", [1.75, -3.0, 0.0])
def test_iga_correction_r_kinds(device, backend, dtype, r_kind, r):
    shapes = SHAPE_LISTS["0d-and-empty"]
    g = tensor_list(shapes, dtype, device, seed=21, layout="mixed")
    gf = tensor_list(shapes, dtype, device, seed=22, layout="mixed", which=2)
    r = r_kind(r, device, dtype)
    expected = oracle_correction(g, gf, r)
    iga_out = nk.iga_correction_(tuple(g), gf, r)
    assert iga_out is None
    for p, (t, e) in enumerate(zip(g, expected)):
        assert_close(t, e, dtype, f"g_G[{p}] r={r!r}")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_correction_threaded(device, backend, dtype, threads):
    threads()
    shapes = SHAPE_LISTS["huge-among-tiny"]
    g = tensor_list(shapes, dtype, device, seed=25, layout="mixed", which=1)
    gf = tensor_list(shapes, dtype, device, seed=26, layout="mixed", which=2)
    r = torch.tensor(0.8, dtype=torch.float64, device=device)
    expected = oracle_correction(g, gf, r)
    nk.iga_correction_(g, gf, r)
    for p, (t, e) in enumerate(zip(g, expected)):
        assert_close(t, e, dtype, f"threaded g_G[{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_correction_single_tensor(device, backend, dtype):
    for shape in [(), (1,), (1025,), (0,)]:
        g = [make(shape, dtype, device, seed=23)]
        gf = [make(shape, dtype, device, seed=24)]
        expected = oracle_correction(g, gf, 0.5)
        nk.iga_correction_(g, gf, 0.5)
        assert_close(g[0], expected[0], dtype, f"single {shape}")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
def test_iga_correction_nan_inf_propagate(device, backend):
    g = [torch.tensor([1.0, math.nan, 2.0, math.inf, 1.0], device=device)]
    gf = [torch.tensor([math.inf, 1.0, 1.0, 1.0, 1.0], device=device)]
    expected = oracle_correction(g, gf, 0.0)  # 0 * inf = nan, as in PyTorch
    nk.iga_correction_(g, gf, 0.0)
    assert_close(g[0], expected[0], torch.float32, "nan/inf")
    assert g[0][0].isnan() and g[0][1].isnan() and g[0][3] == math.inf
    g = [torch.ones(2, device=device)]
    nk.iga_correction_(g, [torch.ones(2, device=device)], torch.tensor(math.nan))
    assert g[0].isnan().all()


# --------------------------------------------------------------------- BRC on tiny GANs (design §5)


def mlp(sizes, dtype, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(torch.nn.LeakyReLU(0.2))
        return torch.nn.Sequential(*layers).to(dtype)


def tiny_gan(dtype, device, seed=0):
    G = mlp([3, 8, 2], dtype, seed).to(device)
    D = mlp([2, 16, 8, 1], dtype, seed + 1).to(device)
    gen = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(32, 3, generator=gen, dtype=dtype).to(device)
    real = (torch.randn(32, 2, generator=gen, dtype=dtype) * 0.3 + 1.0).to(device)
    return G, D, z, real


def losses(kind, G, D, z, real):
    """(f, F): the discriminator loss (minimized by D) and the generator loss, on the same,
    non-detached fake batch. For these kinds F = -(fake term of f)."""
    fake = G(z)
    d_fake = D(fake)
    if kind == "wgan":
        fake_term = d_fake.mean()
        real_term = -D(real).mean()
    elif kind == "saturating":  # BCE discriminator loss; the saturating generator loss
        fake_term = -F.logsigmoid(-d_fake).mean()  # -log(1 - sigmoid(D(G(z))))
        real_term = -F.logsigmoid(D(real)).mean()
    elif kind == "hinge":
        fake_term = F.relu(1 + d_fake).mean()
        real_term = F.relu(1 - D(real)).mean()
    else:
        raise AssertionError(kind)
    return real_term + fake_term, -fake_term


def grads(loss, params):
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def flat64(gs):
    return torch.cat([g.double().flatten() for g in gs])


ZERO_SUM_KINDS = ["wgan", "saturating", "hinge"]


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS)
def test_brc_zero_sum_update_is_one_plus_r_times_dF(device, backend, dtype, kind):
    """f depends on theta_G only through its fake term and F = -(fake term of f), so
    df/dG = -dF/dG and the corrected gradient dF/dG - r df/dG is (1 + r) dF/dG."""
    G, D, z, real = tiny_gan(dtype, device)
    f, F_ = losses(kind, G, D, z, real)
    pG, pD = list(G.parameters()), list(D.parameters())
    gf_D, gF_D, gf_G, gF_G = grads(f, pD), grads(F_, pD), grads(f, pG), grads(F_, pG)
    for a, b in zip(gf_G, gF_G):
        assert_close(a, -b.double(), dtype, "df/dG = -dF/dG")

    r = nk.iga_ratio(gf_D, gF_D)
    assert r.dtype == dtype and r.shape == ()
    a, b = flat64(gf_D), flat64(gF_D)
    r64 = torch.dot(a, b) / (torch.dot(a, a) + 1e-12)
    assert_close(r, r64, dtype, "r vs separate autograd.grad calls")
    assert float(r64) != -1.0  # the real term makes this a non-degenerate check

    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, (c, g) in enumerate(zip(corrected, gF_G)):
        assert_close(c, (1 + r.double()) * g.double(), dtype, f"(1 + r) dF/dG [{p}]")

    # design §5.3's cost-efficient evaluation: one backward of F - r.detach() f into theta_G.
    one_pass = torch.autograd.grad(F_ - r.detach() * f, pG, retain_graph=True)
    for p, (c, g) in enumerate(zip(corrected, one_pass)):
        assert_close(c, g.double(), dtype, f"one backward of F - r f [{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS)
def test_brc_pure_zero_sum_cancels(device, backend, dtype, kind):
    """No real term and F = -f: r = -1 and the corrected generator gradient is zero."""
    G, D, z, real = tiny_gan(dtype, device, seed=5)
    _, F_ = losses(kind, G, D, z, real)
    f = -F_
    pG, pD = list(G.parameters()), list(D.parameters())
    gf_D, gF_D, gf_G, gF_G = grads(f, pD), grads(F_, pD), grads(f, pG), grads(F_, pG)
    norm2 = float(torch.dot(flat64(gf_D), flat64(gf_D)))
    assert norm2 > 1e-2 and any(g.abs().max() > 1e-3 for g in gF_G)

    # eps = 0: r is exactly the ratio of a squared norm and its negative.
    r = nk.iga_ratio(gf_D, gF_D, eps=0.0)
    assert_close(r, torch.tensor(-1.0, dtype=torch.float64), dtype, "r, eps=0")
    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, c in enumerate(corrected):
        assert_close(c, torch.zeros_like(c, dtype=torch.float64), dtype, f"zero update [{p}]")

    # The default eps (1e-12) moves r off -1 by eps / <gf, gf> only.
    r = nk.iga_ratio(gf_D, gF_D)
    assert_close(r, torch.tensor(-1.0, dtype=torch.float64), dtype, "r, default eps")
    assert_close(r, torch.tensor(-norm2 / (norm2 + 1e-12), dtype=torch.float64), dtype, "r formula")
    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, (c, g) in enumerate(zip(corrected, gF_G)):
        assert_close(c, torch.zeros_like(c, dtype=torch.float64), dtype, f"~zero update [{p}]")
        assert_close(c, (1 + r.double()) * g.double(), dtype, f"(1 + r) dF/dG [{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS + ["non-saturating"])
def test_brc_sign_convention_of_f(device, backend, dtype, kind):
    """design §5: "r is invariant to the sign convention of f (maximize f or minimize -f give the
    same update)". Precisely: flipping f's sign flips df/dD and df/dG, hence r's sign, and the
    update dF/dG - r df/dG stays the same."""
    G, D, z, real = tiny_gan(dtype, device, seed=9)
    if kind == "non-saturating":  # not zero-sum: F = -log sigmoid(D(G(z)))
        f, _ = losses("saturating", G, D, z, real)
        F_ = -F.logsigmoid(D(G(z))).mean()
    else:
        f, F_ = losses(kind, G, D, z, real)
    pG, pD = list(G.parameters()), list(D.parameters())
    gF_D, gF_G = grads(F_, pD), grads(F_, pG)

    updates, ratios = [], []
    for sign in (1.0, -1.0):
        g_f = sign * f  # minimize f, or maximize -f: the same discriminator
        gf_D, gf_G = grads(g_f, pD), grads(g_f, pG)
        r = nk.iga_ratio(gf_D, gF_D)
        a, b = flat64(gf_D), flat64(gF_D)
        assert_close(r, torch.dot(a, b) / (torch.dot(a, a) + 1e-12), dtype, f"r, sign {sign}")
        corrected = [g.clone() for g in gF_G]
        nk.iga_correction_(corrected, gf_G, r)
        expected = [x.double() - r.double() * y.double() for x, y in zip(gF_G, gf_G)]
        for p, (c, e) in enumerate(zip(corrected, expected)):
            assert_close(c, e, dtype, f"update, sign {sign} [{p}]")
        updates.append(corrected)
        ratios.append(r)
    assert_close(ratios[1], -ratios[0].double(), dtype, "r flips with f's sign")
    assert abs(float(ratios[0])) > 1e-3
    for p, (u, v) in enumerate(zip(*updates)):
        assert_close(u, v.double(), dtype, f"same update for f and -f [{p}]")


# ----------------------------------------------------------------------- torch.compile, no sync


# torch.compile itself warns that torch.jit.script_method is deprecated (torch internals).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
def test_iga_step_compiles_fullgraph(device, backend):
    """iga_ratio + iga_correction_ trace into one graph: r stays on device."""

    def step(gf_D, gF_D, g_G, gf_G):
        r = nk.iga_ratio(gf_D, gF_D)
        nk.iga_correction_(g_G, gf_G, r)
        return r

    shapes_D, shapes_G = [(7, 5), (), (59,)], [(3, 4), (0,), (97,)]
    gf_D = tensor_list(shapes_D, torch.float32, device, seed=41, layout="mixed")
    gF_D = tensor_list(shapes_D, torch.float32, device, seed=42, layout="mixed", which=1)
    gf_G = tensor_list(shapes_G, torch.float32, device, seed=43, layout="mixed")
    g_eager = tensor_list(shapes_G, torch.float32, device, seed=44, layout="contiguous")
    g_compiled = snapshot(g_eager)
    r_eager = step(gf_D, gF_D, g_eager, gf_G)
    torch._dynamo.reset()
    r_compiled = torch.compile(step, fullgraph=True)(gf_D, gF_D, g_compiled, gf_G)
    assert r_compiled.dtype == r_eager.dtype and r_compiled.shape == ()
    torch.testing.assert_close(r_compiled, r_eager)
    for p, (c, e) in enumerate(zip(g_compiled, g_eager)):
        torch.testing.assert_close(c, e, msg=lambda m, p=p: f"g_G[{p}]: {m}")


# ----------------------------------------------------------------------------------- bad inputs


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


IGA_RATIO_ERRORS = {
    "gf_D-tensor": (lambda: nk.iga_ratio(_t(3), [_t(3)]), TypeError,
                    r"^gf_D must be a list or tuple of tensors, got Tensor"),
    "gF_D-tensor": (lambda: nk.iga_ratio([_t(3)], _t(3)), TypeError,
                    r"^gF_D must be a list or tuple"),
    "gf_D-empty": (lambda: nk.iga_ratio([], []), ValueError, r"^gf_D must hold at least 1"),
    "gF_D-empty": (lambda: nk.iga_ratio([_t(3)], []), ValueError, r"^gF_D must hold at least 1"),
    "lengths": (lambda: nk.iga_ratio([_t(3), _t(1)], [_t(3)]), ValueError,
                r"^gF_D has 1 tensors but gf_D has 2"),
    "shape-gF_D[1]": (lambda: nk.iga_ratio([_t(3), _t(2, 2)], [_t(3), _t(4)]), ValueError,
                      r"^gF_D\[1\] has shape \(4,\) but gf_D\[1\] has \(2, 2\)"),
    "int-gf_D[0]": (lambda: nk.iga_ratio([_t(3, dtype=torch.int64)], [_t(3)]), TypeError,
                    r"^gf_D\[0\] must have a floating dtype.*got torch.int64"),
    "mixed-gF_D[0]": (lambda: nk.iga_ratio([_t(3)], [_t(3, dtype=torch.float64)]), TypeError,
                      r"^gF_D\[0\] has dtype torch.float64, expected torch.float32"),
    "not-a-tensor": (lambda: nk.iga_ratio([_t(3)], [[0.0, 0.0, 0.0]]), TypeError,
                     r"^gF_D\[0\] must be a torch.Tensor, got list"),
    "eps-negative": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=-1e-12), ValueError,
                     r"^eps must be finite and >= 0, got -1e-12"),
    "eps-inf": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=math.inf), ValueError,
                r"^eps must be finite and >= 0, got inf"),
    "eps-nan": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=math.nan), ValueError,
                r"^eps must be finite and >= 0, got nan"),
    "eps-tensor": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=torch.tensor(1e-12)), TypeError,
                   r"^eps must be a Python number, got Tensor"),
    "eps-str": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps="0"), TypeError,
                r"^eps must be a Python number, got str"),
    "eps-None": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=None), TypeError,
                 r"^eps must be a Python number, got NoneType"),
}

IGA_CORRECTION_ERRORS = {
    "g_G-tensor": (lambda: nk.iga_correction_(_t(3), [_t(3)], 1.0), TypeError,
                   r"^g_G must be a list or tuple of tensors, got Tensor"),
    "gf_G-tensor": (lambda: nk.iga_correction_([_t(3)], _t(3), 1.0), TypeError,
                    r"^gf_G must be a list or tuple"),
    "g_G-empty": (lambda: nk.iga_correction_([], [], 1.0), ValueError,
                  r"^g_G must hold at least 1"),
    "gf_G-empty": (lambda: nk.iga_correction_([_t(3)], [], 1.0), ValueError,
                   r"^gf_G must hold at least 1"),
    "lengths": (lambda: nk.iga_correction_([_t(3)], [_t(3), _t(3)], 1.0), ValueError,
                r"^gf_G has 2 tensors but g_G has 1"),
    "shape-gf_G[1]": (lambda: nk.iga_correction_([_t(3), _t(5)], [_t(3), _t(5, 1)], 1.0),
                      ValueError, r"^gf_G\[1\] has shape \(5, 1\) but g_G\[1\] has \(5,\)"),
    "int-g_G[0]": (lambda: nk.iga_correction_([_t(3, dtype=torch.int32)], [_t(3)], 1.0),
                   TypeError, r"^g_G\[0\] must have a floating dtype"),
    "mixed-gf_G[0]": (lambda: nk.iga_correction_([_t(3)], [_t(3, dtype=torch.float16)], 1.0),
                      TypeError, r"^gf_G\[0\] has dtype torch.float16, expected torch.float32"),
    "r-(1,)": (lambda: nk.iga_correction_([_t(3)], [_t(3)], _t(1)), ValueError,
               r"^r must be a number or a 0-d tensor, got shape \(1,\)"),
    "r-(3,)": (lambda: nk.iga_correction_([_t(3)], [_t(3)], _t(3)), ValueError,
               r"^r must be a number or a 0-d tensor, got shape \(3,\)"),
    "r-int-tensor": (lambda: nk.iga_correction_([_t(3)], [_t(3)], torch.tensor(2)), TypeError,
                     r"^r must have a floating dtype"),
    "r-None": (lambda: nk.iga_correction_([_t(3)], [_t(3)], None), TypeError,
               r"^r must be a Python number, got NoneType"),
    "r-bool": (lambda: nk.iga_correction_([_t(3)], [_t(3)], False), TypeError,
               r"^r must be a Python number, got bool"),
    "g_G[0]-expanded": (lambda: nk.iga_correction_([_t(1, 4).expand(3, 4)], [_t(3, 4)], 1.0),
                        ValueError, r"^g_G\[0\] is written in place but has overlapping memory"),
    "g_G[2]-expanded": (lambda: nk.iga_correction_([_t(2), _t(2), torch.zeros(()).expand(7)],
                                                   [_t(2), _t(2), _t(7)], 1.0),
                        ValueError, r"^g_G\[2\] is written in place but has overlapping memory"),
}


# These rejections are made by the public functions' input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.


@pytest.mark.parametrize("call,err,match", IGA_RATIO_ERRORS.values(), ids=IGA_RATIO_ERRORS.keys())
def test_iga_ratio_bad_inputs(call, err, match):
    with raises_before_dispatch(err, match=match):
        call()


@pytest.mark.parametrize("call,err,match", IGA_CORRECTION_ERRORS.values(),
                         ids=IGA_CORRECTION_ERRORS.keys())
def test_iga_correction_bad_inputs(call, err, match):
    with raises_before_dispatch(err, match=match):
        call()


def test_iga_correction_error_writes_nothing():
    """Validation finishes before the first write: an error at the last position leaves every
    ``g_G`` tensor as it was (no kernel runs: raises_before_dispatch)."""
    g = [torch.full((3,), 5.0), torch.full((2,), 5.0), torch.full((2,), 5.0)]
    with raises_before_dispatch(ValueError, match=r"gf_G\[2\]"):
        nk.iga_correction_(g, [torch.ones(3), torch.ones(2), torch.ones(3)], 1.0)
    with raises_before_dispatch(ValueError, match=r"g_G\[2\]"):
        nk.iga_correction_(g[:2] + [torch.ones(()).expand(2)], [torch.ones(3), torch.ones(2),
                                                               torch.ones(2)], 1.0)
    assert all((t == 5).all() for t in g)
