"""AnnealedCFG(cuda_graph=True) (design §1.4) without a GPU.

The option itself runs on CUDA only (tests/test_gpu.py checks it there: graph against eager
generate over two stages, a partial last batch, no host sync in the replay). Here:

- the flag's validation (a bool; True on a CPU model is a ValueError);
- the graph path of ``generate`` end to end with a stand-in for the capture that runs the
  captured body eagerly on the same static buffer at every "replay": everything the replay
  depends on must flow through the static buffer, the copy back and the snapshot buffers put
  back after the warm-up, so two stages of training and a generate match the eager object
  bit for bit (a discriminator with BatchNorm in train mode: the warm-up runs would otherwise
  leave extra updates in the snapshots' running statistics);
- the re-capture decisions (what invalidates the cached graphs, what does not), counted;
- the real ``capture`` function's protocol (side-stream warm-up, stream waits, one call inside
  ``torch.cuda.graph``) with ``torch.cuda``'s stream and graph classes replaced by fakes.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from nats_kernels.schemes import AnnealedCFG
from nats_kernels.schemes import _cuda_graph as cg

pytestmark = pytest.mark.single_thread
Z, DIM = 2, 3


def _models(seed=0):
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(Z, 16), nn.LeakyReLU(0.2), nn.Linear(16, DIM))
    D = nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2),
                      nn.Linear(16, 1))
    return G, D


def _cfg(G, D, **kw):
    args = dict(M=3, eta=0.5, weights=[1.0, 0.5, 0.25], U=1, N=20, x_epochs=2, batch_size=8,
                z_dim=Z, rng=torch.Generator().manual_seed(1))
    return AnnealedCFG(copy.deepcopy(G), copy.deepcopy(D), **{**args, **kw})


class _EagerGraph:
    """A "graph" whose replay runs the captured function again, eagerly."""

    def __init__(self, fn):
        self.fn = fn
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.fn()


def _emulated_capture(fn, prepare):
    """capture()'s stand-in on the CPU: the same warm-up runs, then a replayable object."""
    for _ in range(cg.WARMUP):
        prepare()
        fn()
    return _EagerGraph(fn)


def _graphed(cfg, max_graphs=cg.MAX_GRAPHS):
    cfg._graphs = cg.MoveGraphs(_emulated_capture, max_graphs)
    return cfg._graphs


# ------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, torch.tensor(True)])
def test_cuda_graph_must_be_a_bool(bad):
    G, D = _models()
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        _cfg(G, D, cuda_graph=bad)


def test_cuda_graph_on_a_cpu_model_is_refused():
    G, D = _models()
    with pytest.raises(ValueError, match=r"cuda_graph=True needs the models on a CUDA device, "
                                         r"they are on cpu"):
        _cfg(G, D, cuda_graph=True)


def test_cuda_graph_is_off_by_default():
    G, D = _models()
    cfg = _cfg(G, D)
    assert cfg.cuda_graph is False and cfg._graphs is None
    assert _cfg(G, D, cuda_graph=False)._graphs is None


# ---------------------------------------------------------------------- the graph path, CPU


def _states_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_graph_path_matches_the_eager_loop_bit_for_bit_over_two_stages():
    G, D = _models()
    eager, graphed = _cfg(G, D), _cfg(G, D)
    graphs = _graphed(graphed)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(8, DIM, generator=gen) for _ in range(6)]
    for stage in range(2):
        eager.train_stage(data)
        graphed.train_stage(data)
        # N = 20 in batches of 8: two layouts (8 and the partial 4), captured in stage 0 and
        # replayed in stage 1 (the snapshots were copied into in place)
        assert graphs.captures == 2, stage
        _states_equal(graphed.generator, eager.generator)
        _states_equal(graphed.discriminator, eager.discriminator)
        for a, b in zip(graphed.snapshots, eager.snapshots):
            _states_equal(a, b)  # BatchNorm statistics: no warm-up update left behind
        assert torch.equal(graphed.last_approx_loss, eager.last_approx_loss)
    for n, bs in ((20, 8), (10, 4), (6, 6)):  # (BatchNorm in train mode: no batch of 1)
        x_g, z_g = graphed.generate(n, batch_size=bs, return_z=True)
        x_e, z_e = eager.generate(n, batch_size=bs, return_z=True)
        assert torch.equal(z_g, z_e)
        assert torch.equal(x_g, x_e), (n, bs, (x_g - x_e).abs().max())
        assert not torch.equal(x_g, graphed._g_eval(z_g))  # the moved samples came back
    for a, b in zip(graphed.snapshots, eager.snapshots):
        _states_equal(a, b)
    assert graphs.captures == 2 + 2  # (10, 4): 4 kept, 2 new; (6, 6): 6 new


def test_graph_path_returns_private_samples():
    """Two batches of one layout share the static buffer: each result must be its own copy."""
    G, D = _models()
    cfg = _cfg(G, D)
    _graphed(cfg)
    x = cfg.generate(16, batch_size=8)
    first = x[:8].clone()
    cfg.generate(16, batch_size=8)
    assert torch.equal(x[:8], first)
    assert not torch.equal(x[:8], x[8:])


def test_capture_failure_names_the_option_and_restores_the_snapshot_buffers():
    G, D = _models()
    cfg = _cfg(G, D)
    for s in cfg.snapshots:
        s.train()
    before = [b.clone() for s in cfg.snapshots for b in s.buffers()]

    def failing(fn, prepare):
        prepare()
        fn()  # a real forward pass in train mode: the running statistics move
        raise RuntimeError("operation not permitted when stream is capturing")

    cfg._graphs = cg.MoveGraphs(failing)
    with pytest.raises(RuntimeError, match="not permitted") as info:
        cfg.generate(8)
    assert any("cuda_graph=True" in note and "cuda_graph=False" in note
               for note in info.value.__notes__)
    after = [b for s in cfg.snapshots for b in s.buffers()]
    assert len(after) == len(before) > 0
    for a, b in zip(after, before):
        assert torch.equal(a, b)
    assert cfg._graphs.captures == 0 and len(cfg._graphs) == 0


# --------------------------------------------------------------------- re-capture decisions


def test_what_invalidates_the_captured_graphs(monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    G, D = _models()
    cfg = _cfg(G, D)
    graphs = _graphed(cfg)
    count = [0]

    def gen(n=16, bs=8, new=0, layouts=1):
        cfg.generate(n, batch_size=bs)
        count[0] += new
        assert graphs.captures == count[0]
        assert len(graphs) == layouts

    gen(new=1)
    gen()                                 # same layout, same state: replayed
    gen(20, 8, new=1, layouts=2)          # the partial last batch: its own graph
    gen(20, 8, layouts=2)
    cfg._snapshot(0)                      # a stage's in-place copy of D: same addresses
    cfg.snapshots[1].load_state_dict(cfg.snapshots[2].state_dict())  # in place too
    gen(20, 8, layouts=2)

    cfg.eta = 0.25                        # baked by value: every graph dropped
    gen(new=1)
    cfg.scale = "logd"
    gen(new=1)
    cfg.snapshots[1].eval()               # a snapshot's mode
    gen(new=1)
    cfg.snapshots[1][1].train()           # one submodule's mode
    gen(new=1)
    cfg.load_state_dict(cfg.state_dict())  # new weight tensors (same values)
    gen(new=1)
    snap = cfg.snapshots[2][0]
    snap.weight = nn.Parameter(snap.weight.detach().clone(), requires_grad=False)
    gen(new=1)                            # a parameter replaced: another storage
    cfg.snapshots[0] = copy.deepcopy(cfg.snapshots[0])  # a snapshot module replaced
    gen(new=1)
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "reference")  # another cfg_step_ kernel
    gen(new=1)
    gen()


def test_graph_cache_keeps_at_most_max_graphs_layouts():
    G, D = _models()
    cfg = _cfg(G, D)
    graphs = _graphed(cfg, max_graphs=2)
    cfg.generate(8, batch_size=8)                  # layout 8
    cfg.generate(7, batch_size=7)                  # layout 7
    cfg.generate(8, batch_size=8)                  # 8 again: most recent now
    cfg.generate(5, batch_size=5)                  # layout 5: 7 (least recent) dropped
    assert graphs.captures == 3 and len(graphs) == 2
    cfg.generate(8, batch_size=8)
    assert graphs.captures == 3
    cfg.generate(7, batch_size=7)                  # 7 was dropped: captured again
    assert graphs.captures == 4 and len(graphs) == 2


def test_graph_key_includes_the_layout_and_dtype():
    G, D = _models()
    cfg = _cfg(G, D)
    graphs = _graphed(cfg)
    x = cfg._g_eval(cfg._z(6))
    y = x.t().contiguous().t()                       # same shape, other strides
    state = cfg._graph_state(cfg.M, x.dtype)
    graphs.use_state(*state)
    for t in (x, y, x.clone()):
        graphs.move(t, cfg._move_all, cfg.snapshots)
    assert graphs.captures == 2
    graphs.use_state(*cfg._graph_state(cfg.M, x.dtype))      # equal signature: kept
    assert len(graphs) == 2
    graphs.use_state(*cfg._graph_state(cfg.M, torch.float64))  # another dtype's weights
    assert len(graphs) == 0


# --------------------------------------------------------------- capture(), with fake CUDA


class _FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def test_capture_warms_up_on_a_side_stream_then_captures_once(monkeypatch):
    log = []
    default = _FakeStream(log, "default")
    current = [default]
    capturing = []

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    class FakeGraph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def graph(g):
        assert isinstance(g, FakeGraph)
        capturing.append(g)
        log.append("capture begins")
        try:
            yield
        finally:
            capturing.pop()
            log.append("capture ends")

    monkeypatch.setattr(torch.cuda, "Stream", lambda: _FakeStream(log, "side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def fn():
        log.append(f"fn on {current[-1].name}" + (" captured" if capturing else ""))

    g = cg.capture(fn, lambda: log.append(f"prepare on {current[-1].name}"))
    assert isinstance(g, FakeGraph)
    assert log == ["side waits default",
                   *["prepare on side", "fn on side"] * cg.WARMUP,
                   "default waits side",
                   "capture begins", "fn on default captured", "capture ends"]
