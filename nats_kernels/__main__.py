"""``nats-kernels`` / ``python -m nats_kernels``: a tour of the ops, and the ``train`` job.

Prints which backends are available here, then runs every op on generated inputs (no download)
beside the plain PyTorch code a user would otherwise write, and shows that they agree, which
backend served each op and how long both took.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import nats_kernels as nk
from nats_kernels._dispatch import backend_name


def _timed(fn: Callable, repeat: int = 3):
    result = fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``. (Elementwise
    relative error would be meaningless where a result cancels to ~0, as in g - r * g_f.)"""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _gradient_lists(gen: torch.Generator, device) -> tuple[list, list]:
    """Gradients shaped like a small DCGAN discriminator's parameters."""
    shapes = [(64, 3, 4, 4), (64,), (128, 64, 4, 4), (128,), (256, 128, 4, 4), (256,),
              (1, 256, 4, 4), (1,)]
    g_r = [torch.randn(s, generator=gen).to(device) for s in shapes]
    g_f = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return g_r, g_f


def tour(device: str = "cpu", seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    rows = []

    # annealed CFG: 15 steps of grad_x D accumulated into a batch of 64x3x32x32 samples
    M, eta = 15, 0.5
    x0 = torch.randn(64, 3, 32, 32, generator=gen).to(dev)
    grads = torch.randn(M, 64, 3, 32, 32, generator=gen).to(dev)
    w = nk.annealed_weights(1.0, 0.01, M, device=dev)

    def official_loop():
        x = x0.clone()
        for m in range(M):
            x += eta * w[m] * grads[m]
        return x

    ours, t_ours = _timed(lambda: nk.cfg_accumulate(x0, grads, w, eta=eta))
    base, t_base = _timed(official_loop)
    rows.append(dict(op="cfg_accumulate", backend=backend_name("cfg_accumulate", dev),
                     baseline="official loop x += eta*w_m*g_m", diff=_max_rel_diff(ours, base),
                     ours=t_ours, base=t_base))

    # median pairwise distance (NATS Technique 1) of 2000 samples in 256 dims
    pts = torch.randn(2000, 256, generator=gen).to(dev)

    def cdist_median():
        d = torch.cdist(pts, pts)
        iu = torch.triu_indices(len(pts), len(pts), 1, device=dev)
        return d[iu[0], iu[1]].median()

    ours, t_ours = _timed(lambda: nk.median_pairwise_distance(pts), repeat=1)
    base, t_base = _timed(cdist_median, repeat=1)
    rows.append(dict(op="median_pairwise_distance", backend=backend_name(
        "median_pairwise_distance", dev), baseline="cdist + median of upper triangle",
        diff=_max_rel_diff(ours, base), ours=t_ours, base=t_base))

    # aw-loss step on DCGAN-like gradient lists
    g_r, g_f = _gradient_lists(gen, dev)
    real_logits = torch.randn(64, generator=gen).to(dev)
    fake_logits = torch.randn(64, generator=gen).to(dev) - 1

    def aw_fused():
        out = [torch.empty_like(g) for g in g_r]
        w_r, w_f, _ = nk.aw_weights(nk.multi_dot(g_r, g_f), real_logits, fake_logits)
        nk.aw_combine_(out, g_r, g_f, w_r, w_f)
        return torch.cat([o.flatten() for o in out])

    def aw_official():
        r = torch.cat([g.clone().flatten() for g in g_r])
        f = torch.cat([g.clone().flatten() for g in g_f])
        rr = torch.dot(r, r).item() + 1e-4
        ff = torch.dot(f, f).item() + 1e-4
        rf = torch.dot(r, f).item()
        s_r = torch.sigmoid(real_logits).mean().item()
        s_f = torch.sigmoid(fake_logits).mean().item()
        a1, a2, delta, eps = 0.5, 0.75, 0.05, 0.05
        if s_r < a1 or s_r < s_f - delta:
            w_r, w_f = 1 / rr**0.5 + eps, (-rf / (ff * rr**0.5) if rf <= 0 else 0.0) + eps
        elif s_r > a2 and s_r > s_f - delta:
            w_r, w_f = (-rf / (rr * ff**0.5) if rf <= 0 else 0.0) + eps, 1 / ff**0.5 + eps
        else:
            w_r, w_f = 1 / rr**0.5 + eps, 1 / ff**0.5 + eps
        return torch.cat([(w_r * a + w_f * b).flatten() for a, b in zip(g_r, g_f)])

    ours, t_ours = _timed(aw_fused)
    base, t_base = _timed(aw_official)
    rows.append(dict(op="multi_dot+aw_weights+aw_combine_",
                     backend=backend_name("aw_combine_", dev),
                     baseline="official aw_loss.py procedure", diff=_max_rel_diff(ours, base),
                     ours=t_ours, base=t_base))

    # BRC / IGA correction on the same lists
    def iga_fused():
        g = [t.clone() for t in g_r]
        nk.iga_correction_(g, g_f, nk.iga_ratio(g_f, g_r))
        return torch.cat([t.flatten() for t in g])

    def iga_per_tensor():
        num = sum(torch.dot(f.flatten(), r.flatten()).item() for f, r in zip(g_f, g_r))
        den = sum(torch.dot(f.flatten(), f.flatten()).item() for f in g_f) + 1e-12
        g = [t.clone() for t in g_r]
        for t, f in zip(g, g_f):
            t.sub_(num / den * f)
        return torch.cat([t.flatten() for t in g])

    ours, t_ours = _timed(iga_fused)
    base, t_base = _timed(iga_per_tensor)
    rows.append(dict(op="iga_ratio+iga_correction_", backend=backend_name("iga_correction_", dev),
                     baseline="per-tensor dots with .item()", diff=_max_rel_diff(ours, base),
                     ours=t_ours, base=t_base))
    return rows


def _print_tour(rows: list[dict], device: str) -> None:
    print(f"nats_kernels {nk.__version__}, torch {torch.__version__}, device {device}\n")
    print("backends:")
    for name, info in nk.backends().items():
        ops = f"{len(info['ops'])} ops" if info["available"] else "-"
        state = "available" if info["available"] else "unavailable"
        print(f"  {name:<10} {state:<12} {ops:<8} {info['reason']}")
    print()
    header = f"{'op':<34} {'backend':<10} {'baseline':<34} {'rel diff':>12} " \
             f"{'ours ms':>9} {'base ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:<34} {r['backend']:<10} {r['baseline']:<34} {r['diff']:>12.2e} "
              f"{1e3 * r['ours']:>9.2f} {1e3 * r['base']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nats-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p_tour = sub.add_parser("tour", help="run every op beside plain PyTorch (the default)")
    for p in (parser, p_tour):
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
        p.add_argument("--seed", type=int, default=0)
    p_train = sub.add_parser(
        "train", help="train GANs on embedded synthetic benchmarks and compare schemes",
        description="Train GANs on embedded mixtures of Gaussians (no download); write "
                    "results.json and samples.png into --out. No arguments: cts, nats, cts+aw "
                    "and cts+brc on ring8, one seed.")
    from .train.cli import add_arguments
    from .train.cli import main as train_main

    add_arguments(p_train)
    p_study = sub.add_parser(
        "study", help="the papers' protocols over several seeds, beside their published numbers",
        description="Train every run of the chosen protocols for several seeds (resumable) and "
                    "write study.md / study.json (mean ± std beside the papers' numbers) and "
                    "curves-*.png into --out.")
    from .train import study

    study.add_arguments(p_study)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_main(args)
    if args.command == "study":
        return study.main(args)
    rows = tour(args.device, args.seed)
    _print_tour(rows, args.device)
    worst = max(r["diff"] for r in rows)
    if worst > 1e-4:
        print(f"\nFAILED: an op disagrees with plain PyTorch by {worst:.2e}")
        return 1
    print("\nall ops agree with the plain PyTorch code (max |diff| / max |base| <= 1e-4)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
