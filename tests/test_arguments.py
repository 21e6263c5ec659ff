"""Arguments that used to be taken silently or to fail obscurely: each is now refused with one
sentence naming it, or computed right. (Most argument checks live beside each op's tests; these
are the ones issue 11 found missing.)"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import AWLoss, preset_weights
from nats_kernels.schemes.cfg import AnnealedCFG

# ------------------------------------------------------------------------------ bool flags


@pytest.mark.parametrize("flag", ["squared", "batched"])
@pytest.mark.parametrize("value", ["no", 1, 0, None, torch.tensor(True)], ids=repr)
def test_median_flags_must_be_bools(flag, value):
    x = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        nk.median_pairwise_distance(x, **{flag: value})


def test_other_flags_must_be_bools():
    with pytest.raises(TypeError, match="nearest must be a bool"):
        preset_weights(64, nearest="no")
    with pytest.raises(TypeError, match="normalized must be a bool"):
        nk.aw_weights(torch.ones(3), torch.zeros(2), torch.zeros(2), normalized="no")
    cfg = AnnealedCFG(nn.Linear(2, 2), nn.Linear(2, 1), M=1, eta=1.0, weights=None, z_dim=2)
    with pytest.raises(TypeError, match="return_z must be a bool"):
        cfg.generate(3, return_z="no")


# ------------------------------------------------------------------------ memory_budget


@pytest.mark.parametrize("budget", [2**63, 2**70])
def test_memory_budget_beyond_int64_is_named(budget):
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
        nk.median_pairwise_distance(torch.randn(5, 3), memory_budget=budget)


def test_memory_budget_at_int64_max_runs():
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = nk.median_pairwise_distance(x, memory_budget=2**63 - 1)
    torch.testing.assert_close(got, torch.pdist(x).median(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------- annealed_weights


def test_annealed_weights_extreme_ratio_neither_overflows_nor_underflows():
    w = nk.annealed_weights(1e308, 1e-308, 3, dtype=torch.float64)
    assert w[0] == 1e308 and w[2] == 1e-308
    assert math.isclose(w[1].item(), 1.0, rel_tol=1e-12)
    w = nk.annealed_weights(sys.float_info.min / 2**40, 1e300, 5, dtype=torch.float64)
    expect = [math.exp(math.log(sys.float_info.min / 2**40) + k / 4 *
                       (math.log(1e300) - math.log(sys.float_info.min / 2**40)))
              for k in range(5)]
    assert (w > 0).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w[1:4], torch.tensor(expect[1:4], dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("first, last, M", [(1.0, 0.01, 15), (20.0, 1.0, 7), (0.01, 1.0, 4)])
def test_annealed_weights_ends_are_exact(first, last, M):
    w = nk.annealed_weights(first, last, M, dtype=torch.float64)
    assert w[0].item() == first and w[-1].item() == last
    ratio = (w[1:] / w[:-1]).tolist()
    assert max(ratio) - min(ratio) < 1e-12  # a geometric progression


@pytest.mark.parametrize("dtype, first, last", [
    (torch.float16, 1e6, 1.0), (torch.float16, 1.0, 1e-9), (torch.bfloat16, 1e39, 1.0),
    (torch.float32, 1.0, 1e-46), (torch.float32, 1e39, 1.0)], ids=str)
def test_annealed_weights_refuse_a_dtype_that_cannot_hold_them(dtype, first, last):
    with pytest.raises(ValueError, match=f"dtype {dtype} cannot hold the weights"):
        nk.annealed_weights(first, last, 3, dtype=dtype)


def test_annealed_weights_at_the_edge_of_float16_are_finite():
    w = nk.annealed_weights(65504.0, 1.0, 3, dtype=torch.float16)
    assert torch.isfinite(w).all() and w[0] == 65504


# ------------------------------------------------------------------ aw hyperparameters

BAD_HYPER = [("eps", -0.01, "eps must be >= 0"), ("eps", math.nan, "eps must be finite"),
             ("eps", math.inf, "eps must be finite"), ("alpha1", math.nan, "alpha1 must be"),
             ("alpha2", math.nan, "alpha2 must be"), ("delta", math.nan, "delta must be"),
             ("alpha1", -math.inf, "alpha1 must be"), ("delta", math.inf, "delta must be")]


@pytest.mark.parametrize("name, value, match", BAD_HYPER)
def test_aw_weights_hyperparameters(name, value, match):
    with pytest.raises(ValueError, match=match):
        nk.aw_weights(torch.ones(3), torch.zeros(2), torch.zeros(2), **{name: value})


@pytest.mark.parametrize("name, value, match", BAD_HYPER)
def test_awloss_hyperparameters(name, value, match):
    with pytest.raises(ValueError, match=match):
        AWLoss(nn.Linear(2, 1), **{name: value})


def test_aw_eps_zero_is_allowed():
    w_r, w_f, case = nk.aw_weights(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(2), torch.zeros(2),
                                   eps=0.0)
    assert int(case) == 5


# ------------------------------------------------------------------------- AnnealedCFG


def _cfg(G=None, D=None, **kw):
    torch.manual_seed(0)
    G = G if G is not None else nn.Linear(2, 2)
    D = D if D is not None else nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    return AnnealedCFG(G, D, **{"M": 2, "eta": 0.5, "weights": None, "z_dim": 2, "N": 8,
                                "x_epochs": 1, "batch_size": 4, **kw})


def test_train_stage_real_batches_of_the_wrong_feature_size():
    cfg = _cfg()
    before = [p.detach().clone() for p in cfg.discriminator.parameters()]
    with pytest.raises(ValueError, match=r"real_batches yields samples of shape \(5,\) \(5 "
                                         r"values\) but the generator's samples have shape "
                                         r"\(2,\)"):
        cfg.train_stage([torch.randn(4, 5)])
    assert all(torch.equal(p, b) for p, b in zip(cfg.discriminator.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=str)
def test_train_stage_real_batches_of_an_integer_dtype(dtype):
    with pytest.raises(TypeError, match=f"real_batches yields {dtype} tensors"):
        _cfg().train_stage([torch.ones(4, 2, dtype=dtype)])


def test_train_stage_empty_real_batch():
    with pytest.raises(ValueError, match="B >= 1"):
        _cfg().train_stage([torch.ones(0, 2)])


class PointSet(nn.Module):
    """A 'generator' that returns its learnt points as they are (a view of its parameter)."""

    def __init__(self):
        super().__init__()
        self.points = nn.Parameter(torch.randn(64, 2))

    def forward(self, z):
        return self.points[: z.shape[0]]


def test_generator_output_viewing_its_parameter_is_not_written():
    cfg = _cfg(G=PointSet())
    before = cfg.generator.points.detach().clone()
    cfg.train_stage([torch.randn(4, 2)] * 4)  # stage 0: one snapshot; the approximator runs
    after_train = cfg.generator.points.detach().clone()
    x = cfg.generate(4)  # moved through M snapshots
    assert torch.equal(cfg.generator.points.detach(), after_train)
    assert not torch.equal(x, after_train[:4])  # the samples did move
    assert not torch.equal(after_train, before)  # only the approximator's optimizer moves G


class ReturnsZ(nn.Module):
    """A 'generator' that returns its input itself (think of a fixed prior being moved)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, z):
        return z


def test_identity_generator_returns_the_z_it_drew():
    cfg = _cfg(G=ReturnsZ(), D=nn.Linear(2, 1))
    x, z = cfg.generate(3, return_z=True)
    assert not torch.equal(x, z)  # x moved, z is the untouched draw
    assert torch.equal(z, cfg.generator(z))


# ------------------------------------------------------------------ per-step scalars

_x, _g = torch.randn(4, 3), torch.randn(4, 3)
NON_FINITE_SCALARS = [
    ("eta", lambda v: nk.cfg_accumulate(_x, [_g], torch.ones(1), eta=v)),
    ("eta", lambda v: nk.cfg_step_(_x.clone(), _g, 1.0, eta=v)),
    ("weight", lambda v: nk.cfg_step_(_x.clone(), _g, v)),
    ("w_r", lambda v: nk.aw_combine_([_x.clone()], [_g], [_g], v, 1.0)),
    ("w_f", lambda v: nk.aw_combine_([_x.clone()], [_g], [_g], 1.0, v)),
    ("r", lambda v: nk.iga_correction_([_x.clone()], [_g], v)),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("name, call", NON_FINITE_SCALARS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(NON_FINITE_SCALARS)])
def test_python_number_scalars_must_be_finite(name, call, value):
    """A NaN weight given as a Python number would turn every result into NaN; a 0-d tensor is
    not checked (its value stays on the device)."""
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        call(value)
    call(torch.tensor(value))


def test_annealed_weights_bad_device_is_named():
    with pytest.raises(ValueError, match="device: 'foo' is not a torch device"):
        nk.annealed_weights(1.0, 0.01, 3, device="foo")


def test_generator_failure_says_what_it_was_given():
    cfg = _cfg(z_dim=5)  # G is Linear(2, 2): z of 5 features cannot go in
    with pytest.raises(RuntimeError) as info:
        cfg.generate(2)
    assert "AnnealedCFG called the generator with z of shape (2, 5)" in "".join(
        getattr(info.value, "__notes__", []))


# --------------------------------------------------------- found by review, pinned here


def test_overlapping_dense_outputs_are_refused():
    """A transposed (dense, not contiguous) view overlapping a contiguous one: byte ranges are
    exact for dense tensors, so the overlap is seen (as PyTorch's own out= check sees it)."""
    buf = torch.zeros(18)
    a, b = buf[0:12].view(3, 4), buf[6:18].view(4, 3).t()
    ones = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] share memory"):
        nk.aw_combine_([a, b], [ones, ones], [ones, ones], 1.0, 1.0)
    assert torch.equal(buf, torch.zeros(18))


def test_views_of_a_leaf_requiring_grad_in_a_list_are_refused():
    flat = torch.zeros(12, requires_grad=True)
    g = [torch.ones(6), torch.ones(6)]
    with pytest.raises(RuntimeError, match=r"out\[0\] is a view of a leaf tensor"):
        nk.aw_combine_(list(flat.split(6)), g, g, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"g_G\[0\] is a view of a leaf tensor"):
        nk.iga_correction_(list(flat.split(6)), g, 1.0)


@pytest.mark.parametrize("call, name", [
    (lambda: nk.cfg_step_(_x.clone(), _g, 1.0, eta=1e39), "eta"),
    (lambda: nk.cfg_accumulate(_x, [_g], torch.ones(1), eta=1e39), "eta"),
    (lambda: nk.cfg_step_(_x.clone(), _g, 1e39), "weight"),
    (lambda: nk.aw_combine_([_x.clone()], [_g], [_g], 1e39, 1.0), "w_r"),
    (lambda: nk.iga_correction_([_x.clone()], [_g], -1e39), "r"),
    (lambda: nk.aw_weights(torch.ones(3), torch.zeros(2), torch.zeros(2), eps=1e39), "eps"),
])
def test_python_scalars_beyond_the_math_type_are_named(call, name):
    """float32 math cannot hold 1e39: refused with the name, not turned into inf."""
    with pytest.raises(ValueError, match=f"{name} = .* is out of the range of torch.float32"):
        call()


def test_huge_python_int_is_named():
    with pytest.raises(ValueError, match="eta is out of the float range"):
        nk.cfg_step_(_x.clone(), _g, 1.0, eta=10**400)


def test_numpy_bool_is_named_as_such():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"squared must be a bool, got numpy.bool"):
        nk.median_pairwise_distance(torch.randn(4, 2), squared=np.bool_(True))


def test_annealed_weights_refuse_only_what_rounds_to_inf_or_zero():
    assert nk.annealed_weights(65510.0, 1.0, 3, dtype=torch.float16)[0] == 65504
    assert nk.annealed_weights(1.0, 1e-45, 3, dtype=torch.float32)[-1] > 0
    with pytest.raises(ValueError, match="cannot hold"):
        nk.annealed_weights(65520.0, 1.0, 3, dtype=torch.float16)


def test_train_stage_takes_another_layout_of_as_many_values():
    """Images (B, 1, 2, 2) against generator samples (B, 4), a D that flattens: fine."""
    D = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    cfg = _cfg(G=nn.Linear(2, 4), D=D)
    cfg.train_stage([torch.randn(4, 1, 2, 2)] * 4)
    assert cfg.stage == 1


class IntoBuffer(nn.Module):
    """A generator writing into a preallocated output (as with a CUDA-graph static output) and
    keeping points as a plain attribute."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.out = torch.zeros(64, 2)

    def forward(self, z):
        return torch.matmul(z, self.lin.weight.t(), out=self.out[: z.shape[0]])


def test_generator_output_in_its_own_buffer_is_copied():
    cfg = _cfg(G=IntoBuffer())
    x = cfg.generate(8, batch_size=4)
    assert not torch.equal(x[:4], x[4:])  # two batches, not the last one twice
    z = cfg._z(4)
    raw = torch.matmul(z, cfg.generator.lin.weight.t())
    moved = cfg._move(cfg._g_eval(z), cfg.M)
    assert torch.equal(cfg.generator.out[:4], raw) and not torch.equal(moved, raw)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_nested_accumulate_replaces_a_grad_that_requires_grad():
    """After backward(create_graph=True) a .grad is part of a graph: accumulate mode replaces it
    (as AWLoss and BRC do) instead of refusing to write it."""
    from nats_kernels.schemes import NestedTrainer

    G = nn.Linear(2, 2)
    (G(torch.randn(3, 2)) ** 2).sum().backward(create_graph=True)
    assert G.weight.grad.requires_grad
    trainer = NestedTrainer(lambda: None, lambda: G(torch.randn(8, 2)).pow(2).mean(), n_d=2,
                            mode="accumulate", g_optimizer=torch.optim.SGD(G.parameters(), lr=0.01))
    trainer.run_outer()
    assert not G.weight.grad.requires_grad


def test_run_config_cfg_lr_must_be_positive():
    from nats_kernels.train.runner import RunConfig, check_config

    with pytest.raises(ValueError, match="cfg_lr: expected a finite learning rate > 0"):
        check_config(RunConfig(scheme="annealed-cfg", cfg_lr=0.0))
