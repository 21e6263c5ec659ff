"""``nats-kernels train``: GANs on the embedded synthetic benchmarks (no download).

With no arguments it compares cts, nats, cts+aw and cts+brc on ring8 with one seed, prints a
table and writes ``results.json`` and ``samples.png`` into ``--out``.

Data-parallel: ``--nproc N`` trains the same runs with N processes (gloo on cpu, nccl on cuda,
one GPU each), the global ``--batch`` split over them; this process checks the options, spawns
the N ranks and waits; rank 0 shows the progress, prints the table and writes the files. Under
torchrun (``torchrun --nproc-per-node N -m nats_kernels train ...``: WORLD_SIZE > 1 in the
environment) each process is one rank of the group torchrun set up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .data import BENCHMARKS
from .losses import LOSSES
from .runner import RunConfig, check_config, run, unused_settings

DEFAULT_SCHEMES = ("cts", "nats", "cts+aw", "cts+brc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--dataset", nargs="+", default=[d.dataset], choices=sorted(BENCHMARKS),
                   help="benchmarks to train on: the Gaussian mixtures, or digits (scikit-learn's "
                        "bundled 8x8 handwritten digits, conv networks; default: %(default)s)")
    p.add_argument("--loss", nargs="+", default=[d.loss], choices=sorted(LOSSES),
                   help="GAN losses (default: %(default)s)")
    p.add_argument("--scheme", nargs="+", default=list(DEFAULT_SCHEMES),
                   help="schemes: cts | nts | nats | annealed-cfg, each optionally +aw and/or "
                        "+brc (default: %(default)s)")
    p.add_argument("--seed", nargs="+", type=int, default=[d.seed], help="seeds (default: 0)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="discriminator steps per run (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("nats-kernels-train"),
                   help="folder for results.json and samples.png (default: %(default)s)")
    p.add_argument("--n-d", type=int, default=d.n_d, help="nesting number of nts/nats")
    p.add_argument("--nats-weight", choices=["output", "loss"], default=d.nats_weight,
                   help="where nats's annealed weight acts: on D's output inside the generator "
                        "loss, L_G(w D(G(z))) (the NATS paper), or on the loss, w L_G "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr-d", type=float, default=d.lr_d,
                   help="discriminator learning rate (default: %(default)s; the BRC paper: 1e-4)")
    p.add_argument("--lr-g", type=float, default=d.lr_g,
                   help="generator learning rate (default: %(default)s)")
    p.add_argument("--betas", type=float, nargs=2, default=list(d.betas), metavar=("B1", "B2"),
                   help="Adam's betas for both networks (default: %(default)s; DCGAN-style "
                        "networks such as digits': 0.5 0.999)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="generated (and real) points the metrics use (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="also evaluate every N D steps: a curve per run in results.json "
                        "(default: %(default)s, none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes per run (gloo on cpu, nccl on cuda with a GPU "
                        "each): the global --batch is split over them, rank 0 writes the results "
                        "(default: %(default)s; under torchrun: 1 or WORLD_SIZE)")


def _table(runs: list[dict]) -> str:
    """The printed table; digits runs add the classifier-feature FID ("feat fid"; design §6.4:
    their modes are classes covered, hq % the confidently classified images, fid in pixels)."""
    feat = any("fid_features" in r for r in runs)
    head = ("dataset", "loss", "scheme", "seed", "modes", "hq %", "js", "fid",
            *(("feat fid",) if feat else ()), "s/step")
    rows = [(r["dataset"], r["loss"], r["scheme"], str(r["seed"]), f"{r['modes']}/{r['n_modes']}",
             f"{r['hq']:.1f}", f"{r['js']:.3f}", f"{r['fid']:.4f}",
             *((f"{r['fid_features']:.3f}" if "fid_features" in r else "-",) if feat else ()),
             f"{r['seconds_per_step']:.4f}")
            for r in runs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _reading(r: dict, cts: dict) -> str:
    """One line: what a scheme's run did next to the cts run of the same benchmark, loss and
    seed, in numbers, with the scheme's own diagnostic (design §2, §4, §5)."""
    n = r["n_modes"]
    if r["modes"] != cts["modes"]:
        verdict = (f"{'more' if r['modes'] > cts['modes'] else 'fewer'} modes than cts "
                   f"({r['modes']}/{n} vs {cts['modes']}/{n})")
    else:
        ratio = r["fid"] / cts["fid"] if cts["fid"] else float("inf")
        verdict = (f"as many modes as cts ({r['modes']}/{n}), FID x{ratio:.2f} of cts's, "
                   f"hq {r['hq']:.1f}% vs {cts['hq']:.1f}%")
    why = []
    base = r["scheme"].split("+")[0]
    if base in ("nts", "nats"):
        k = r["n_d"]
        why.append(f"N_d = {k}: {k * (k + 1) // 2} G steps per {k} D steps"
                   + (", the annealed weight on " + ("D's output" if r["nats_weight"] == "output"
                                                   else "the loss") if base == "nats" else ""))
    if base == "annealed-cfg":
        why.append("M = 15 functional-gradient steps per stage, generator fitted by regression")
    if "aw_case_counts" in r:
        counts = r["aw_case_counts"]
        total = sum(counts) or 1
        top = max(range(5), key=lambda i: counts[i])
        why.append(f"aw rule case {top + 1} (design §4) in {100 * counts[top] / total:.0f}% "
                   f"of D steps")
    if "brc_mean_r" in r:
        mean_r = r["brc_mean_r"]
        if r["loss"] == "vanilla" and mean_r < 0:  # non-saturating: weights 1 + (r - 1) s_i
            effect = (f": eq. 9 pushes every fake with D's sigmoid above "
                      f"{1 / (1 - mean_r):.2f} the wrong way (design §5.2)")
        elif r["loss"] == "wgan-gp" and mean_r < -1:  # the gain 1 + r
            effect = ": the gain 1 + r < 0 reverses the generator's gradient (design §5.2)"
        else:
            effect = ""
        why.append(f"BRC mean r {mean_r:.2f}{effect}")
    return f"{r['scheme']}: {verdict}" + (f"; {'; '.join(why)}" if why else "")


def _readings(runs: list[dict]) -> list[str]:
    """A reading for every run that has a cts run of the same dataset, loss and seed beside it
    (the default invocation: nats, cts+aw and cts+brc next to cts)."""
    lines = []
    for r in runs:
        if r["scheme"] == "cts":
            continue
        cts = next((c for c in runs if c["scheme"] == "cts" and all(
            c[k] == r[k] for k in ("dataset", "loss", "seed", "steps", "batch", "lr_d",
                                   "lr_g"))), None)
        if cts is not None:
            lines.append(f"  {r['dataset']} {r['loss']} seed {r['seed']}, " + _reading(r, cts))
    return lines


#: the RunConfig settings this command sets, by the option that sets them (for error messages)
OPTIONS = {"dataset": "--dataset", "loss": "--loss", "scheme": "--scheme", "seed": "--seed",
           "steps": "--steps", "device": "--device", "n_d": "--n-d", "batch": "--batch",
           "lr_d": "--lr-d", "lr_g": "--lr-g", "eval_samples": "--eval-samples",
           "world": "--nproc", "nats_weight": "--nats-weight",
           "eval_every": "--eval-every", "betas": "--betas"}


def _option_error(message: str) -> str:
    """check_config's 'n_d: expected >= 1, got 0' -> '--n-d: expected >= 1, got 0'."""
    name, sep, rest = message.partition(":")
    return f"{OPTIONS[name]}:{rest}" if sep and name in OPTIONS else message


def check_out(out: Path) -> None:
    """Creates ``out`` (and its parents) and checks that files can be written there, or raises
    a ``ValueError`` naming --out: before any training, so that no run is lost to it."""
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} exists and is not a folder")
        for name in ("results.json", "samples.png"):
            if (out / name).is_dir():
                raise ValueError(f"--out: {out / name} is a folder; this command writes a file "
                                 f"there")
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".nats-kernels-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out: cannot create or write to the folder {out} "
                         f"({e.strerror or e})") from None


def _runs(n: int) -> str:
    return f"{n} finished run{'' if n == 1 else 's'}"


def _label(i: int, configs: list) -> str:
    cfg = configs[i - 1]
    return f"[{i}/{len(configs)}] {cfg.dataset} {cfg.loss} {cfg.scheme} seed {cfg.seed}"


#: How long a collective waits for the other ranks before it fails: a rank that stops without
#: its process ending cannot hang the command for longer.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def _torchrun_world() -> int:
    """torchrun's WORLD_SIZE (a ValueError naming --nproc when it is not a number); 1 without."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--nproc: the environment's WORLD_SIZE={value!r} is not a number of "
                         f"processes") from None


def _check_nproc(nproc: int, env_world: int) -> int:
    """The number of processes to train with, or a ValueError naming --nproc."""
    if nproc < 1:
        raise ValueError(f"--nproc: expected >= 1, got {nproc}")
    if env_world > 1:
        if nproc not in (1, env_world):
            raise ValueError(f"--nproc: {nproc} given, but this process is one of the "
                             f"environment's WORLD_SIZE={env_world} (torchrun); pass --nproc 1 "
                             f"or {env_world}, or leave it out")
        return env_world
    return nproc


def _check_backend(device: str, world: int, env_world: int) -> None:
    """Can ``world`` processes train on ``device`` here? (``check_config`` has checked the
    device itself and that it is cpu or cuda.) A ValueError naming --nproc if not."""
    import torch

    try:
        import torch.distributed as dist
    except ImportError:
        dist = None
    if dist is None or not dist.is_available():
        raise ValueError(f"--nproc: {world} processes need torch.distributed, and this torch "
                         f"was built without it; use --nproc 1")
    if torch.device(device).type == "cuda":
        if not dist.is_nccl_available():
            raise ValueError(f"--nproc: {world} processes on cuda need the nccl backend, which "
                             f"this torch does not have; use --nproc 1")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if env_world > 1 else world
        count = torch.cuda.device_count()
        if local > count:
            raise ValueError(f"--nproc: {local} processes on cuda need a GPU each, and there "
                             f"{'is' if count == 1 else 'are'} {count} here")
    elif not dist.is_gloo_available():
        raise ValueError(f"--nproc: {world} processes on cpu need the gloo backend, which this "
                         f"torch does not have; use --nproc 1")


def main(args: argparse.Namespace) -> int:
    base = RunConfig(steps=args.steps, device=args.device, n_d=args.n_d, batch=args.batch,
                     eval_samples=args.eval_samples, lr_d=args.lr_d, lr_g=args.lr_g,
                     nats_weight=args.nats_weight, eval_every=args.eval_every,
                     betas=tuple(args.betas))
    configs = [replace(base, dataset=ds, loss=lo, scheme=sc, seed=se)
               for ds in args.dataset for lo in args.loss for sc in args.scheme for se in args.seed]
    nproc = getattr(args, "nproc", 1)
    env_world, rank = 1, 0
    try:
        env_world = _torchrun_world()
        if env_world > 1:
            rank = int(os.environ.get("RANK", "0"))
        world = _check_nproc(nproc, env_world)
        for cfg in configs:
            check_config(cfg, world)  # a typo, a bad number or device fails before any training
        if world > 1:
            _check_backend(args.device, world, env_world)
        if rank == 0:
            check_out(args.out)
    except ValueError as e:
        if rank == 0:  # under torchrun every rank finds the same error: one says it
            print(f"nats-kernels train: error: {_option_error(str(e))}", file=sys.stderr)
        return 2
    # A setting changed from its default that a scheme does not read: say so, not silently.
    default = RunConfig()
    for name in ("lr_d", "lr_g", "betas", "n_d", "nats_weight"):
        ignoring = [sc for sc in args.scheme if name in unused_settings(sc)]
        if rank == 0 and ignoring and getattr(base, name) != getattr(default, name):
            why = ("no nesting" if name == "n_d"
                   else "no annealed weight in its generator step" if name == "nats_weight"
                   else f"annealed-cfg trains both networks with RMSprop at lr {default.cfg_lr}")
            print(f"nats-kernels train: note: {OPTIONS[name]} is not used by "
                  f"{', '.join(ignoring)} ({why})", file=sys.stderr)
    if env_world > 1:
        return _torchrun_rank(args, configs, rank)
    if world > 1:
        return _spawn(args, configs, world)
    return _train_runs(args, configs)


class _Shared:
    """What the ranks of ``--nproc N`` share with the process that spawned them: ``stop`` (set
    on Ctrl-C: rank 0 stops after its current step, as one process would on Ctrl-C),
    ``finished`` (the runs rank 0 has written to both files) and ``current`` (each rank's run,
    1-based), for the spawning process's messages."""

    def __init__(self, world: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.finished = ctx.Value("i", 0)
        self.current = ctx.Array("i", world)


def _train_runs(args, configs, rank: int = 0, shared: _Shared | None = None) -> int:
    """Every run of ``configs``, in order. Rank 0 (the only process without ``--nproc``) shows
    the progress, writes results.json and samples.png after every run, prints the table and
    says what was kept when stopped; the other ranks only train. With ``shared`` (ranks spawned
    by ``--nproc``) rank 0 leaves the report of a failure to the spawning process, which knows
    which rank failed."""
    if rank != 0:
        for i, cfg in enumerate(configs, 1):
            if shared is not None:
                shared.current[rank] = i
            try:
                run(cfg)
            except Exception as e:
                if shared is None and hasattr(e, "add_note"):  # torchrun; Python >= 3.11
                    e.add_note(f"(rank {rank}, during {_label(i, configs)})")
                raise
        return 0

    from .plot import plot_runs, write_json

    results, figure = args.out / "results.json", args.out / "samples.png"
    saved: list[dict] = []  # the runs in results.json (with their samples, for the figure)
    drawn = 0  # how many of them the figure on disk shows

    def draw() -> None:
        # after every finished run (a draw takes about a second, a run tens of seconds)
        nonlocal drawn
        if drawn != len(saved):
            plot_runs(saved, figure)
            drawn = len(saved)
        if shared is not None:
            shared.finished.value = drawn

    def draw_what_finished() -> str:
        # when stopping early: catch up if the stop came between results.json and the figure
        try:
            draw()
        except Exception as e:  # the error being reported matters more
            return f"; {figure} could not be drawn ({type(e).__name__}: {e})"
        return ""

    def kept() -> str:
        if not saved:
            return "no run finished, nothing was written"
        return f"{_runs(len(saved))} kept in {results} and {figure}"

    def stoppable(update):
        # ranks spawned by --nproc ignore Ctrl-C: the spawning process sets shared.stop instead
        if shared is None:
            return update

        def step(n):
            if update is not None:
                update(n)
            if shared.stop.is_set():
                raise KeyboardInterrupt

        return step

    label = ""
    try:
        for i, cfg in enumerate(configs, 1):
            label = _label(i, configs)
            if shared is not None:
                shared.current[0] = i
                if shared.stop.is_set():
                    raise KeyboardInterrupt
            if args.no_progress:
                print(label, flush=True)
                record = run(cfg) if shared is None else run(cfg, progress=stoppable(None))
            else:
                from tqdm import tqdm

                with tqdm(total=cfg.steps, desc=label, unit="D-step", file=sys.stderr,
                          dynamic_ncols=True) as bar:
                    record = run(cfg, progress=stoppable(bar.update))
            # every finished run goes to disk at once, whole: a later failure cannot lose it
            write_json(results, [{k: v for k, v in r.items() if k != "samples"}
                                 for r in [*saved, record]])
            saved.append(record)
            draw()
    except KeyboardInterrupt:
        note = draw_what_finished()
        print(f"nats-kernels train: interrupted during {label}; {kept()}{note}", file=sys.stderr)
        return 130
    except BaseException:
        note = draw_what_finished()
        if shared is None:
            print(f"nats-kernels train: failed during {label} (traceback below); "
                  f"{kept()}{note}", file=sys.stderr)
        raise
    print(_table(saved))
    lines = _readings(saved)
    if lines:
        print("\nNext to cts (one seed, one budget: `nats-kernels study` repeats the papers' "
              "protocols over seeds):")
        print("\n".join(lines))
    print(f"\nwrote {results} and {figure}")
    return 0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the spawning process dies (killed, say), instead of
    training on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker(rank: int, world: int, backend: str, port: int, args, configs,
            shared: _Shared) -> None:
    """One rank of ``--nproc``: joins the group on the spawning process's store, trains."""
    import signal

    import torch
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the spawning process's business
    _die_with_parent()
    torch.set_num_threads(max(1, _cpus() // world))  # the ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    code = _train_runs(args, configs, rank, shared)
    if code:
        sys.exit(code)
    dist.destroy_process_group()


def _spawn(args, configs, world: int) -> int:
    """``--nproc N``: N ranks (torch.multiprocessing, spawned) on a process group whose store
    this process holds (127.0.0.1, a free port); waits for them. A rank that fails or dies ends
    the command at once: the others are terminated, its traceback is shown, exit code 1. Ctrl-C
    tells rank 0 to stop after its step, keep what finished and say so (exit code 130)."""
    import logging
    import signal
    import threading

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    backend = "nccl" if torch.device(args.device).type == "cuda" else "gloo"
    shared = _Shared(world)
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=COLLECTIVE_TIMEOUT,
                          wait_for_workers=False)
    # the ranks start with Ctrl-C ignored (inherited), so none can die of one while it starts
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        procs = mp.start_processes(_worker, args=(world, backend, store.port, args, configs,
                                                  shared),
                                   nprocs=world, join=False, start_method="spawn")
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)

    def kept() -> str:
        n = shared.finished.value
        if not n:
            return "no run finished, nothing was written"
        return f"{_runs(n)} kept in {args.out / 'results.json'} and {args.out / 'samples.png'}"

    def during(rank: int) -> str:
        i = shared.current[rank]
        return _label(i, configs) if i else "its start"

    spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ..."
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        while not procs.join(timeout=1.0):
            pass
    except KeyboardInterrupt:
        return _stop_on_ctrl_c(procs, shared, kept, during)
    except mp.ProcessRaisedException as e:
        index, trace = _first_error(procs.error_files, e)
        print(f"nats-kernels train: failed during {during(index)} (process {index} of "
              f"{world}; traceback below; the other processes were stopped); {kept()}\n"
              f"{trace}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as e:
        how = (f"was killed by {e.signal_name}" if e.signal_name else
               f"exited with code {e.exit_code}")
        print(f"nats-kernels train: process {e.error_index} of {world} {how} during "
              f"{during(e.error_index)} (the other processes were stopped); {kept()}",
              file=sys.stderr)
        return 1
    finally:
        spawn_log.setLevel(level)
        for path in procs.error_files:  # written by a rank that raised; read by now
            if os.path.exists(path):
                os.remove(path)
    return 0


def _first_error(error_files: list[str], e) -> tuple[int, str]:
    """(rank, traceback) of the rank that raised first. torch reports the first failed process
    it notices; when the others' collectives failed in turn (their peer gone) before it looked,
    that may be one of them: the earliest traceback file names the cause."""
    import pickle

    written = []
    for index, path in enumerate(error_files):
        try:
            written.append((os.stat(path).st_mtime_ns, index, path))
        except OSError:
            pass
    for _, index, path in sorted(written):
        try:
            with open(path, "rb") as f:
                return index, str(pickle.load(f)).rstrip()
        except Exception:  # unreadable: torch's own report below
            break
    return e.error_index, e.msg.split("terminated with the following error:\n", 1)[-1].rstrip()


def _stop_on_ctrl_c(procs, shared: _Shared, kept, during) -> int:
    shared.stop.set()
    rank0 = procs.processes[0]
    try:  # rank 0 stops after its step, catches up the figure, says what was kept
        rank0.join(timeout=120)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        pass
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    for p in procs.processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    if rank0.exitcode == 0:  # it had finished everything
        return 0
    if rank0.exitcode != 130:  # it did not get to say it
        print(f"nats-kernels train: interrupted during {during(0)}; {kept()}", file=sys.stderr)
    return 130


def _torchrun_rank(args, configs, rank: int) -> int:
    """One rank of torchrun's group (init_method env://): train, rank 0 reporting."""
    import torch
    import torch.distributed as dist

    if torch.device(args.device).type == "cuda":
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    code = _train_runs(args, configs, rank)
    if code == 0:
        dist.destroy_process_group()
    return code
