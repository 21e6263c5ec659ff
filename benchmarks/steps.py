"""What a scheme costs per training step: the aw discriminator step and the BRC generator step
against the plain steps they replace, next to the inherent cost of their extra backward pass.

    python benchmarks/steps.py [--quick] [--out benchmarks/results/steps-cpu-DATE]
        [--threads N] [--reps 11] [--warmup 2] [--families mlp sngan dcgan]
        [--conv-batch N] [--device cpu|cuda]

Writes ``OUT.json`` and ``OUT.md`` (default ``OUT``: ``benchmarks/results/steps-<device>-<date>``;
with ``--quick`` nothing is written unless ``--out`` is given) and prints the tables.

Model families (``D`` / ``G`` parameter counts are in the output):

- ``train MLP``: the train command's networks for ``ring8``
  (``nats_kernels.train.runner.networks``: 3 linear layers of width 256, LeakyReLU(0.2),
  z_dim 2), real batches drawn from ``ring8``, the train command's batch 512.
- ``SN-GAN 32``: the SN-GAN ResNet pair for CIFAR-10 32x32 (Miyato et al. 2018):
  D = optimized block, one downsampling block and two plain blocks of 128 channels, every conv
  and the linear head spectrally normalized (``torch.nn.utils.parametrizations.spectral_norm``);
  G = linear to 4x4x256 and three upsampling blocks of 256 channels with BatchNorm, z_dim 128.
  Their trainable parameter shapes are exactly ``gan_shapes.sngan_d()`` / ``sngan_g()``
  (checked at start), the shapes of the op-level benchmarks.
- ``DCGAN 32``: the DCGAN layout of ``gan_shapes.dcgan_d()`` / ``dcgan_g()`` (64x64, 64 base
  channels) brought to 32x32 by dropping its 64-channel resolution level: D = 4x4 stride-2
  convs 3->128->256->512 (BatchNorm after the 2nd and 3rd, LeakyReLU(0.2)) and a 4x4 conv to
  one logit; G = 4x4 transposed convs 100->512 (1->4), 512->256->128->3 (stride 2, BatchNorm +
  ReLU, Tanh), no biases: 2.6M / 3.5M parameters against the 64x64 model's 2.8M / 3.6M.

Batch on the CPU: 512 for the MLPs; ``--conv-batch`` (default 16) images for the conv pairs,
a reduced batch (the papers use 64); on ``--device cuda`` the conv default is 64. ``--quick``
shrinks every network and batch (MLP width 32 and batch 32; 8-16 channels and 2 images) for a
smoke run.

Loss: the non-saturating GAN (BCE with logits, ``nats_kernels.train.losses`` ``vanilla``):
``L_r = softplus(-D(x)).mean()``, ``L_f = softplus(D(G(z))).mean()``, generator
``F = softplus(-D(G(z))).mean()``. The six timed steps (every one starts with all ``.grad`` set
to None, outside the timing, as ``opt.zero_grad(set_to_none=True)`` does; **no optimizer step**:
it is the same in every variant, and without it the parameters stay fixed, so every repetition
computes the same thing):

- ``D plain``: ``D(real)``, ``D(fake)`` (``fake``: one fixed batch ``G(z)`` drawn under no_grad
  before the timing, the same in every D step), ``(L_r + L_f).backward()``;
- ``D aw``: the same forwards, ``AWLoss(D).backward(L_r, L_f, real_logits, fake_logits)``;
- ``D 2-pass``: the same forwards, ``torch.autograd.grad`` of ``L_r`` and of ``L_f`` over D's
  parameters and ``.grad = g_r + g_f`` (``torch._foreach_add_``): what backpropagating the two
  terms separately inherently costs (the two gradient sets, and combining them into ``.grad``,
  which ``backward()`` does inside its one pass); aw adds the dot products, the rule and the
  weights to it;
- ``G plain``: ``D(G(z))``, ``F.backward()`` (D is not frozen, as in the train command, so this
  also fills D's ``.grad``);
- ``G brc``: ``fake = G(z)``, ``fake_logits = D(fake)``, ``f = L_r(D(real)) + L_f(fake_logits)``
  (same fake batch, not detached), ``BRC(G, D).backward(F, f)`` (eq. 9, the IGA);
- ``G 2-pass``: the same forwards (so the extra D forward on the real batch that f needs is
  part of the inherent cost), ``torch.autograd.grad`` of ``f`` and of ``F`` over D's and G's
  parameters (the first keeping the shared graph) and G's ``.grad = dF/dG - df/dG`` (a fixed r of
  1): one extra backward through D and G; BRC adds the three dot products over D's gradients and
  r to it.

Timing: one warm-up round of all six steps (``--warmup``), then ``--reps`` rounds, each timing
the six steps once, in an order rotated every round (interleaved: a drift in the machine's
speed reaches every step alike); the garbage collector is off during a round. Reported: the
median per step (all times are in the JSON) and the fastest round. Per scheme:
``overhead = (scheme - plain) / plain``, ``inherent = (2-pass - plain) / plain`` and the verdict
``overhead <= inherent + 5%`` (issue 13's target: what the scheme adds beyond its extra
backward pass is at most 5% of the plain step), from the medians; ``excess (min)``, the same
``(scheme - 2-pass) / plain`` from each step's fastest round, is a second opinion for a busy
machine.

Agreement, before the timing (the script stops when it fails; tolerance 1e-4 on the normwise
error relative to ``|w_r| |g_r| + |w_f| |g_f|``, resp. ``|dF/dG| + |r| |df/dG|``, the size of
the rounding errors of a sum that may cancel), on the same state (D's and G's state_dict
restored before each call: spectral norm's power iteration and BatchNorm's running statistics
change buffers in every forward):

- aw: the step's D gradients, weights and case against the same call on nats_kernels'
  ``reference`` backend (``NATS_KERNELS_BACKEND=reference``), and the D gradients against
  ``w_r g_r + w_f g_f`` (the call's weights) from ``torch.autograd.grad`` in float64;
- BRC: the step's G gradients and r against the reference backend's, the G gradients against
  ``dF/dG - r df/dG`` (the call's r) from autograd in float64, and r against
  ``<df/dD, dF/dD> / (<df/dD, df/dD> + eps)`` from autograd in float64 (relative to
  ``sum |df/dD * dF/dD| / |df/dD|^2``: the float32 dot product may cancel);
- every step's gradients finite.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import gan_shapes  # benchmarks/ (the script's folder)
import nkbench
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import nats_kernels as nk
from nats_kernels.schemes import BRC, AWLoss
from nats_kernels.train import get_dataset
from nats_kernels.train.losses import get_loss
from nats_kernels.train.runner import networks

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("D plain", "D aw", "D 2-pass", "G plain", "G brc", "G 2-pass")
SCHEMES = (("aw", "D plain", "D aw", "D 2-pass"), ("brc", "G plain", "G brc", "G 2-pass"))
TARGET = 0.05  # issue 13: overhead <= inherent + 5% of the plain step
TOL = 1e-4  # normwise relative error of the agreement checks (float32 gradients)
LOSS = get_loss("vanilla")


# ---------------------------------------------------------------------------------- networks


class _SNOptimizedBlock(nn.Module):
    """SN-GAN's first discriminator block: conv3-relu-conv3-avgpool + avgpool-conv1 shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.c1 = spectral_norm(nn.Conv2d(cin, cout, 3, 1, 1))
        self.c2 = spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.sc(F.avg_pool2d(x, 2))


class _SNDisBlock(nn.Module):
    """SN-GAN's residual discriminator block (pre-activation), 1x1 shortcut where it
    downsamples."""

    def __init__(self, cin, cout, down):
        super().__init__()
        self.down = down
        self.c1 = spectral_norm(nn.Conv2d(cin, cout, 3, 1, 1))
        self.c2 = spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = spectral_norm(nn.Conv2d(cin, cout, 1)) if down or cin != cout else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = x if self.sc is None else self.sc(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SNGANDiscriminator(nn.Module):
    """SN-GAN ResNet discriminator for 32x32 (``gan_shapes.sngan_d(ch)``'s shapes)."""

    def __init__(self, ch=128):
        super().__init__()
        self.blocks = nn.Sequential(_SNOptimizedBlock(3, ch), _SNDisBlock(ch, ch, True),
                                    _SNDisBlock(ch, ch, False), _SNDisBlock(ch, ch, False))
        self.head = spectral_norm(nn.Linear(ch, 1))

    def forward(self, x):
        return self.head(F.relu(self.blocks(x)).sum(dim=(2, 3)))


class _SNGenBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.b1, self.c1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.b2, self.c2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2)
        h = self.c1(F.interpolate(F.relu(self.b1(x)), scale_factor=2))
        return self.c2(F.relu(self.b2(h))) + self.sc(up)


class SNGANGenerator(nn.Module):
    """SN-GAN ResNet generator for 32x32 (``gan_shapes.sngan_g(ch, z)``'s shapes)."""

    def __init__(self, ch=256, z=128):
        super().__init__()
        self.ch = ch
        self.l1 = nn.Linear(z, 4 * 4 * ch)
        self.blocks = nn.Sequential(*(_SNGenBlock(ch, ch) for _ in range(3)))
        self.bn, self.out = nn.BatchNorm2d(ch), nn.Conv2d(ch, 3, 3, 1, 1)

    def forward(self, z):
        h = self.blocks(self.l1(z).view(-1, self.ch, 4, 4))
        return torch.tanh(self.out(F.relu(self.bn(h))))


def dcgan32(nf=64, nz=100):
    """(G, D): DCGAN at 32x32 (see the module docstring), widths nf*2 .. nf*8."""
    G = nn.Sequential(
        nn.ConvTranspose2d(nz, nf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(nf * 8), nn.ReLU(),
        nn.ConvTranspose2d(nf * 8, nf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(nf * 4), nn.ReLU(),
        nn.ConvTranspose2d(nf * 4, nf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(nf * 2), nn.ReLU(),
        nn.ConvTranspose2d(nf * 2, 3, 4, 2, 1, bias=False), nn.Tanh())
    D = nn.Sequential(
        nn.Conv2d(3, nf * 2, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(nf * 2, nf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(nf * 4), nn.LeakyReLU(0.2),
        nn.Conv2d(nf * 4, nf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(nf * 8), nn.LeakyReLU(0.2),
        nn.Conv2d(nf * 8, 1, 4, 1, 0, bias=False), nn.Flatten())
    return G, D


def _images(n, gen, device):
    """Stand-in real images in [-1, 1] (the timing does not depend on their content)."""
    return (torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1).to(device)


def family(name: str, quick: bool, conv_batch: int, device):
    """``(label, G, D, real, z, batch, note)`` of a family, built from a fixed seed."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "mlp":
        width, batch = (32, 32) if quick else (256, 512)
        data = get_dataset("ring8")
        G, D = networks("ring8", data.dim, 2, width)
        real, z = data.sample(batch, gen), torch.randn(batch, 2, generator=gen)
        label, note = "train MLP", f"ring8, width {width}, z_dim 2"
    elif name == "sngan":
        ch_d, ch_g, nz, batch = (8, 16, 16, 2) if quick else (128, 256, 128, conv_batch)
        G, D = SNGANGenerator(ch_g, nz), SNGANDiscriminator(ch_d)
        for got, want in ((D, gan_shapes.sngan_d(ch_d)), (G, gan_shapes.sngan_g(ch_g, nz))):
            shapes = sorted(tuple(p.shape) for p in got.parameters())
            assert shapes == sorted(tuple(s) for s in want), "SN-GAN shapes != gan_shapes"
        real, z = _images(batch, gen, "cpu"), torch.randn(batch, nz, generator=gen)
        label, note = "SN-GAN 32", f"D ch {ch_d}, G ch {ch_g}, z_dim {nz}, spectral norm"
    elif name == "dcgan":
        nf, nz, batch = (8, 16, 2) if quick else (64, 100, conv_batch)
        G, D = dcgan32(nf, nz)
        real, z = _images(batch, gen, "cpu"), torch.randn(batch, nz, 1, 1, generator=gen)
        label, note = "DCGAN 32", f"nf {nf}, z_dim {nz}, BatchNorm"
    else:
        raise ValueError(name)
    return label, G.to(device), D.to(device), real.to(device), z.to(device), batch, note


# ------------------------------------------------------------------------------------- steps


def make_steps(G, D, real, z):
    """The six step functions of one family, on fixed inputs (see the module docstring)."""
    aw, brc = AWLoss(D), BRC(G, D)
    p_d = [p for p in D.parameters() if p.requires_grad]
    p_g = [p for p in G.parameters() if p.requires_grad]
    with torch.no_grad():
        fake = G(z)

    def d_forward():
        rl, fl = D(real), D(fake)
        return LOSS.real(rl), LOSS.fake(fl), rl, fl

    def d_plain():
        lr, lf, _, _ = d_forward()
        (lr + lf).backward()

    def d_aw():
        aw.backward(*d_forward())

    def d_two_pass():
        lr, lf, _, _ = d_forward()
        g_r = torch.autograd.grad(lr, p_d)
        g_f = torch.autograd.grad(lf, p_d)
        for p, g in zip(p_d, g_r):
            p.grad = g
        torch._foreach_add_(list(g_r), list(g_f))

    def g_forward():
        fl = D(G(z))
        return LOSS.gen(fl), fl

    def g_plain():
        g_forward()[0].backward()

    def g_losses():
        F_loss, fl = g_forward()
        return F_loss, LOSS.real(D(real)) + LOSS.fake(fl)

    def g_brc():
        brc.backward(*g_losses())

    n_d = len(p_d)

    def g_two_pass():
        F_loss, f = g_losses()
        g_f = torch.autograd.grad(f, p_d + p_g, retain_graph=True)
        g_F = torch.autograd.grad(F_loss, p_d + p_g)
        out = list(g_F[n_d:])
        for p, g in zip(p_g, out):
            p.grad = g
        torch._foreach_sub_(out, list(g_f[n_d:]))

    fns = dict(zip(STEPS, (d_plain, d_aw, d_two_pass, g_plain, g_brc, g_two_pass)))
    return fns, aw, brc, (d_forward, g_losses, p_d, p_g)


def _clear(modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _norm(ts) -> float:
    return float(torch.cat([t.detach().double().flatten() for t in ts]).norm())


def _rel(a, b, scale=None) -> float:
    """``|a - b| / scale`` over the lists (default scale ``|b|``). The schemes' outputs are
    weighted sums ``x g_1 + y g_2`` that may cancel: their checks pass
    ``|x| |g_1| + |y| |g_2|``, the size of the rounding errors of the sum."""
    a = torch.cat([t.detach().double().flatten() for t in a])
    b = torch.cat([t.detach().double().flatten() for t in b])
    scale = float(b.norm()) if scale is None else scale
    return float((a - b).norm()) / max(scale, 1e-300)


def _finite(ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


class _backend:
    """``NATS_KERNELS_BACKEND=name`` for a block (read by the dispatcher on every call)."""

    def __init__(self, name):
        self.name, self.old = name, None

    def __enter__(self):
        self.old = os.environ.get("NATS_KERNELS_BACKEND")
        os.environ["NATS_KERNELS_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("NATS_KERNELS_BACKEND", None)
        else:
            os.environ["NATS_KERNELS_BACKEND"] = self.old


def check(G, D, fns, aw, brc, parts) -> dict:
    """The agreement checks of the module docstring; raises AssertionError when one fails."""
    d_forward, g_losses, p_d, p_g = parts
    state = ({k: v.clone() for k, v in G.state_dict().items()},
             {k: v.clone() for k, v in D.state_dict().items()})

    def fresh():
        G.load_state_dict(state[0])
        D.load_state_dict(state[1])
        _clear((G, D))

    out = {}
    # aw: the public call, the same on the reference backend, and autograd's w_r g_r + w_f g_f
    fresh()
    fns["D aw"]()
    got = [p.grad.clone() for p in p_d]
    w = [float(t) for t in aw.last_weights]
    case = int(aw.last_case)
    fresh()
    with _backend("reference"):
        fns["D aw"]()
    ref = [p.grad.clone() for p in p_d]
    w_ref, case_ref = [float(t) for t in aw.last_weights], int(aw.last_case)
    fresh()
    lr, lf, _, _ = d_forward()
    g_r = torch.autograd.grad(lr, p_d)
    g_f = torch.autograd.grad(lf, p_d)
    want = [w[0] * a.double() + w[1] * b.double() for a, b in zip(g_r, g_f)]
    scale = abs(w[0]) * _norm(g_r) + abs(w[1]) * _norm(g_f)
    out["aw"] = dict(case=case, w_r=w[0], w_f=w[1], rel_err_vs_reference=_rel(got, ref, scale),
                     rel_err_vs_autograd=_rel(got, want, scale), finite=_finite(got))
    assert case == case_ref, f"aw case {case} != reference backend's {case_ref}"
    assert max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(w, w_ref)) <= TOL, (w, w_ref)
    # brc: the public call, the reference backend, and dF/dG - r df/dG from autograd (float64)
    fresh()
    fns["G brc"]()
    got = [p.grad.clone() for p in p_g]
    r = float(brc.last_ratio)
    fresh()
    with _backend("reference"):
        fns["G brc"]()
    ref = [p.grad.clone() for p in p_g]
    r_ref = float(brc.last_ratio)
    fresh()
    F_loss, f = g_losses()
    n_d = len(p_d)
    gf = torch.autograd.grad(f, p_d + p_g, retain_graph=True)
    gF = torch.autograd.grad(F_loss, p_d + p_g)
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(gf[:n_d], gF[:n_d]))
    dot_abs = sum(float((a.double() * b.double()).abs().sum())
                  for a, b in zip(gf[:n_d], gF[:n_d]))
    sq = sum(float(a.double().square().sum()) for a in gf[:n_d])
    r_want = dot / (sq + brc.eps)
    # r's float32 dot may cancel: its error is relative to sum |df/dD * dF/dD|, not to the dot
    r_scale = dot_abs / (sq + brc.eps) + abs(r_want)
    # the gradient plumbing, with the scheme's own r (r itself is checked just above)
    want = [a.double() - r * b.double() for a, b in zip(gF[n_d:], gf[n_d:])]
    scale = _norm(gF[n_d:]) + abs(r) * _norm(gf[n_d:])
    out["brc"] = dict(r=r, r_autograd=r_want, rel_err_vs_reference=_rel(got, ref, scale),
                      rel_err_vs_autograd=_rel(got, want, scale), finite=_finite(got))
    assert abs(r - r_ref) <= TOL * r_scale, (r, r_ref)
    assert abs(r - r_want) <= TOL * r_scale, (r, r_want)
    for name in ("aw", "brc"):
        o = out[name]
        assert o["finite"], f"{name}: non-finite gradient"
        for k in ("rel_err_vs_reference", "rel_err_vs_autograd"):
            assert o[k] <= TOL, f"{name}: {k} {o[k]:.2e} > {TOL}"
    # the steps timed here end with finite gradients too
    for step, fn in fns.items():
        fresh()
        fn()
        grads = [p.grad for p in (p_d if step.startswith("D") else p_g) if p.grad is not None]
        assert grads and _finite(grads), f"{step}: missing or non-finite gradients"
    fresh()
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(G, D, fns, reps, warmup, device) -> dict[str, list[float]]:
    """Interleaved timing: ``warmup`` rounds, then ``reps`` rounds of all six steps in an order
    rotated every round; seconds per call."""
    times = {s: [] for s in STEPS}
    order = list(STEPS)
    for i in range(warmup + reps):
        gc.collect()
        gc.disable()
        try:
            for step in order:
                _clear((G, D))
                _sync(device)
                t0 = time.perf_counter()
                fns[step]()
                _sync(device)
                if i >= warmup:
                    times[step].append(time.perf_counter() - t0)
        finally:
            gc.enable()
        order = order[1:] + order[:1]
    _clear((G, D))
    return times


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def run_family(name, args, device) -> dict:
    label, G, D, real, z, batch, note = family(name, args.quick, args.conv_batch, device)
    fns, aw, brc, parts = make_steps(G, D, real, z)
    checks = check(G, D, fns, aw, brc, parts)
    times = time_steps(G, D, fns, args.reps, args.warmup, device)
    ms = {s: statistics.median(t) * 1e3 for s, t in times.items()}
    best = {s: min(t) * 1e3 for s, t in times.items()}
    verdicts = []
    for scheme, plain, step, inherent in SCHEMES:
        base = ms[plain]
        over, inh = (ms[step] - base) / base, (ms[inherent] - base) / base
        # the same from the fastest rounds: a second opinion where the machine was busy
        excess_min = (best[step] - best[inherent]) / best[plain]
        verdicts.append(dict(family=label, scheme=scheme, plain_ms=base, scheme_ms=ms[step],
                             inherent_ms=ms[inherent], overhead=over, inherent=inh,
                             excess=over - inh, ok=over <= inh + TARGET,
                             excess_min=excess_min, ok_min=excess_min <= TARGET))
    return dict(family=label, note=note, batch=batch, d_params=n_params(D),
                g_params=n_params(G),
                rows=[dict(family=label, step=s, ms=ms[s], min_ms=min(times[s]) * 1e3,
                           times_ms=[t * 1e3 for t in times[s]]) for s in STEPS],
                verdicts=verdicts, checks=checks)


# ------------------------------------------------------------------------------------ output


def _pct(x) -> str:
    return f"{100 * x:+.1f}%"


def markdown(results, meta) -> str:
    lines = [f"# Scheme cost per training step ({meta['date']}, {meta['machine']}, torch "
             f"{meta['torch']}, {meta['threads']} threads)", "", f"`{meta['command']}`", "",
             f"{meta['reps']} interleaved rounds after {meta['warmup']} warm-up; median ms per "
             f"step; no optimizer step; `.grad` set to None before each step (untimed). "
             f"`2-pass`: the plain step's forwards with the scheme's backward passes done by "
             f"`torch.autograd.grad` and combined into `.grad` with fixed weights (the inherent "
             f"cost; see `benchmarks/steps.py`). Target: overhead <= inherent + "
             f"{100 * TARGET:.0f}% of the plain step.", "",
             "| family | batch | D / G params | step | ms | min ms | vs plain |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ms = {row["step"]: row["ms"] for row in r["rows"]}
        for row in r["rows"]:
            base = ms[row["step"].split()[0] + " plain"]
            lines.append(f"| {r['family']} | {r['batch']} | {r['d_params'] / 1e6:.3g}M / "
                         f"{r['g_params'] / 1e6:.3g}M | {row['step']} | {row['ms']:.3f} | "
                         f"{row['min_ms']:.3f} | {row['ms'] / base:.2f}x |")
    lines += ["", "overhead = (scheme - plain) / plain, inherent = (2-pass - plain) / plain, "
              "excess = overhead - inherent (the verdict: excess <= 5%); `excess (min)`: the "
              "same from each step's fastest round.", "",
              "| family | scheme | plain ms | scheme ms | 2-pass ms | overhead | inherent | "
              "excess | verdict | excess (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for v in r["verdicts"]:
            verdict = "ok" if v["ok"] else f"over by {100 * (v['excess'] - TARGET):.1f}%"
            lines.append(f"| {v['family']} | {v['scheme']} | {v['plain_ms']:.3f} | "
                         f"{v['scheme_ms']:.3f} | {v['inherent_ms']:.3f} | {_pct(v['overhead'])} "
                         f"| {_pct(v['inherent'])} | {_pct(v['excess'])} | {verdict} | "
                         f"{_pct(v['excess_min'])} |")
    lines += ["", "Agreement (before timing): normwise error of the scheme's gradients relative "
              "to |w_r| |g_r| + |w_f| |g_f| (aw), |dF/dG| + |r| |df/dG| (brc):",
              "", "| family | scheme | vs reference backend | vs autograd | weights / r |",
              "|---|---|---|---|---|"]
    for r in results:
        c = r["checks"]
        lines.append(f"| {r['family']} | aw | {c['aw']['rel_err_vs_reference']:.1e} | "
                     f"{c['aw']['rel_err_vs_autograd']:.1e} | case {c['aw']['case']}, "
                     f"w_r {c['aw']['w_r']:.4g}, w_f {c['aw']['w_f']:.4g} |")
        lines.append(f"| {r['family']} | brc | {c['brc']['rel_err_vs_reference']:.1e} | "
                     f"{c['brc']['rel_err_vs_autograd']:.1e} | r {c['brc']['r']:+.4g} |")
    lines += ["", "Families: " + "; ".join(f"{r['family']}: {r['note']}" for r in results)
              + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny networks and batches, 3 rounds")
    p.add_argument("--out", help="write OUT.json and OUT.md (default: benchmarks/results/"
                                 "steps-<device>-<date>; nothing with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, help="timed rounds (default 11, --quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up rounds (default 2, --quick 1)")
    p.add_argument("--families", nargs="+", choices=("mlp", "sngan", "dcgan"),
                   default=["mlp", "sngan", "dcgan"])
    p.add_argument("--conv-batch", type=int, help="images per batch of the conv pairs "
                                                  "(default 16 on cpu, 64 on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("steps.py: --device cuda but no GPU", file=sys.stderr)
        return 3
    if a.threads:
        torch.set_num_threads(a.threads)
    a.reps = a.reps or (3 if a.quick else 11)
    a.warmup = 1 if a.quick and a.warmup is None else 2 if a.warmup is None else a.warmup
    a.conv_batch = a.conv_batch or (64 if device.type == "cuda" else 16)
    date = datetime.date.today().isoformat()
    out = a.out
    if out is None and not a.quick:
        out = str(ROOT / "benchmarks" / "results" / f"steps-{device.type}-{date}")

    results = []
    for name in a.families:
        t0 = time.perf_counter()
        results.append(run_family(name, a, device))
        print(f"[{results[-1]['family']}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{nkbench.cpu_model()}, {os.cpu_count()} CPUs")
    backend = os.environ.get("NATS_KERNELS_BACKEND", "auto")
    meta = dict(date=date, machine=machine, torch=torch.__version__,
                threads=torch.get_num_threads(), python=platform.python_version(),
                platform=platform.platform(), device=device.type, reps=a.reps,
                warmup=a.warmup, quick=a.quick, target=TARGET,
                backend=backend, backends_available=[k for k, v in nk.backends().items()
                                                     if v["available"]],
                command="python benchmarks/steps.py " + " ".join(argv))
    md = markdown(results, meta)
    print(md)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump(dict(meta=meta, families=results,
                           rows=[row for r in results for row in r["rows"]],
                           verdicts=[v for r in results for v in r["verdicts"]]), f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(md)
        print(f"wrote {out}.json and {out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
