"""Per-call cost of every public op against the PyTorch line it replaces, tiny sizes to 8M
elements (issue 13, items 1 and 2; design §8.1).

    python benchmarks/overhead.py [--quick] [--threads N] [--json FILE] [--md FILE]

For each op and size, in one process, with interleaved repetitions (each repetition times a
loop of calls; the best repetition is kept, so the number is the per-call cost on a quiet core):

- ``ours``: the public ``nats_kernels`` call as a user makes it, validation included, with the
  ``auto`` backend (the C++ kernels on CPU tensors);
- ``baseline``: the PyTorch line a user would otherwise write (named in the table);
- ``foreach_mul``: ``torch._foreach_mul(ts, 2.0)`` on the op's input tensors: a PyTorch call of
  the same shape of work whose cost is almost all per-call overhead at the tiny size (the yardstick
  of item 1: every public op within 2x of it there);
- ``roofline``: at the largest size, the op's bytes at the better of the add / copy bandwidth
  measured in the same run (``nkbench.bandwidth``): the fraction ``roofline / ours`` is item 2's
  85% target for streaming ops.

Weights are 0-d device tensors for ours (never read on the host) and Python floats for the
baselines (what a user writes after ``.item()``: the baseline's most favourable form).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import nkbench  # benchmarks/ (the script's folder)
import torch

import nats_kernels as nk

# (label, elements per tensor, tensors in a list). "tiny" is a small GAN's parameter list.
SIZES = (("tiny", 64, 4), ("64K", 16_384, 4), ("1M", 65_536, 16), ("8M", 524_288, 16))
QUICK = (("tiny", 64, 4), ("4K", 1024, 4))
ETA, W = 0.05, 0.5


def _per_call(fns: dict, budget_s: float, reps: int = 7) -> dict:
    """Per-call seconds of each of ``fns`` (name -> zero-argument callable), interleaved."""
    for f in fns.values():  # warm-up, and the loop length that takes ~budget_s / reps
        f()
    loops = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.02 or n < 3:
            f()
            n += 1
        per = (time.perf_counter() - t0) / n
        loops[name] = max(1, int(budget_s / reps / max(per, 1e-9)))
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            n = loops[name]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def _lists(numel: int, count: int, k: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(numel, generator=gen) for _ in range(count)] for _ in range(k)]


def cases(numel: int, count: int) -> list[tuple[str, str, dict, int]]:
    """(op, baseline name, {name: fn}, bytes the op moves) for one size."""
    a, b, out = _lists(numel, count, 3, seed=numel)
    wr, wf = torch.tensor(W), torch.tensor(1 - W)
    r = torch.tensor(1e-3)
    nbytes = numel * count * 4
    per_tensor = [(x.view(-1), y.view(-1)) for x, y in zip(a, b)]

    def dots3():  # multi_dot's line: three torch.dot per tensor, summed on device
        return torch.stack([torch.stack((x.dot(x), y.dot(y), x.dot(y))) for x, y in per_tensor]
                           ).sum(0)

    def ratio():  # iga_ratio's line: two torch.dot per tensor, divided on device
        num = torch.stack([x.dot(y) for x, y in per_tensor]).sum()
        return num / (torch.stack([x.dot(x) for x, _ in per_tensor]).sum() + 1e-12)

    rows = [
        ("multi_dot", "3 torch.dot per tensor, stack, sum",
         {"ours": lambda: nk.multi_dot(a, b), "baseline": dots3}, 2 * nbytes),
        ("iga_ratio", "2 torch.dot per tensor, stack, sum, divide",
         {"ours": lambda: nk.iga_ratio(a, b), "baseline": ratio}, 2 * nbytes),
        ("aw_combine_", "torch._foreach_mul_ + torch._foreach_add_(alpha=w_f)",
         {"ours": lambda: nk.aw_combine_(out, out, b, wr, wf),
          "baseline": lambda: (torch._foreach_mul_(out, W),
                               torch._foreach_add_(out, b, alpha=1 - W))}, 3 * nbytes),
        ("iga_correction_", "torch._foreach_add_(g, gf, alpha=-r)",
         {"ours": lambda: nk.iga_correction_(out, b, r),
          "baseline": lambda: torch._foreach_add_(out, b, alpha=-1e-3)}, 3 * nbytes),
    ]
    for _, _, fns, _ in rows:
        fns["foreach_mul"] = lambda: torch._foreach_mul(a, 2.0)
    # One sample tensor (B, d) of the same size for the CFG ops.
    x = torch.randn(numel * count // 64, 64)
    g = torch.randn_like(x)
    s = torch.rand(x.shape[0])
    s_col = s.view(-1, 1)
    w = torch.tensor(W)
    rows += [
        ("cfg_step_", "x.add_(g, alpha=eta*w)",
         {"ours": lambda: nk.cfg_step_(x, g, w, eta=ETA),
          "baseline": lambda: x.add_(g, alpha=ETA * W),
          "foreach_mul": lambda: torch._foreach_mul([x, g], 2.0)}, 3 * nbytes),
        ("cfg_step_ (scale)", "x.add_(g * s[:, None], alpha=eta*w)",
         {"ours": lambda: nk.cfg_step_(x, g, w, eta=ETA, scale=s),
          "baseline": lambda: x.add_(g * s_col, alpha=ETA * W),
          "foreach_mul": lambda: torch._foreach_mul([x, g], 2.0)}, 3 * nbytes),
    ]
    return rows


def tiny_only_cases() -> list[tuple[str, str, dict, int]]:
    """Ops whose inputs are small whatever the model: the aw rule and small medians."""
    gen = torch.Generator().manual_seed(0)
    dots = torch.tensor([1.0, 2.0, 0.5])
    rl, fl = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    pts = torch.randn(64, 2, generator=gen)
    M = 15
    x0 = torch.randn(64, 2, generator=gen)
    grads = torch.randn(M, 64, 2, generator=gen)
    weights = torch.rand(M, generator=gen)
    wl = weights.tolist()

    def official():  # the official CFG update, one line per step (x.data += eta * w * g)
        x = x0.clone()
        for m in range(M):
            x.add_(grads[m], alpha=ETA * wl[m])
        return x

    return [
        ("aw_weights", "torch._foreach_mul on (dots, real, fake)",
         {"ours": lambda: nk.aw_weights(dots, rl, fl),
          "foreach_mul": lambda: torch._foreach_mul([dots, rl, fl], 2.0)}, 0),
        ("cfg_accumulate (M=15)", "clone + 15 x.add_(g_m, alpha=eta*w_m)",
         {"ours": lambda: nk.cfg_accumulate(x0, grads, weights, eta=ETA),
          "baseline": official,
          "foreach_mul": lambda: torch._foreach_mul([x0, grads], 2.0)}, 0),
        ("median_pairwise_distance", "torch.pdist(x).median()",
         {"ours": lambda: nk.median_pairwise_distance(pts),
          "baseline": lambda: torch.pdist(pts).median(),
          "foreach_mul": lambda: torch._foreach_mul([pts], 2.0)}, 0),
    ]


def run(quick: bool) -> list[dict]:
    budget = 0.05 if quick else 0.6
    rows = []
    for label, numel, count in (QUICK if quick else SIZES):
        for op, base, fns, nbytes in cases(numel, count):
            rows.append(_row(op, label, base, _per_call(fns, budget), nbytes,
                             roof=(label == "8M")))
    for op, base, fns, nbytes in tiny_only_cases():
        rows.append(_row(op, "tiny", base, _per_call(fns, budget), nbytes, roof=False))
    return rows


def _row(op, label, base, t, nbytes, roof) -> dict:
    row = {"op": op, "size": label, "baseline": base if "baseline" in t else None,
           "ours_s": t["ours"], "baseline_s": t.get("baseline"),
           "foreach_mul_s": t.get("foreach_mul")}
    if roof:
        bw = nkbench.bandwidth(nbytes)
        row["roofline_s"] = nbytes / (bw["bw_GBps"] * 1e9)
        row["bw_GBps"] = bw["bw_GBps"]
    return row


def _us(s):
    return "" if s is None else f"{s * 1e6:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| op | size | ours µs | baseline µs | baseline / ours | foreach_mul µs | "
             "ours / foreach_mul | % of roofline | baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "" if r["baseline_s"] is None else f"{r['baseline_s'] / r['ours_s']:.2f}"
        fm = "" if r["foreach_mul_s"] is None else f"{r['ours_s'] / r['foreach_mul_s']:.2f}"
        roof = f"{100 * r['roofline_s'] / r['ours_s']:.0f}%" if "roofline_s" in r else ""
        lines.append(f"| {r['op']} | {r['size']} | {_us(r['ours_s'])} | {_us(r['baseline_s'])} "
                     f"| {speed} | {_us(r['foreach_mul_s'])} | {fm} | {roof} | "
                     f"{r['baseline'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, short timings (smoke test)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", type=str)
    p.add_argument("--md", type=str)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(a.quick)
    md = table(rows)
    print(md)
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{nkbench.cpu_model()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "backends": {op: nk._dispatch.backend_name(op, "cpu")
                         for op in nk._dispatch.KERNEL_OPS},
            "command": "python benchmarks/overhead.py " + " ".join(argv or sys.argv[1:])}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"# Per-call cost of the public ops ({meta['date']}, {meta['machine']}, "
                    f"torch {meta['torch']}, {meta['threads']} threads)\n\n"
                    f"`{meta['command']}`\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
