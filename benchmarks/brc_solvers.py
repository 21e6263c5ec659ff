"""What BRC's solvers cost per generator step: time and peak memory of ``"iga"`` (eq. 9),
``"cg"`` and ``"neumann"`` (design §5.4) against the plain generator step, the analogue of the
BRC paper's Table 3 (which compares CG, Neumann, RHG, BDA and IGA on 2-D and 3-D mixtures).

    python benchmarks/brc_solvers.py [--iters 10] [--steps 20] [--device cpu|cuda]
        [--json FILE] [--md FILE]

Models: the train command's networks (design §6.3: 3 linear layers of width 256 with
LeakyReLU(0.2), z_dim 2, batch 512) on ``ring8-brc`` (2-D) and ``cube27-brc`` (3-D), vanilla
loss. Each step: a fresh fake batch, the generator loss F and the discriminator loss f on the
same fake batch, then

- ``plain``: ``F.backward()`` (what a trainer without BRC runs);
- ``iga``: ``BRC(G, D).backward(F, f)`` (two backward passes through D and G, the fused ratio and
  correction);
- ``cg`` / ``neumann``: ``BRC(G, D, solver=..., iters=K)`` (a backward of F, one of f with
  ``create_graph=True``, K Hessian-vector products through D, one double backward into G).

Reported per step (median over ``--steps`` timed steps after two warm-up steps): seconds, the
ratio to ``plain``, and the peak memory the step added (``nkbench.with_peak_memory``: resident
pages on the CPU, the caching allocator's peak on a GPU), and the solve's ``last_residual``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import nkbench  # benchmarks/ (the script's folder)
import torch
import torch.nn.functional as F

from nats_kernels.schemes import BRC
from nats_kernels.train import get_dataset
from nats_kernels.train.runner import mlp

DATASETS = ("ring8-brc", "cube27-brc")
BATCH, WIDTH, Z_DIM = 512, 256, 2


def _step(kind: str, G, D, brc, real, z):
    fake = G(z)
    fake_logits = D(fake)
    F_loss = F.softplus(-fake_logits).mean()
    for p in G.parameters():
        p.grad = None
    if kind == "plain":
        F_loss.backward()
        return None
    f = F.softplus(-D(real)).mean() + F.softplus(fake_logits).mean()
    brc.backward(F_loss, f)
    return brc.last_residual


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(dataset: str, kind: str, iters: int, steps: int, device) -> dict:
    mix = get_dataset(dataset)
    torch.manual_seed(0)
    G = mlp(Z_DIM, mix.dim, WIDTH).to(device)
    D = mlp(mix.dim, 1, WIDTH).to(device)
    brc = None if kind == "plain" else BRC(G, D, solver=kind, iters=iters) if kind != "iga" \
        else BRC(G, D)
    gen = torch.Generator(device=device).manual_seed(1)
    real = mix.sample(BATCH, gen, device)
    z = torch.randn(BATCH, Z_DIM, generator=gen, device=device)
    times = []
    for i in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        residual = _step(kind, G, D, brc, real, z)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    _, peak = nkbench.with_peak_memory(lambda: _step(kind, G, D, brc, real, z))
    return {"dataset": dataset, "kind": kind, "iters": iters if kind in ("cg", "neumann") else None,
            "seconds": statistics.median(times), "peak_extra_bytes": peak,
            "residual": None if residual is None else float(residual)}


def table(rows: list[dict]) -> str:
    lines = ["| dataset | step | s/step | x plain | peak extra MiB | residual |",
             "|---|---|---|---|---|---|"]
    plain = {r["dataset"]: r["seconds"] for r in rows if r["kind"] == "plain"}
    for r in rows:
        mib = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
        res = "" if r["residual"] is None else f"{r['residual']:.2e}"
        name = r["kind"] + (f" ({r['iters']})" if r["iters"] else "")
        lines.append(f"| {r['dataset']} | {name} | {r['seconds'] * 1e3:.2f} ms | "
                     f"{r['seconds'] / plain[r['dataset']]:.2f} | {mib} | {res} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=str)
    p.add_argument("--md", type=str)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("brc_solvers.py: --device cuda but no GPU", file=sys.stderr)
        return 3
    rows = [measure(ds, kind, a.iters, a.steps, device)
            for ds in DATASETS for kind in ("plain", "iga", "cg", "neumann")]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{nkbench.cpu_model()}, {os.cpu_count()} CPUs")
    md = table(rows)
    print(md)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "iters": a.iters, "steps": a.steps,
            "command": "python benchmarks/brc_solvers.py " + " ".join(argv or sys.argv[1:])}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(f"# BRC solvers per generator step ({meta['date']}, {machine}, torch "
                    f"{meta['torch']}, {meta['threads']} threads)\n\n`{meta['command']}`\n\n"
                    f"{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
