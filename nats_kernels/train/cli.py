"""``nats-kernels train``: GANs on the embedded synthetic benchmarks (no download).

With no arguments it compares cts, nats, cts+aw and cts+brc on ring8 with one seed, prints a
table and writes ``results.json`` and ``samples.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .data import DATASETS
from .losses import LOSSES
from .runner import RunConfig, check_config, run

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


def main(args: argparse.Namespace) -> int:
    base = RunConfig(steps=args.steps, device=args.device, n_d=args.n_d, batch=args.batch,
                     eval_samples=args.eval_samples, lr_d=args.lr_d, lr_g=args.lr_g)
    configs = [replace(base, dataset=ds, loss=lo, scheme=sc, seed=se)
               for ds in args.dataset for lo in args.loss for sc in args.scheme for se in args.seed]
    try:
        for cfg in configs:
            check_config(cfg)  # a typo or a bad combination fails before any training
    except ValueError as e:
        print(f"nats-kernels train: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, cfg in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {cfg.dataset} {cfg.loss} {cfg.scheme} seed {cfg.seed}"
        if args.no_progress:
            print(label, flush=True)
            runs.append(run(cfg))
        else:
            from tqdm import tqdm

            with tqdm(total=cfg.steps, desc=label, unit="D-step", file=sys.stderr,
                      dynamic_ncols=True) as bar:
                runs.append(run(cfg, progress=bar.update))
    records = [{k: v for k, v in r.items() if k != "samples"} for r in runs]
    (args.out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    from .plot import plot_runs

    figure = plot_runs(runs, args.out / "samples.png")
    print(_table(runs))
    print(f"\nwrote {args.out / 'results.json'} and {figure}")
    return 0


