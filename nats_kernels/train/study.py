"""``nats-kernels study``: the papers' protocols over several seeds, next to their published
numbers (design §6.5).

A *protocol* is a grid of runs (datasets x losses x schemes, with the paper's settings) and the
numbers its paper published for some of them. The command trains every run of the chosen
protocols for every seed, each run once even when several protocols share it, and writes into
``--out``:

- ``runs/<key>.json``: one finished run (its ``train`` record, with a curve of the metrics every
  ``--eval-every`` D steps). The key names the run and hashes all its settings, so a rerun of
  the same command skips what finished (resumable) and a changed setting trains anew;
- ``study.md`` / ``study.json``: per protocol, mean ± std over seeds of every metric next to the
  published mean ± std, and one line per published claim saying whether it reproduces here;
- ``curves-<protocol>.png``: modes, JS and FID against D steps (mean over seeds, min-max band),
  like the BRC paper's Fig. 2.

Runs go to ``--jobs`` worker processes (each with ``cpus // jobs`` threads), or in this process
with ``--jobs 1``. Ctrl-C keeps every finished run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .cli import _cpus
from .plot import save_figure, write_json
from .runner import RunConfig, check_config, run


@dataclass(frozen=True)
class Protocol:
    """A grid of runs and what a paper published about it.

    ``published`` maps ``(dataset, loss, scheme)`` to ``{metric: (mean, std)}`` (std may be
    None); ``claims`` lists ``(baseline scheme, scheme, metric)`` comparisons that the paper
    makes, checked for direction and size on every (dataset, loss) of the grid. ``reference``
    gives, per compared pair, the paper's own (baseline, improved) numbers when they come from
    another benchmark (CIFAR-10), so that the ratio can be set beside ours."""

    name: str
    paper: str
    question: str
    datasets: tuple[str, ...]
    losses: tuple[str, ...]
    schemes: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    claims: tuple = ()
    reference: dict = field(default_factory=dict)

    def configs(self, base: RunConfig, seeds) -> list[RunConfig]:
        cfg = replace(base, **self.settings)
        return [replace(cfg, dataset=d, loss=lo, scheme=s, seed=seed)
                for d in self.datasets for lo in self.losses for s in self.schemes
                for seed in seeds]


def _t2(vgan_plain, vgan_brc, wgan_plain, wgan_brc):
    rows = {}
    for (loss, scheme), v in zip((("vanilla", "cts"), ("vanilla", "cts+brc"),
                                  ("wgan-gp", "cts"), ("wgan-gp", "cts+brc")),
                                 (vgan_plain, vgan_brc, wgan_plain, wgan_brc)):
        rows[loss, scheme] = {"fid": v[0], "js": v[1], "modes": v[2]}
    return rows


_T2_RING = _t2(((193.20, 65.30), (0.63, 0.12), (3.50, 1.00)),
               ((34.16, 10.23), (0.40, 0.16), (7.50, 1.00)),
               ((0.42, 0.21), (0.65, 0.13), (6.25, 1.53)),
               ((0.16, 0.09), (0.27, 0.25), (7.00, 0.82)))
_T2_CUBE = _t2(((12.28, 26.10), (0.48, 0.08), (8.50, 1.00)),
               ((0.52, 0.16), (0.61, 0.30), (23.00, 1.40)),
               ((12.00, 0.90), (0.62, 0.07), (15.00, 0.41)),
               ((0.80, 0.20), (0.21, 0.03), (24.00, 0.51)))

#: The digits runs' settings (design §6.4): DCGAN's usual Adam (lr 2e-4 for both networks,
#: betas (0.5, 0.999)) and batch 64. With the mixtures' defaults (batch 512, lr 1e-3, betas
#: (0.9, 0.999)) cts had collapsed to 1 class after 300 D steps here; with these it covered 10
#: classes after 1000.
DIGITS_SETTINGS = {"batch": 64, "lr_d": 2e-4, "lr_g": 2e-4, "betas": (0.5, 0.999)}

PROTOCOLS = {
    p.name: p for p in (
        Protocol(
            "brc-table2", "BRC paper, Table 2 (VGAN and WGAN rows)",
            "Does BRC (eq. 9, IGA) raise the modes found, and lower JS and FID, for VGAN and "
            "WGAN on the 8-ring and the 27-cube at variance 0.02?",
            ("ring8-brc", "cube27-brc"), ("vanilla", "wgan-gp"), ("cts", "cts+brc"),
            settings={"lr_d": 1e-4},  # the paper's learning rates (lr_G 1e-3 is the default)
            published={**{("ring8-brc", *k): v for k, v in _T2_RING.items()},
                       **{("cube27-brc", *k): v for k, v in _T2_CUBE.items()}},
            claims=(("cts", "cts+brc", "modes"), ("cts", "cts+brc", "js"),
                    ("cts", "cts+brc", "fid"))),
        Protocol(
            "aw-ring8", "aw-loss paper (no synthetic table; Table 1: SN-GAN on CIFAR-10)",
            "Does aw-loss keep more modes / a lower FID than the plain loss on the 8-ring?",
            ("ring8",), ("vanilla",), ("cts", "cts+aw"),
            claims=(("cts", "cts+aw", "modes"), ("cts", "cts+aw", "fid")),
            reference={("cts", "cts+aw", "fid"): (22.40, 19.08, "SN-GAN, CIFAR-10 FID")}),
        Protocol(
            "nested-ring8", "NATS paper (no synthetic table; Table IX: original GAN, CIFAR-10)",
            "Do the nested schemes (NTS, NATS with the weight on D's output) beat CTS on the "
            "8-ring?",
            ("ring8",), ("vanilla",), ("cts", "nts", "nats"),
            claims=(("cts", "nts", "modes"), ("cts", "nats", "modes"), ("cts", "nts", "fid"),
                    ("cts", "nats", "fid"), ("nts", "nats", "fid")),
            reference={("cts", "nts", "fid"): (37.83, 17.69, "original GAN, CIFAR-10 FID"),
                       ("cts", "nats", "fid"): (37.83, 16.78, "original GAN, CIFAR-10 FID"),
                       ("nts", "nats", "fid"): (17.69, 16.78, "original GAN, CIFAR-10 FID")}),
        Protocol(
            "nested-digits", "NATS paper (Table IX: original GAN, CIFAR-10)",
            "Do NTS and NATS beat CTS on images (8x8 digits: classes covered, pixel and "
            "classifier-feature FID)?",
            ("digits",), ("vanilla",), ("cts", "nts", "nats"), settings=DIGITS_SETTINGS,
            claims=(("cts", "nts", "modes"), ("cts", "nats", "modes"), ("cts", "nts", "fid"),
                    ("cts", "nats", "fid"), ("cts", "nts", "fid_features"),
                    ("cts", "nats", "fid_features"), ("nts", "nats", "fid_features")),
            reference={("cts", "nts", "fid_features"): (37.83, 17.69,
                                                        "original GAN, CIFAR-10 FID"),
                       ("cts", "nats", "fid_features"): (37.83, 16.78,
                                                         "original GAN, CIFAR-10 FID"),
                       ("nts", "nats", "fid_features"): (17.69, 16.78,
                                                         "original GAN, CIFAR-10 FID")}),
        Protocol(
            "combinations", "no paper (NATS with aw-loss, NATS with BRC)",
            "What do the combinations that no paper tried do on the 8-ring, next to NATS alone?",
            ("ring8",), ("vanilla",), ("nats", "nats+aw", "nats+brc"),
            claims=(("nats", "nats+aw", "modes"), ("nats", "nats+brc", "modes"))),
    )
}

#: lower is better for these; higher for the rest (modes, hq)
LOWER_BETTER = {"js", "fid", "fid_features"}
METRICS = ("modes", "hq", "js", "fid", "fid_features")


def run_key(cfg: RunConfig) -> str:
    """``<dataset>-<loss>-<scheme>-s<seed>-<hash of every setting>``: equal settings, equal key."""
    text = json.dumps(asdict(cfg), sort_keys=True, default=list)
    digest = hashlib.blake2b(text.encode(), digest_size=5).hexdigest()
    return f"{cfg.dataset}-{cfg.loss}-{cfg.scheme.replace('+', '_')}-s{cfg.seed}-{digest}"


def machine() -> str:
    """The CPU's model name (Linux), else ``platform.processor()``, and the core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {_cpus()} cores"


def _train_one(cfg: RunConfig, path: Path, threads: int | None) -> dict:
    """One run, its record (no samples) written to ``path``: in a worker process or here."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    record = run(cfg)
    record.pop("samples", None)
    record["threads"] = torch.get_num_threads()
    record["key"] = path.stem
    write_json(path, record, indent=1)
    return record


# ------------------------------------------------------------------------------- summaries


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize(protocol: Protocol, records: list[dict]) -> dict:
    """Per (dataset, loss, scheme): mean/std of each metric over the seeds found, the seeds, the
    seconds per D step, and the published numbers; then every claim checked."""
    rows = {}
    for d in protocol.datasets:
        for lo in protocol.losses:
            for s in protocol.schemes:
                got = [r for r in records if (r["dataset"], r["loss"], r["scheme"]) == (d, lo, s)]
                if not got:
                    continue
                row = {"dataset": d, "loss": lo, "scheme": s, "seeds": sorted(r["seed"]
                                                                           for r in got),
                       "n_modes": got[0]["n_modes"],
                       "s_per_step": _mean_std([r["seconds_per_step"] for r in got])[0]}
                for m in METRICS:
                    if all(m in r for r in got):
                        row[m] = _mean_std([float(r[m]) for r in got])
                if "brc_mean_r" in got[0]:
                    row["brc_mean_r"] = [r["brc_mean_r"] for r in got]
                pub = protocol.published.get((d, lo, s))
                if pub:
                    row["published"] = pub
                rows[d, lo, s] = row
    claims = []
    for base, new, metric in protocol.claims:
        for d in protocol.datasets:
            for lo in protocol.losses:
                a, b = rows.get((d, lo, base)), rows.get((d, lo, new))
                if a is None or b is None or metric not in a or metric not in b:
                    continue
                claims.append(_claim(protocol, d, lo, base, new, metric, a, b))
    return {"protocol": protocol.name, "paper": protocol.paper, "question": protocol.question,
            "settings": protocol.settings, "rows": list(rows.values()), "claims": claims}


def _direction(metric: str, before: float, after: float, noise: float = 0.0) -> str:
    """'better', 'worse', or 'same' when the change is not larger than ``noise``."""
    if not abs(after - before) > noise:  # NaN (a diverged run) compares as 'same' here too
        return "same"
    better = after < before if metric in LOWER_BETTER else after > before
    return "better" if better else "worse"


def _claim(protocol, d, lo, base, new, metric, a, b) -> dict:
    """A claim checked: the change of the mean from ``base`` to ``new`` counts only when it
    exceeds the larger of the two seed standard deviations (seed noise); with published numbers
    it reproduces when it goes the paper's way and our mean lies in the published mean ± std."""
    (ma, sa), (mb, sb) = a[metric], b[metric]
    here = _direction(metric, ma, mb, max(sa, sb))
    out = {"dataset": d, "loss": lo, "base": base, "scheme": new, "metric": metric,
           "here": [ma, mb], "here_std": [sa, sb], "direction_here": here}
    pa, pb = a.get("published", {}).get(metric), b.get("published", {}).get(metric)
    if pa and pb:
        paper = _direction(metric, pa[0], pb[0])
        out["paper"] = [pa[0], pb[0]]
        out["direction_in_paper"] = paper
        lo_b, hi_b = pb[0] - (pb[1] or 0), pb[0] + (pb[1] or 0)
        out["within_published_band"] = lo_b <= mb <= hi_b
        if here == "same":
            out["verdict"] = f"does not reproduce (paper: {paper}; here within seed noise)"
        elif here != paper:
            out["verdict"] = f"does not reproduce (paper: {paper}; here: {here})"
        elif out["within_published_band"]:
            out["verdict"] = "reproduces"
        else:
            out["verdict"] = f"same direction ({here}), not the published value"
    else:
        ref = protocol.reference.get((base, new, metric))
        if ref is not None:
            out["paper_elsewhere"] = list(ref)
        out["verdict"] = {"better": "better here", "worse": "worse here",
                          "same": "within seed noise here"}[here]
    return out


def _spec(metric: str, magnitude: float) -> str:
    """The format of a metric's numbers in study.md (tables and claims alike)."""
    if metric in ("modes", "hq", "js"):
        return {"modes": ".2f", "hq": ".1f", "js": ".3f"}[metric]
    return ".2g" if magnitude >= 1e5 else ".2f" if magnitude >= 10 else ".4f"  # 1e5: diverged


def _fmt(mean_std, metric: str) -> str:
    if mean_std is None:
        return "-"
    m, s = mean_std
    spec = _spec(metric, abs(m))
    return f"{m:{spec}} ± {s:{spec}}" if s is not None else f"{m:{spec}}"


def markdown(summaries: list[dict], header: str) -> str:
    """study.md: the header (command, machine, wall time), then per protocol a table and its
    claims."""
    out = [header]
    for sm in summaries:
        out += ["", f"## {sm['protocol']}: {sm['paper']}", "", sm["question"]]
        if sm["settings"]:
            out += ["", "Settings beyond the `train` defaults: " + ", ".join(
                f"`{k}={v}`" for k, v in sm["settings"].items())]
        feat = any("fid_features" in r for r in sm["rows"])
        head = ["dataset", "loss", "scheme", "seeds", "modes", "hq %", "js", "fid",
                *(["feat fid"] if feat else []), "s/step", "paper modes", "paper js",
                "paper fid"]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sm["rows"]:
            pub = r.get("published", {})
            cells = [r["dataset"], r["loss"], r["scheme"], str(len(r["seeds"])),
                     f"{_fmt(r['modes'], 'modes')} / {r['n_modes']}", _fmt(r["hq"], "hq"),
                     _fmt(r["js"], "js"), _fmt(r["fid"], "fid"),
                     *([_fmt(r.get("fid_features"), "fid")] if feat else []),
                     f"{r['s_per_step']:.4f}", _fmt(pub.get("modes"), "modes"),
                     _fmt(pub.get("js"), "js"), _fmt(pub.get("fid"), "fid")]
            out.append("| " + " | ".join(cells) + " |")
        if sm["claims"]:
            out += ["", "Claims:", ""]
            for c in sm["claims"]:
                out.append("- " + claim_line(c))
    return "\n".join(out) + "\n"


def claim_line(c: dict) -> str:
    """One claim in words, e.g. 'ring8-brc vanilla, modes: cts -> cts+brc: paper 3.50 -> 7.50,
    here 2.33 -> 1.00: does not reproduce'."""
    m = c["metric"]

    def fmt(v):
        return format(v, _spec(m, abs(v)))

    text = (f"{c['dataset']} {c['loss']}, {m}: {c['base']} -> {c['scheme']}: "
            f"here {fmt(c['here'][0])} -> {fmt(c['here'][1])}")
    if "paper" in c:
        text += (f", paper {fmt(c['paper'][0])} -> {fmt(c['paper'][1])}"
                 f"{'' if c['within_published_band'] else ' (ours outside its mean ± std)'}")
    elif "paper_elsewhere" in c:
        before, after, what = c["paper_elsewhere"]
        ratio_here = c["here"][1] / c["here"][0] if c["here"][0] else float("nan")
        text += (f" (x{ratio_here:.3g}); the paper, on {what}: {before} -> {after} "
                 f"(x{after / before:.2f})")
    return f"{text}: **{c['verdict']}**"


# ------------------------------------------------------------------------------ the figure


def plot_curves(protocol: Protocol, records: list[dict], path: Path) -> Path | None:
    """Modes, JS and FID (and the feature FID on digits) over D steps: one row per (dataset,
    loss), one line per scheme (mean over seeds), its min-max band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(d, lo) for d in protocol.datasets for lo in protocol.losses
              if any((r["dataset"], r["loss"]) == (d, lo) and r.get("curve") for r in records)]
    if not groups:
        return None
    metrics = ["modes", "js", "fid"]
    if any("fid_features" in p for r in records for p in r.get("curve", ())):
        metrics.append("fid_features")
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(3.6 * len(metrics),
                                                                   2.8 * len(groups)),
                             squeeze=False)
    try:
        for i, (d, lo) in enumerate(groups):
            for j, m in enumerate(metrics):
                ax = axes[i][j]
                for s in protocol.schemes:
                    curves = [r["curve"] for r in records if (r["dataset"], r["loss"],
                                                              r["scheme"]) == (d, lo, s)
                              and r.get("curve")]
                    if not curves:
                        continue
                    n = min(len(c) for c in curves)
                    steps = [p["step"] for p in curves[0][:n]]
                    vals = [[c[k][m] for c in curves] for k in range(n)]
                    mean = [sum(v) / len(v) for v in vals]
                    (line,) = ax.plot(steps, mean, label=f"{s} ({len(curves)} seeds)", lw=1.2)
                    ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                                    color=line.get_color(), alpha=0.15, lw=0)
                if m in ("fid", "fid_features"):
                    ax.set_yscale("log")
                ax.set_title(f"{d} {lo}: {m.replace('_', ' ')}", fontsize=8)
                ax.set_xlabel("D steps", fontsize=7)
                ax.tick_params(which="both", labelsize=6)
                if j == 0:
                    ax.legend(fontsize=6)
        fig.suptitle(f"{protocol.name}: {protocol.paper}", fontsize=9)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS),
                   help="protocols to run (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2000,
                   help="discriminator steps per run (default: %(default)s; neither paper "
                        "states its iteration count)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="a curve point every N D steps (default: %(default)s)")
    p.add_argument("--eval-samples", type=int, default=RunConfig.eval_samples)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with cpus // jobs "
                        "threads (default: %(default)s: in this process)")
    p.add_argument("--out", type=Path, default=Path("nats-kernels-study"),
                   help="folder for runs/, study.md, study.json, curves-*.png "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan(args) -> tuple[list[Protocol], list[RunConfig]]:
    """The chosen protocols and their runs, each once (protocols share runs), in order; raises
    ``ValueError`` naming the option for a bad setting, before anything is trained."""
    for name, minimum in (("seeds", 1), ("steps", 1), ("eval_every", 0), ("jobs", 1)):
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= {minimum}, "
                             f"got {getattr(args, name)}")
    protocols = [PROTOCOLS[n] for n in dict.fromkeys(args.protocol)]
    configs: dict[str, RunConfig] = {}
    for p in protocols:
        for cfg in p.configs(_base_config(args), range(args.seeds)):
            configs.setdefault(run_key(cfg), cfg)
    for cfg in configs.values():
        check_config(cfg)
    return protocols, list(configs.values())


def _base_config(args) -> RunConfig:
    """The settings every run of the command shares, before a protocol's own."""
    return RunConfig(steps=args.steps, device=args.device, eval_every=args.eval_every,
                     eval_samples=args.eval_samples)


def _records_of(protocol: Protocol, args, done: dict[str, dict]) -> list[dict]:
    configs = protocol.configs(_base_config(args), range(args.seeds))
    return [done[k] for k in map(run_key, configs) if k in done]


def main(args: argparse.Namespace) -> int:
    try:
        protocols, configs = plan(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs").mkdir(exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"nats-kernels study: error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    done: dict[str, dict] = {}
    todo = []
    for cfg in configs:
        path = args.out / "runs" / f"{run_key(cfg)}.json"
        try:
            done[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):  # missing, or cut short: train it
            todo.append((cfg, path))
    print(f"nats-kernels study: {len(configs)} runs in {len(protocols)} protocol(s); "
          f"{len(done)} already finished in {args.out / 'runs'}, {len(todo)} to train",
          file=sys.stderr)
    try:
        _train_all(todo, done, args)
    except KeyboardInterrupt:
        print(f"nats-kernels study: interrupted; {len(done)} of {len(configs)} runs kept in "
              f"{args.out / 'runs'} (the same command resumes)", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started
    summaries = [summarize(p, _records_of(p, args, done)) for p in protocols]
    train_seconds = sum(r["wall_seconds"] for r in done.values())
    # every invocation that trained something, kept across resumptions
    log_path = args.out / "invocations.json"
    try:
        invocations = json.loads(log_path.read_text())
    except (OSError, ValueError):
        invocations = []
    if todo:
        invocations.append({"command": _command_line(args), "trained": len(todo),
                            "wall_seconds": round(wall, 1),
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        write_json(log_path, invocations, indent=1)
    header = "\n".join([
        "# nats-kernels study", "",
        f"Command: `nats-kernels study {_command_line(args)}`", "",
        f"Machine: {machine()}; torch {_torch_version()}; {len(configs)} runs, "
        f"{sum(1 for _ in done)} finished; {train_seconds / 60:.1f} min of training "
        f"(sum over runs); "
        + (f"this invocation {wall / 60:.1f} min wall (--jobs {args.jobs}); " if todo
           else "this invocation trained nothing; ")
        + f"{len(invocations)} logged invocation(s) that trained runs, "
        f"{sum(i['wall_seconds'] for i in invocations) / 60:.1f} min wall in all "
        f"(invocations.json).", "",
        "Mean ± sample std over seeds. modes: modes hit (digits: classes covered); hq: % of "
        "points within 3 std of a mode (digits: % classified with confidence >= 0.9); js: "
        "JS divergence of the mode histogram from uniform (nats); fid: Fréchet distance of the "
        "raw coordinates (digits: pixels; feat fid: the digit classifier's features). The "
        "papers' FID scale differs (design §6.5): compare modes and JS, and FID only within "
        "a table. A change counts only when it exceeds the larger seed std of the two rows. "
        "s/step: wall time per D step as the runs shared the machine (not a benchmark)."])
    (args.out / "study.md").write_text(markdown(summaries, header))
    write_json(args.out / "study.json", {"command": _command_line(args), "machine": machine(),
                                         "wall_seconds": wall, "summaries": summaries},
               indent=1)
    for p in protocols:
        plot_curves(p, _records_of(p, args, done), args.out / f"curves-{p.name}.png")
    print(markdown(summaries, header))
    print(f"wrote {args.out / 'study.md'}, study.json and curves-*.png", file=sys.stderr)
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


def _command_line(args) -> str:
    parts = [f"--protocol {' '.join(dict.fromkeys(args.protocol))}", f"--seeds {args.seeds}",
             f"--steps {args.steps}", f"--eval-every {args.eval_every}",
             f"--jobs {args.jobs}"]
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def _train_all(todo, done: dict, args) -> None:
    if not todo:
        return
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="study", unit="run", file=sys.stderr,
                   dynamic_ncols=True)

    def finished(record, cfg):
        done[record["key"]] = record
        if bar is not None:
            bar.set_postfix_str(f"{cfg.dataset} {cfg.loss} {cfg.scheme} s{cfg.seed}: "
                                f"{record['modes']}/{record['n_modes']} modes")
            bar.update(1)
        else:
            print(f"[{len(done)}] {cfg.dataset} {cfg.loss} {cfg.scheme} seed {cfg.seed}: "
                  f"{record['modes']}/{record['n_modes']} modes, "
                  f"{record['wall_seconds']:.0f} s", file=sys.stderr, flush=True)

    try:
        if args.jobs == 1:
            for cfg, path in todo:
                finished(_train_one(cfg, path, None), cfg)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, _cpus() // args.jobs)
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) \
                as pool:
            futures = {pool.submit(_train_one, cfg, path, threads): cfg for cfg, path in todo}
            try:
                for fut in as_completed(futures):
                    finished(fut.result(), futures[fut])
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        if bar is not None:
            bar.close()
