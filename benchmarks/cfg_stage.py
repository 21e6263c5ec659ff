"""One annealed-CFG stage and ``generate``: ``AnnealedCFG`` against a faithful port of the
official ``cfggan.py`` loop (``riejohnson/cfg-gan-pt``: ``DDG.icfg``, ``DDG.generate``,
``DDG.approximate``), same settings, same seeds, same random-number order (issue 13, item 4).

    python benchmarks/cfg_stage.py [--quick] [--threads 1 2] [--reps 7]
        [--models toy 784] [--out benchmarks/results/cfg-stage-cpu-<date>]

writes ``<out>.json`` and ``<out>.md``. CPU only (``torch.set_num_threads`` per row).

Models (plain ``nn.Sequential`` MLPs, 3 linear layers with LeakyReLU(0.2), the train command's
networks): ``toy``: 2-D data, width 256, z_dim 2; ``784``: 784-d data, width 1024, z_dim 100
(matmul-bound). Settings of the paper / official defaults: M = 15, U = 1, N = 640, 10
approximator epochs, batch 64 (real batches and approximator batches), lr 2.5e-4, RMSprop
(alpha 0.95, eps 1e-18), eta 0.5, NATS weights ``annealed_weights(1, 0.01, 15)``, lr rule on
(decay 0.1, at most 3 reductions). ``--quick``: M = 3, N = 128, 2 epochs, 2 repetitions.

Timed, per model and thread count, in interleaved repetitions (the order of the two
implementations alternates; each continues training its own copy of the models):

- ``stage``: one ``train_stage`` (M * U discriminator steps through the snapshots, then the
  approximator) against the port's ``icfg`` + ``approximate``;
- ``generate``: N samples in batches of 64 through all M snapshots.

Reported: the median seconds of each, ``speedup = port / AnnealedCFG`` (of the medians), and the
targets of issue 13 item 4: stage speedup >= 1.3 on ``toy``, >= 1.0 on ``784``.

The port ("official"): the official loop with ``nn.Module`` networks, written its way --
``fake.data += eta * w_m * fake.grad.data`` after ``d_out.backward(ones_like(d_out))`` per
functional-gradient step, snapshots with ``requires_grad=False`` loaded by ``load_state_dict``,
the loss ``log(1 + exp(.))``, generated samples copied into a preallocated buffer, a fresh
optimizer each stage, ``float(loss)`` per approximator batch for the lr rule. Its random numbers
are lined up with ``AnnealedCFG``'s (the official code draws from the global generator and
shuffles with a ``DataLoader``; here one ``torch.Generator``, one ``randperm(N)`` per epoch
sliced into batches -- the ``DataLoader``'s per-sample collation would only make the port
slower). Before timing, both run one stage from the same state and seed and generate from it;
with the port's loss switched to ``softplus`` (``AnnealedCFG``'s; ``log(1 + exp)`` is the one
thing it changes on purpose) the results must be identical (``max_abs_diff`` is recorded; the
script fails when it is above 1e-5 relative).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import nkbench  # benchmarks/ (the script's folder)
import torch
import torch.nn.functional as F
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import AnnealedCFG

MODELS = {  # name: (data dim, width, z_dim)
    "toy": (2, 256, 2),
    "784": (784, 1024, 100),
}
TARGETS = {"toy": 1.3, "784": 1.0}
FULL = dict(M=15, U=1, N=640, x_epochs=10, batch_size=64, reps=7)
QUICK = dict(M=3, U=1, N=128, x_epochs=2, batch_size=64, reps=2)
LR, ETA = 2.5e-4, 0.5
DECAY, REDMAX = 0.1, 3


def mlp(d_in: int, d_out: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                         nn.LeakyReLU(0.2), nn.Linear(width, d_out))


def rmsprop(params, lr):
    return torch.optim.RMSprop(params, lr=lr, alpha=0.95, eps=1e-18)


# ------------------------------------------------------------------------- the official port


class OfficialCFG:
    """The official ``DDG`` loop (``icfg``, ``generate``, ``approximate``) on ``nn.Module``
    networks, random numbers from ``rng`` in ``AnnealedCFG``'s order."""

    def __init__(self, G, D, *, M, eta, weights, U, N, x_epochs, lr, batch_size, z_dim, rng,
                 loss="official"):
        self.G, self.D = G, D
        self.M, self.eta, self.U, self.N = M, eta, U, N
        self.w = [float(x) for x in weights]
        self.x_epochs, self.lr, self.bs, self.z_dim = x_epochs, lr, batch_size, z_dim
        self.rng = rng
        self.loss = loss
        self.snaps = [copy.deepcopy(D) for _ in range(M)]
        for s in self.snaps:  # the official d_params_list: requires_grad=False
            s.requires_grad_(False)
        self.opt_d = rmsprop(D.parameters(), lr)
        self.it = None
        # The training device (benchmarks/bench_cfg_generate.py runs the port on a GPU): z is
        # drawn there from rng (a generator of that device), samples are kept on the host as
        # the official code keeps them; on the CPU every .to() below is a no-op.
        self.device = next(G.parameters()).device

    def next_real(self, data):  # the official get_next
        if self.it is None:
            self.it = iter(data)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(data)
            return next(self.it)

    def generate(self, num_gen, t=-1, do_return_z=False, batch_size=-1):
        if t < 0:
            t = self.M
        if batch_size <= 0:
            batch_size = num_gen
        fakes = zs = None
        done = 0
        while done < num_gen:
            num = min(batch_size, num_gen - done)
            with torch.no_grad():
                z = torch.randn(num, self.z_dim, generator=self.rng, device=self.device)
                self.G.eval()  # is_train=False
                fake = self.G(z)
                self.G.train()
            for t0 in range(t):
                fake = fake.detach()
                fake.requires_grad = True
                d_out = self.snaps[t0](fake)
                d_out.backward(torch.ones_like(d_out))
                fake.data += self.eta * self.w[t0] * fake.grad.data
            if fakes is None:
                fakes = torch.empty((num_gen, *fake.shape[1:]), dtype=fake.dtype)
            fakes[done:done + num] = fake.to(torch.device("cpu"))
            if do_return_z:
                if zs is None:
                    zs = torch.empty((num_gen, *z.shape[1:]), dtype=z.dtype)
                zs[done:done + num] = z.to(torch.device("cpu"))
            done += num
        fakes.detach_()
        return (fakes, zs) if do_return_z else fakes

    def d_loss(self, d_out_real, d_out_fake):
        if self.loss == "softplus":
            return (F.softplus(-d_out_real).mean() + F.softplus(d_out_fake).mean())
        return (torch.log(1 + torch.exp(-d_out_real))
                + torch.log(1 + torch.exp(d_out_fake))).mean()

    def icfg(self, data):
        for t in range(self.M):
            sum_real = sum_fake = count = 0
            for _ in range(self.U):
                real = self.next_real(data)
                num = real.shape[0]
                fake = self.generate(num, t=t)
                d_out_real, d_out_fake = self.D(real), self.D(fake.to(self.device))
                loss = self.d_loss(d_out_real, d_out_fake)
                loss.backward()
                self.opt_d.step()
                self.opt_d.zero_grad()
                with torch.no_grad():
                    sum_real += float(d_out_real.sum())
                    sum_fake += float(d_out_fake.sum())
                    count += num
            self.snaps[t].load_state_dict(self.D.state_dict())  # store_d_params
        return (sum_real - sum_fake) / count

    def approximate(self):
        targets, zs = self.generate(self.N, do_return_z=True, batch_size=self.bs)
        opt = rmsprop(self.G.parameters(), self.lr)
        last, redcount, lr = 99999999.0, 0, self.lr
        for _ in range(self.x_epochs):
            perm = torch.randperm(self.N, generator=self.rng,  # DataLoader(shuffle=True)
                                  device=self.device).to(torch.device("cpu"))
            losses = []
            for start in range(0, self.N, self.bs):
                idx = perm[start:start + self.bs]
                z, target = zs[idx].to(self.device), targets[idx].to(self.device)
                fake = self.G(z)
                loss = ((fake - target) ** 2).sum() / 2 / fake.size(0)  # g_loss_dflt
                losses.append(loss.item())  # float(loss)
                loss.backward()
                opt.step()
                opt.zero_grad()
            mean = sum(losses) / len(losses)
            if mean > last and redcount < REDMAX:  # reduce_lr_
                lr *= DECAY
                for g in opt.param_groups:
                    g["lr"] = lr
                redcount += 1
            if mean != mean:
                raise RuntimeError("NaN")
            last = mean

    def stage(self, data):
        self.icfg(data)
        self.approximate()


# ---------------------------------------------------------------------------------- setups


def make_pair(model: str, s: dict, seed: int = 0, port_loss: str = "official"):
    dim, width, z_dim = MODELS[model]
    torch.manual_seed(seed)
    G, D = mlp(z_dim, dim, width), mlp(dim, 1, width)
    w = nk.annealed_weights(1.0, 0.01, s["M"])
    cfg = AnnealedCFG(copy.deepcopy(G), copy.deepcopy(D), M=s["M"], eta=ETA, weights=w,
                      U=s["U"], N=s["N"], x_epochs=s["x_epochs"], lr=LR,
                      batch_size=s["batch_size"], z_dim=z_dim, approx_decay=DECAY,
                      approx_redmax=REDMAX, rng=torch.Generator().manual_seed(seed + 1))
    port = OfficialCFG(G, D, M=s["M"], eta=ETA, weights=w.tolist(), U=s["U"], N=s["N"],
                       x_epochs=s["x_epochs"], lr=LR, batch_size=s["batch_size"], z_dim=z_dim,
                       rng=torch.Generator().manual_seed(seed + 1), loss=port_loss)
    return cfg, port


def real_data(model: str, s: dict, seed: int = 2) -> list[torch.Tensor]:
    """M * U real batches: a ring of 8 Gaussians (toy), values in [-1, 1] (784)."""
    dim = MODELS[model][0]
    gen = torch.Generator().manual_seed(seed)
    count, b = s["M"] * s["U"], s["batch_size"]
    if dim == 2:
        out = []
        for _ in range(count):
            k = torch.randint(0, 8, (b,), generator=gen).double() * (2 * torch.pi / 8)
            centre = torch.stack([k.cos(), k.sin()], 1) * 2
            out.append((centre + 0.02 * torch.randn(b, 2, generator=gen, dtype=torch.float64))
                       .float())
        return out
    return [torch.rand(b, dim, generator=gen) * 2 - 1 for _ in range(count)]


def _max_rel_diff(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def agreement(model: str, s: dict) -> dict:
    """One stage and a generate from the same state and seed, the port on softplus."""
    cfg, port = make_pair(model, s, port_loss="softplus")
    data = real_data(model, s)
    cfg.train_stage(data)
    port.stage(data)
    diffs = {}
    for name, a, b in (("G", cfg.generator, port.G), ("D", cfg.discriminator, port.D),
                       *((f"snapshot{m}", x, y)
                         for m, (x, y) in enumerate(zip(cfg.snapshots, port.snaps)))):
        diffs[name] = max(_max_rel_diff(x, y) for x, y in zip(a.state_dict().values(),
                                                               b.state_dict().values()))
    cfg.rng.manual_seed(5)
    port.rng.manual_seed(5)
    x = cfg.generate(s["N"], batch_size=s["batch_size"])
    y = port.generate(s["N"], batch_size=s["batch_size"])
    diffs["generate"] = _max_rel_diff(x, y)
    worst = max(diffs.values())
    identical = worst == 0.0
    if worst > 1e-5:
        raise AssertionError(f"{model}: AnnealedCFG and the port disagree: {diffs}")
    return {"bit_identical": identical, "max_rel_diff": worst}


def time_model(model: str, s: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg, port = make_pair(model, s)
    data = real_data(model, s)
    n, bs = s["N"], s["batch_size"]
    runs = {
        "stage": (lambda: cfg.train_stage(data), lambda: port.stage(data)),
        "generate": (lambda: cfg.generate(n, batch_size=bs),
                     lambda: port.generate(n, batch_size=bs)),
    }
    for ours, theirs in runs.values():  # warm-up (allocator, first-call costs)
        ours()
        theirs()
    out = {}
    for what, (ours, theirs) in runs.items():
        t_ours, t_port = [], []
        for rep in range(s["reps"]):
            order = ((ours, t_ours), (theirs, t_port))
            for fn, times in (order if rep % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        m_ours, m_port = statistics.median(t_ours), statistics.median(t_port)
        out[what] = {"annealed_cfg_s": m_ours, "official_port_s": m_port,
                     "speedup": m_port / m_ours,
                     "paired_speedup": statistics.median(p / o for p, o in zip(t_port, t_ours)),
                     "annealed_cfg_all_s": t_ours, "official_port_all_s": t_port}
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# AnnealedCFG stage vs the official loop ({meta['date']})",
        "",
        f"- machine: {meta['machine']}",
        f"- torch {meta['torch']}, Python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- settings: {meta['settings']}",
        f"- note: {meta['note']}",
        "",
        "| model | threads | what | AnnealedCFG (s) | official port (s) | speedup | paired | "
        "target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for what in ("stage", "generate"):
            x = r[what]
            target = r["target"] if what == "stage" else None
            verdict = "" if target is None else ("pass" if x["speedup"] >= target else "FAIL")
            lines.append(
                f"| {r['model']} | {r['threads']} | {what} | {x['annealed_cfg_s']:.4f} | "
                f"{x['official_port_s']:.4f} | {x['speedup']:.2f}x | "
                f"{x['paired_speedup']:.2f}x | {'' if target is None else f'>= {target}x'} | "
                f"{verdict} |")
    lines += ["", "Agreement (one stage + generate from the same state and seed, the port's "
              "loss as softplus):", ""]
    for model, a in meta["agreement"].items():
        lines.append(f"- {model}: bit-identical {a['bit_identical']}, max relative difference "
                     f"{a['max_rel_diff']:.3g}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description="One annealed-CFG stage and generate: AnnealedCFG against a port of the "
                    "official loop")
    p.add_argument("--quick", action="store_true", help="M=3, N=128, 2 epochs, 2 repetitions")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--reps", type=int, help="timed repetitions (default 7, --quick 2)")
    p.add_argument("--note", default=os.environ.get("NK_BENCH_NOTE", ""),
                   help="free text for the report (e.g. 'machine shared')")
    p.add_argument("--out", help="output stem: writes <out>.json and <out>.md (default "
                                 "benchmarks/results/cfg-stage-cpu-<date>)")
    a = p.parse_args(argv)
    s = dict(QUICK if a.quick else FULL)
    if a.reps is not None:
        s["reps"] = a.reps
    date = datetime.date.today().isoformat()
    stem = Path(a.out or Path(__file__).resolve().parent / "results" / f"cfg-stage-cpu-{date}")
    stem.parent.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    agree = {m: agreement(m, s) for m in a.models}
    rows = []
    for model in a.models:
        for threads in a.threads:
            r = {"model": model, "threads": threads, "target": TARGETS[model],
                 **time_model(model, s, threads)}
            r["stage_target_met"] = r["stage"]["speedup"] >= r["target"]
            rows.append(r)
            print(f"{model:>4} threads={threads}: stage {r['stage']['speedup']:.2f}x "
                  f"(target {r['target']}), generate {r['generate']['speedup']:.2f}x",
                  flush=True)
    meta = {
        "date": date,
        "machine": f"{nkbench.cpu_model()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/cfg_stage.py " + " ".join(argv),
        "quick": a.quick,
        "settings": {**s, "lr": LR, "eta": ETA, "weights": "annealed_weights(1, 0.01, M)",
                     "approx_decay": DECAY, "approx_redmax": REDMAX,
                     "models": {m: dict(zip(("dim", "width", "z_dim"), MODELS[m]))
                                for m in a.models}},
        "note": a.note,
        "agreement": agree,
        "targets": {m: TARGETS[m] for m in a.models},
        "all_targets_met": all(r["stage_target_met"] for r in rows),
    }
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(f"{stem}.md").write_text(markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
