"""What only a GPU can show, for each GPU backend (Triton and CUDA C++) that is available:

- no op reads a device value on the host: every public op runs under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing copy;
- an aw step (multi_dot + aw_weights + aw_combine_) and a cfg step (cfg_step_ with 0-d tensor
  weight and eta, and cfg_accumulate) are captured in a CUDA graph and replayed on new values,
  matching eager calls;
- ``AnnealedCFG(cuda_graph=True)``: ``generate`` replaying its captured M-step loop gives the
  eager loop's samples over two stages (re-use after the snapshots were copied into in place)
  with a partial last batch, and replays with no host sync;
- ``torch.compile(fullgraph=True)`` of a function calling the cfg, iga and median ops on CUDA
  tensors (test_aw_step.py / test_iga.py hold the aw and iga step compile tests; they are
  parametrized over these same backends).

Not collected without a CUDA device (tests/conftest.py); ``.ci/gpu_check`` runs it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cases, make
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import AnnealedCFG

ALL_OPS = ("cfg_accumulate", "cfg_accumulate_list", "cfg_step_", "multi_dot", "aw_weights",
           "aw_combine_", "iga_ratio", "iga_correction_", "median_pairwise_distance")
GPU_CASES = [c for c in cases(*ALL_OPS) if c.values[0] == "cuda"]
SHAPES = [(7, 5), (59,), (), (3, 1025)]


def _list(seed, dtype=torch.float32):
    return [make(s, dtype, "cuda", seed=seed + i) for i, s in enumerate(SHAPES)]


def _inputs() -> dict:
    """CUDA inputs of every op, made before the checked region (a host-to-device copy of a
    pageable tensor synchronizes, and the sync debug mode would flag the test's own copies)."""
    d = {
        "x0": make((8, 3, 5), torch.float32, "cuda", seed=1),
        "grads": make((4, 8, 3, 5), torch.float32, "cuda", seed=2),
        "w": nk.annealed_weights(1.0, 0.01, 4, device="cuda"),
        "scale": make((4, 8), torch.float32, "cuda", seed=3),
        "eta": torch.tensor(0.5, device="cuda"),
        "g_r": _list(10),
        "g_f": _list(20),
        "real": make((16,), torch.float32, "cuda", seed=4),
        "fake": make((16,), torch.float32, "cuda", seed=5),
        "pts": make((300, 7), torch.float32, "cuda", seed=6),
        "other": make((200, 7), torch.float32, "cuda", seed=7),
    }
    d["grad_list"] = list(d["grads"])
    return d


def _every_op_once(d: dict) -> None:
    """Each public op once, with 0-d tensor scalars and with Python numbers (which become
    device tensors by a fill, never by a copy)."""
    out = nk.cfg_accumulate(d["x0"], d["grads"], d["w"], eta=d["eta"], scale=d["scale"])
    nk.cfg_accumulate(d["x0"], d["grad_list"], d["w"], eta=0.5, out=out)
    nk.cfg_step_(out, d["grads"][0], d["w"][1], eta=d["eta"], scale=d["scale"][0])
    nk.cfg_step_(out, d["grads"][1], 0.25, eta=0.5)
    g_r, g_f = d["g_r"], d["g_f"]
    dots = nk.multi_dot(g_r, g_f)
    w_r, w_f, _ = nk.aw_weights(dots, d["real"], d["fake"])
    nk.aw_combine_([torch.empty_like(t) for t in g_r], g_r, g_f, w_r, w_f)
    nk.aw_combine_([torch.empty_like(t) for t in g_r], g_r, g_f, 1.0, 0.5)
    r = nk.iga_ratio(g_r, g_f)
    nk.iga_correction_([t.clone() for t in g_r], g_f, r)
    nk.iga_correction_([t.clone() for t in g_r], g_f, -0.5)
    nk.median_pairwise_distance(d["pts"])
    nk.median_pairwise_distance(d["pts"], d["other"], squared=True)
    nk.median_pairwise_distance(d["pts"].view(3, 100, 7), batched=True)


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_no_op_synchronizes_with_the_host(device, backend):
    d = _inputs()
    _every_op_once(d)  # first calls compile / allocate outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _every_op_once(d)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _capture(fn):
    """Warm ``fn`` up on a side stream, capture it in a CUDA graph, return the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_aw_step_replays_in_a_cuda_graph(device, backend):
    g_r, g_f, out = _list(30), _list(40), [torch.empty(s, device="cuda") for s in SHAPES]
    real = torch.empty(32, device="cuda")
    fake = torch.empty(32, device="cuda")
    result = {}

    def step():
        dots = nk.multi_dot(g_r, g_f)
        w_r, w_f, case = nk.aw_weights(dots, real, fake)
        nk.aw_combine_(out, g_r, g_f, w_r, w_f)
        result.update(dots=dots, w_r=w_r, w_f=w_f, case=case)

    real.copy_(make((32,), torch.float32, "cuda", seed=50))
    fake.copy_(make((32,), torch.float32, "cuda", seed=51))
    graph = _capture(step)
    for seed in (60, 70):  # new values in the captured buffers, then replay
        for i, t in enumerate(g_r + g_f):
            t.copy_(make(t.shape, torch.float32, "cuda", seed=seed + i))
        real.copy_(make((32,), torch.float32, "cuda", seed=seed + 20) + 1.0)
        fake.copy_(make((32,), torch.float32, "cuda", seed=seed + 21) - 1.0)
        graph.replay()
        torch.cuda.synchronize()
        dots = nk.multi_dot(g_r, g_f)
        w_r, w_f, case = nk.aw_weights(dots, real, fake)
        expected = [torch.empty_like(t) for t in out]
        nk.aw_combine_(expected, g_r, g_f, w_r, w_f)
        torch.testing.assert_close(result["dots"], dots)
        torch.testing.assert_close(result["w_r"], w_r)
        torch.testing.assert_close(result["w_f"], w_f)
        assert torch.equal(result["case"], case)
        for p, (o, e) in enumerate(zip(out, expected)):
            torch.testing.assert_close(o, e, msg=lambda m, p=p: f"out[{p}]: {m}")


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_cfg_step_replays_in_a_cuda_graph(device, backend):
    M = 5
    x = torch.empty(16, 3, 7, device="cuda")
    x0 = torch.empty_like(x)
    grads = torch.empty(M, *x.shape, device="cuda")
    w = torch.empty(M, device="cuda")
    eta = torch.empty((), device="cuda")
    scale = torch.empty(M, 16, device="cuda")
    acc = torch.empty_like(x)

    def step():
        x.copy_(x0)
        for m in range(M):
            nk.cfg_step_(x, grads[m], w[m], eta=eta, scale=scale[m])
        nk.cfg_accumulate(x0, grads, w, eta=eta, scale=scale, out=acc)

    def fill(seed):
        x0.copy_(make(x.shape, torch.float32, "cuda", seed=seed))
        grads.copy_(make(grads.shape, torch.float32, "cuda", seed=seed + 1))
        w.copy_(nk.annealed_weights(1.0 + seed, 0.01, M, device="cuda"))
        eta.fill_(0.1 * seed)
        scale.copy_(make(scale.shape, torch.float32, "cuda", seed=seed + 2))

    fill(1)
    graph = _capture(step)
    for seed in (2, 3):
        fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        expected = x0.clone()
        for m in range(M):
            nk.cfg_step_(expected, grads[m], w[m], eta=eta, scale=scale[m])
        torch.testing.assert_close(x, expected)
        torch.testing.assert_close(acc, nk.cfg_accumulate(x0, grads, w, eta=eta, scale=scale))


# torch.compile itself warns that torch.jit.script_method is deprecated (torch internals).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_ops_compile_fullgraph_on_cuda(device, backend):
    def step(x0, grads, w, eta, g, gf, pts):
        y = nk.cfg_accumulate(x0, grads, w, eta=eta)
        nk.cfg_step_(y, grads[0], w[0], eta=eta)
        r = nk.iga_ratio(gf, g)
        nk.iga_correction_(g, gf, r)
        return y, r, nk.median_pairwise_distance(pts)

    x0 = make((4, 3, 5), torch.float32, "cuda")
    grads = make((3, 4, 3, 5), torch.float32, "cuda", seed=1)
    w = nk.annealed_weights(1.0, 0.01, 3, device="cuda")
    eta = torch.tensor(0.5, device="cuda")
    pts = make((97, 3), torch.float32, "cuda", seed=2)
    g_eager, g_compiled, gf = _list(80), _list(80), _list(90)
    eager = step(x0, grads, w, eta, g_eager, gf, pts)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x0, grads, w, eta, g_compiled, gf, pts)
    for name, e, c in zip(("y", "r", "median"), eager, compiled):
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")
    for p, (c, e) in enumerate(zip(g_compiled, g_eager)):
        torch.testing.assert_close(c, e, msg=lambda m, p=p: f"g[{p}]: {m}")


def _graphed_cfg(scale="kl", M=4, N=100, batch_size=32):
    """An AnnealedCFG with cuda_graph=True on small CUDA MLPs (BatchNorm in D, in train mode:
    the snapshots update their running statistics inside the graph, as eagerly)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, 64), nn.LeakyReLU(0.2), nn.Linear(64, 8)).cuda()
    D = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.LeakyReLU(0.2),
                      nn.Linear(64, 1)).cuda()
    return AnnealedCFG(G, D, M=M, eta=0.5, weights=nk.annealed_weights(1.0, 0.01, M), U=2,
                       N=N, x_epochs=2, batch_size=batch_size, z_dim=4, scale=scale,
                       rng=torch.Generator("cuda").manual_seed(1), cuda_graph=True)


@pytest.mark.parametrize("scale", ["kl", "logd"])
@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_annealed_cfg_cuda_graph_generate_matches_eager(device, backend, scale):
    cfg = _graphed_cfg(scale)
    data = [make((32, 8), torch.float32, "cuda", seed=100 + i) for i in range(cfg.M * cfg.U)]
    for stage in range(2):
        cfg.train_stage(data)  # its approximator generates N = 100 in batches of 32: 32 and 4
        assert cfg._graphs.captures == 2, f"stage {stage}: re-captured after the snapshots"
        cfg.rng.manual_seed(10 + stage)
        x, z = cfg.generate(100, batch_size=32, return_z=True)
        eager = torch.cat([cfg._move(cfg._g_eval(zb), cfg.M) for zb in z.split(32)])
        diff = (x - eager).abs().max().item()
        moved = (x - cfg._g_eval(z)).abs().max().item()
        print(f"stage {stage} [{backend}, {scale}]: max |graph - eager| = {diff:.3g} "
              f"(samples moved by up to {moved:.3g})")
        assert moved > 0
        torch.testing.assert_close(x, eager, rtol=1e-5, atol=1e-6)
    assert cfg._graphs.captures == 2


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_annealed_cfg_cuda_graph_replay_does_not_synchronize(device, backend):
    cfg = _graphed_cfg()
    cfg.generate(40, batch_size=16)  # captures the layouts 16 and 8 (the capture syncs)
    assert cfg._graphs.captures == 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = cfg.generate(40, batch_size=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert cfg._graphs.captures == 2 and x.shape == (40, 8) and x.is_cuda
