"""``nats-kernels train``: GANs on the embedded synthetic benchmarks (no download).

With no arguments it compares cts, nats, cts+aw and cts+brc on ring8 with one seed, prints a
table and writes ``results.json`` and ``samples.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .data import DATASETS
from .losses import LOSSES
from .runner import RunConfig, check_config, run, unused_settings

DEFAULT_SCHEMES = ("cts", "nats", "cts+aw", "cts+brc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--dataset", nargs="+", default=[d.dataset], choices=sorted(DATASETS),
                   help="benchmarks to train on (default: %(default)s)")
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
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr-d", type=float, default=d.lr_d,
                   help="discriminator learning rate (default: %(default)s; the BRC paper: 1e-4)")
    p.add_argument("--lr-g", type=float, default=d.lr_g,
                   help="generator learning rate (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="generated (and real) points the metrics use (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _table(runs: list[dict]) -> str:
    head = ("dataset", "loss", "scheme", "seed", "modes", "hq %", "js", "fid", "s/step")
    rows = [(r["dataset"], r["loss"], r["scheme"], str(r["seed"]), f"{r['modes']}/{r['n_modes']}",
             f"{r['hq']:.1f}", f"{r['js']:.3f}", f"{r['fid']:.4f}", f"{r['seconds_per_step']:.4f}")
            for r in runs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


#: the RunConfig settings this command sets, by the option that sets them (for error messages)
OPTIONS = {"dataset": "--dataset", "loss": "--loss", "scheme": "--scheme", "seed": "--seed",
           "steps": "--steps", "device": "--device", "n_d": "--n-d", "batch": "--batch",
           "lr_d": "--lr-d", "lr_g": "--lr-g", "eval_samples": "--eval-samples"}


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


def main(args: argparse.Namespace) -> int:
    base = RunConfig(steps=args.steps, device=args.device, n_d=args.n_d, batch=args.batch,
                     eval_samples=args.eval_samples, lr_d=args.lr_d, lr_g=args.lr_g)
    configs = [replace(base, dataset=ds, loss=lo, scheme=sc, seed=se)
               for ds in args.dataset for lo in args.loss for sc in args.scheme for se in args.seed]
    try:
        for cfg in configs:
            check_config(cfg)  # a typo, a bad number or device fails before any training
        check_out(args.out)
    except ValueError as e:
        print(f"nats-kernels train: error: {_option_error(str(e))}", file=sys.stderr)
        return 2
    # A setting changed from its default that a scheme does not read: say so, not silently.
    default = RunConfig()
    for name in ("lr_d", "lr_g", "n_d"):
        ignoring = [sc for sc in args.scheme if name in unused_settings(sc)]
        if ignoring and getattr(base, name) != getattr(default, name):
            why = ("no nesting" if name == "n_d" else
                   f"annealed-cfg trains both networks with RMSprop at lr {default.cfg_lr}")
            print(f"nats-kernels train: note: {OPTIONS[name]} is not used by "
                  f"{', '.join(ignoring)} ({why})", file=sys.stderr)

    from .plot import plot_runs, replaced_atomically

    results, figure = args.out / "results.json", args.out / "samples.png"
    saved: list[dict] = []  # the runs in results.json (with their samples, for the figure)
    drawn = 0  # how many of them the figure on disk shows

    def draw() -> None:
        # after every finished run (a draw takes about a second, a run tens of seconds)
        nonlocal drawn
        if drawn != len(saved):
            plot_runs(saved, figure)
            drawn = len(saved)

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

    label = ""
    try:
        for i, cfg in enumerate(configs, 1):
            label = f"[{i}/{len(configs)}] {cfg.dataset} {cfg.loss} {cfg.scheme} seed {cfg.seed}"
            if args.no_progress:
                print(label, flush=True)
                record = run(cfg)
            else:
                from tqdm import tqdm

                with tqdm(total=cfg.steps, desc=label, unit="D-step", file=sys.stderr,
                          dynamic_ncols=True) as bar:
                    record = run(cfg, progress=bar.update)
            # every finished run goes to disk at once, whole: a later failure cannot lose it
            with replaced_atomically(results) as tmp, open(tmp, "w") as f:
                json.dump([{k: v for k, v in r.items() if k != "samples"}
                           for r in [*saved, record]], f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            saved.append(record)
            draw()
    except KeyboardInterrupt:
        note = draw_what_finished()
        print(f"nats-kernels train: interrupted during {label}; {kept()}{note}", file=sys.stderr)
        return 130
    except BaseException:
        note = draw_what_finished()
        print(f"nats-kernels train: failed during {label} (traceback below); {kept()}{note}",
              file=sys.stderr)
        raise
    print(_table(saved))
    print(f"\nwrote {results} and {figure}")
    return 0
