"""The figure of a ``train`` invocation: each run's samples over the true modes, a panel per run."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .data import DATASETS, get_dataset


def image_grid(samples, rows: int = 8, cols: int = 8, side: int = 8, pad: int = 1):
    """The first ``rows * cols`` flat images of ``samples`` ((n, side * side), values in
    [-1, 1]) tiled into one greyscale array in [0, 1] (0: the digits' background), ``pad``
    background pixels between tiles; tiles past ``n`` stay background."""
    import numpy as np

    x = np.asarray(samples, dtype=np.float64)[: rows * cols].reshape(-1, side, side)
    x = np.clip((x + 1) / 2, 0, 1)
    step = side + pad
    grid = np.zeros((rows * step - pad, cols * step - pad))
    for k, img in enumerate(x):
        r, c = divmod(k, cols)
        grid[r * step:r * step + side, c * step:c * step + side] = img
    return grid


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; when the block finishes, the temporary
    file replaces ``path`` in one step (``os.replace``), so ``path`` always holds either its old
    or its new whole content. When the block raises, the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``, replaced atomically and synced: a later failure cannot leave
    a half-written file."""
    import json

    with replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG) atomically and close it, also on failure."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


def plot_runs(runs: list[dict], path: Path) -> Path:
    """One panel per run, written to ``path`` (PNG) atomically: an interrupted draw leaves the
    previous figure whole."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(3.2 * cols, 3.4 * rows))
    try:
        for i, run in enumerate(runs):
            samples = run["samples"].numpy()
            title = (f"{run['dataset']} {run['loss']} {run['scheme']} s{run['seed']}\n"
                     f"modes {run['modes']}/{run['n_modes']}  hq {run['hq']:.0f}%")
            if run["dataset"] not in DATASETS:  # digits: 64 generated images, black on white
                ax = fig.add_subplot(rows, cols, i + 1)
                ax.imshow(1 - image_grid(samples), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_title(title.replace("modes", "classes"), fontsize=8)
                ax.set_axis_off()
                continue
            mixture = get_dataset(run["dataset"])
            centres = mixture.centres.numpy()
            if mixture.dim == 3:
                ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
                ax.scatter(*samples.T, s=2, alpha=0.5, color="tab:blue")
                ax.scatter(*centres.T, s=25, marker="x", color="tab:red")
            else:
                ax = fig.add_subplot(rows, cols, i + 1)
                ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:blue",
                           label="generated")
                ax.scatter(centres[:, 0], centres[:, 1], s=25, marker="x", color="tab:red",
                           label="true modes")
                for cx, cy in centres:  # the 3-std disc a point must fall into to count
                    ax.add_patch(plt.Circle((cx, cy), 3 * mixture.std, fill=False, lw=0.6,
                                            color="tab:red"))
                lim = float(abs(centres).max()) * 1.5
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_aspect("equal")
            ax.set_title(title, fontsize=8)
            ax.tick_params(labelsize=6)
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path, dpi=110)
