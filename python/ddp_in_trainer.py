"""aw-loss and BRC in a DistributedDataParallel GAN trainer (several processes).

Run: python python/ddp_in_trainer.py [--steps N] [--nproc 2]
 or: torchrun --nproc-per-node 2 python/ddp_in_trainer.py [--steps N]

A small GAN on the 8-mode ring (std 0.02) trained data-parallel: every rank draws its own share
of the global batch, the modules are wrapped in DDP, and the schemes are given the *wrapped*
modules. `AWLoss` and `BRC` take their gradients with `torch.autograd.grad`, which DDP's hooks
never see, so they average over the ranks themselves (flat all-reduces, nothing read on the
host); every rank ends each step with the same gradients, as one process on the whole batch
would. On CPU the processes use gloo, on GPUs NCCL (one GPU per rank). Lines marked
`# DDP` are the usual DDP changes, `# nats_kernels` the scheme lines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nats_kernels.schemes import BRC, AWLoss  # nats_kernels
from nats_kernels.train import get_dataset, mode_counts

RING = get_dataset("ring8")


def mlp(i: int, o: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(i, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                         nn.LeakyReLU(0.2), nn.Linear(width, o))


def train(rank: int, world: int, steps: int, global_batch: int = 256) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial models everywhere (DDP broadcasts rank 0's anyway)
    G = DDP(mlp(2, 2).to(device), device_ids=[device.index] if cuda else None)  # DDP
    D = DDP(mlp(2, 1).to(device), device_ids=[device.index] if cuda else None)  # DDP
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # DDP: each rank its own data
    batch = global_batch // world  # DDP: the global batch split over the ranks
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    aw = AWLoss(D)      # nats_kernels: the DDP wrapper; g_r and g_f are averaged over the ranks
    brc = BRC(G, D)     # nats_kernels: r from the averaged dF/dD, df/dD; G's gradient averaged
    bce = nn.functional.softplus
    for _ in range(steps):
        real = RING.sample(batch, gen, device)
        z = torch.randn(batch, 2, generator=gen, device=device)

        real_logits, fake_logits = D(real), D(G(z).detach())
        loss_real, loss_fake = bce(-real_logits).mean(), bce(fake_logits).mean()
        opt_d.zero_grad()
        aw.backward(loss_real, loss_fake, real_logits, fake_logits)  # nats_kernels
        opt_d.step()

        fake_logits = D(G(z))
        g_loss = bce(-fake_logits).mean()
        f = bce(-D(real)).mean() + bce(fake_logits).mean()  # D's loss on the same fake batch
        opt_g.zero_grad()
        brc.backward(g_loss, f)  # nats_kernels: instead of g_loss.backward()
        opt_g.step()

    # every rank holds the same models: compare a checksum of the parameters
    total = torch.stack([p.detach().double().sum() for p in G.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(sums, total)
    if rank == 0:
        with torch.no_grad():
            samples = G.module(torch.randn(2000, 2, generator=gen, device=device)).cpu()
        counts, assigned = mode_counts(samples, RING)
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"{steps} steps on {world} ranks ({'nccl' if cuda else 'gloo'}), global batch "
              f"{global_batch}: modes {int((counts > 0).sum())}/8, high quality "
              f"{100 * float(assigned.double().mean()):.1f}%, last r {float(brc.last_ratio):.3f}, "
              f"aw case {int(aw.last_case)}; generators identical on all ranks: {same}")
        if not same:
            raise SystemExit("the ranks' generators differ")


def _spawned(rank: int, world: int, port: int, steps: int) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    try:
        train(rank, world, steps)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--nproc", type=int, default=2, help="processes (without torchrun)")
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun: one rank of WORLD_SIZE
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), args.steps)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, args.steps), nprocs=args.nproc)


if __name__ == "__main__":
    main()
