"""Run a function on several processes with a torch.distributed process group, from a test.

``run(fn, world, *args)`` spawns ``world`` processes, each joins a gloo process group on a free
localhost port and calls ``fn(rank, world, *args)``; the list of their return values (anything
``torch.save`` can write) comes back in rank order. ``fn`` must be a module-level function of an
importable module (the processes are spawned, not forked).

Nothing can hang CI: collectives time out after ``collective_timeout`` seconds inside the ranks,
and the whole run is killed after ``timeout`` seconds (TimeoutError). A rank that raises ends the
run at once: the other ranks are terminated and the test sees that rank's exception and traceback
(``torch.multiprocessing.ProcessRaisedException``).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, outdir, collective_timeout, fn, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # world processes share the machine's cores
    dist.init_process_group(
        "gloo", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run(fn, world: int, *args, timeout: float = 180.0, collective_timeout: float = 60.0) -> list:
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _worker,
            args=(world, free_port(), outdir, collective_timeout, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):  # raises ProcessRaisedException when a rank fails
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                raise TimeoutError(
                    f"{world} ranks of {fn.__name__} still running after {timeout} s"
                )
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)
                for r in range(world)]
