"""What the distributed schemes cost: time and all-reduce volume of an aw / BRC step against the
plain DDP step, on 1, 2, 4 ... processes.

    python benchmarks/distributed.py --nproc 1 2 4 [--device cpu|cuda] [--steps 12]
        [--json FILE] [--md FILE]

Per world size W the script spawns W processes (gloo on CPU, NCCL on CUDA, one GPU per rank)
and times, on every rank, with the ranks aligned by a barrier before each step (the reported
time is the slowest rank's, median over the steps after two warm-up steps), four steps on two
model pairs, the train command's MLPs (2-D data, width 256, 64 rows per rank) and a DCGAN-32
pair (64 feature maps, 16 images per rank):

- ``D plain``: ``(L_r + L_f).backward()`` through the DDP-wrapped D (DDP's bucketed all-reduce);
- ``D aw``: ``AWLoss(D).backward(...)`` (two backward passes, then the averaged g_r and g_f);
- ``G plain``: ``F.backward()`` through DDP G and D (DDP reduces both modules' gradients, as a
  trainer that does not freeze D during the generator step does);
- ``G brc``: ``BRC(G, D).backward(F, f)`` (f needs one more D forward on real data).

All-reduce volume: DDP's is the bytes of the gradients it reduces (the modules' trainable
parameters that get a gradient), counted from the parameters; ours is counted by wrapping
``torch.distributed.all_reduce`` (every collective the schemes issue goes through it). ``floor``
is one bare all-reduce of D's gradient bytes in one flat buffer, measured in the same run.
The inherent extra work of a scheme, for reading the ratios: aw makes two backward passes through
D instead of one; BRC two backward passes through D and G instead of one, plus a forward of D on
the real batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import nkbench  # benchmarks/ (the script's folder)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def mlp_pair():
    def mlp(d_in, d_out, width=256):
        return nn.Sequential(nn.Linear(d_in, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                             nn.LeakyReLU(0.2), nn.Linear(width, d_out))
    return mlp(2, 2), mlp(2, 1), (lambda n, g: torch.randn(n, 2, generator=g)), 2, 64


def dcgan_pair(nf=64, nz=100):
    G = nn.Sequential(
        nn.ConvTranspose2d(nz, nf * 4, 4, 1, 0), nn.BatchNorm2d(nf * 4), nn.ReLU(),
        nn.ConvTranspose2d(nf * 4, nf * 2, 4, 2, 1), nn.BatchNorm2d(nf * 2), nn.ReLU(),
        nn.ConvTranspose2d(nf * 2, nf, 4, 2, 1), nn.BatchNorm2d(nf), nn.ReLU(),
        nn.ConvTranspose2d(nf, 3, 4, 2, 1), nn.Tanh())
    D = nn.Sequential(
        nn.Conv2d(3, nf, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(nf, nf * 2, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(nf * 2, nf * 4, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(nf * 4, 1, 4, 1, 0), nn.Flatten())
    return G, D, (lambda n, g: torch.randn(n, 3, 32, 32, generator=g)), (nz, 1, 1), 16


MODELS = {"train MLP": mlp_pair, "DCGAN-32": dcgan_pair}


def grad_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


class Counter:
    """Wraps torch.distributed.all_reduce to count the bytes the schemes send."""

    def __init__(self):
        self.bytes = self.calls = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._orig(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def timed(fn, steps, device):
    times = []
    for _ in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    mine = torch.tensor(statistics.median(times[2:]), dtype=torch.float64)
    if device.type == "cuda":
        mine = mine.to(device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the slowest rank decides
    return float(mine)


def bench_pair(name, make, world, rank, device, ids, steps):
    from nats_kernels import schemes

    rows = []
    torch.manual_seed(0)
    G, D, real_of, z_shape, batch = make()
    G, D = DDP(G.to(device), device_ids=ids), DDP(D.to(device), device_ids=ids)
    g = torch.Generator().manual_seed(1000 + rank)
    real = real_of(batch, g).to(device)
    z_shape = z_shape if isinstance(z_shape, tuple) else (z_shape,)
    z = torch.randn(batch, *z_shape, generator=g).to(device)
    aw, brc = schemes.AWLoss(D), schemes.BRC(G, D)

    def d_losses():
        fake = G(z).detach()
        rl, fl = D(real), D(fake)
        return F.softplus(-rl).mean(), F.softplus(fl).mean(), rl, fl

    def d_plain():
        lr, lf, _, _ = d_losses()
        (lr + lf).backward()

    def d_aw():
        aw.backward(*d_losses())

    def g_losses():
        fake_logits = D(G(z))
        return F.softplus(-fake_logits).mean(), fake_logits

    def g_plain():
        g_losses()[0].backward()

    def g_brc():
        F_loss, fl = g_losses()
        brc.backward(F_loss, F.softplus(-D(real)).mean() + F.softplus(fl).mean())

    gb, db = grad_bytes(G), grad_bytes(D)
    flat = torch.zeros(db // 4, device=device)
    floor = timed(lambda: dist.all_reduce(flat), steps, device) if world > 1 else 0.0
    for step, fn, ddp_bytes in (("D plain", d_plain, db), ("D aw", d_aw, None),
                                ("G plain", g_plain, gb + db), ("G brc", g_brc, None)):
        for p in [*G.parameters(), *D.parameters()]:
            p.grad = None
        with Counter() as c:
            fn()  # counted once, outside the timing
        calls = c.calls
        sent = ddp_bytes if ddp_bytes is not None else c.bytes
        seconds = timed(fn, steps, device)
        rows.append(dict(world=world, model=name, step=step, ms=seconds * 1e3,
                         allreduce_bytes=sent if world > 1 else 0,
                         our_allreduce_calls=calls if world > 1 else 0,
                         d_grad_bytes=db, g_grad_bytes=gb, floor_ms=floor * 1e3))
    return rows


def worker(rank, world, port, device_type, steps, outdir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    ids = [device.index] if device_type == "cuda" else None
    rows = []
    for name, make in MODELS.items():
        rows += bench_pair(name, make, world, rank, device, ids, steps)
    if rank == 0:
        with open(os.path.join(outdir, "rows.json"), "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, device_type, steps, timeout):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(worker, args=(world, free_port(), device_type, steps, outdir),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"world {world} still running after {timeout} s")
        with open(os.path.join(outdir, "rows.json")) as f:
            return json.load(f)


def markdown(rows, meta) -> str:
    out = [f"Distributed scheme steps, {meta['device']} ({meta['command']}); torch "
           f"{meta['torch']}, {meta['date']}.", "",
           "| procs | model | step | ms / step | vs plain | all-reduce MB / step | "
           "bare all-reduce of D's grads, ms |",
           "|---|---|---|---|---|---|---|"]
    plain = {(r["world"], r["model"], r["step"].split()[0]): r["ms"] for r in rows
             if r["step"].endswith("plain")}
    for r in rows:
        base = plain[(r["world"], r["model"], r["step"].split()[0])]
        out.append(f"| {r['world']} | {r['model']} | {r['step']} | {r['ms']:.2f} | "
                   f"{r['ms'] / base:.2f}x | {r['allreduce_bytes'] / 2**20:.2f} | "
                   f"{r['floor_ms']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", help="write the rows (and the machine) here")
    p.add_argument("--md", help="write the markdown table here")
    args = p.parse_args(argv)
    for name in set(MODELS) - set(args.models):
        del MODELS[name]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("distributed.py: --device cuda but no GPU", file=sys.stderr)
            return 3
        too_many = [w for w in args.nproc if w > torch.cuda.device_count()]
        if too_many:
            print(f"distributed.py: {too_many} processes but {torch.cuda.device_count()} GPU(s); "
                  f"NCCL needs one GPU per rank", file=sys.stderr)
            return 2
    rows = []
    for world in args.nproc:
        rows += run_world(world, args.device, args.steps, args.timeout)
    device = (torch.cuda.get_device_name(0) if args.device == "cuda"
              else f"{nkbench.cpu_model()}, {os.cpu_count()} CPUs")
    meta = dict(device=device, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                command="python benchmarks/distributed.py " + " ".join(sys.argv[1:]))
    table = markdown(rows, meta)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
