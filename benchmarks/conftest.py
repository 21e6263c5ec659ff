"""pytest-benchmark suite of nats_kernels (not part of the default ``pytest`` run).

Run, from the repository root:

    python -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu-DATE.json
    python benchmarks/make_results.py benchmarks/results/cpu-DATE.json   # -> benchmarks/RESULTS.md

``NK_BENCH_SIZES=full`` (default) | ``all`` | ``smoke`` picks the size set; ``NK_BENCH_NOTE``
is copied into the JSON (and so into RESULTS.md), e.g. to say the machine was busy. Shared
helpers (providers, rooflines, agreement checks) are in ``nkbench.py``, the GAN parameter
shapes of the list-op benchmarks in ``gan_shapes.py``.
"""

from __future__ import annotations

import os
import sys

import nkbench
import pytest
import torch

import nats_kernels as nk


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (the repository's pytest settings only know ``test_*.py``); a
    file named on the command line is collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _gpu_info() -> dict:
    props = torch.cuda.get_device_properties(nkbench.DEVICE)
    return {"gpu_name": props.name, "gpu_memory_bytes": props.total_memory,
            "gpu_multiprocessors": props.multi_processor_count,
            "torch_cuda_version": torch.version.cuda,
            "gpu_driver": os.environ.get("NK_GPU_DRIVER", "")}


def pytest_benchmark_update_machine_info(config, machine_info):
    """What RESULTS.md reports about the run besides pytest-benchmark's own machine_info."""
    args = " ".join(str(a) for a in config.invocation_params.args)
    mode = nkbench.size_mode()
    prefix = "" if mode == "full" else f"{nkbench.SIZES_ENV}={mode} "
    if nkbench.ON_GPU:
        prefix = f"{nkbench.DEVICE_ENV}=cuda {prefix}"
    skipped = {}
    for name, mod in sys.modules.items():
        if name.startswith("bench_") and hasattr(mod, "skipped"):
            skipped[name] = mod.skipped()
    machine_info.update({
        "nk_command": f"{prefix}python -m pytest {args}",
        "nk_sizes": mode,
        "nk_note": os.environ.get("NK_BENCH_NOTE", ""),
        "nk_skipped": skipped,
        "nk_backends": {b: {"available": i["available"], "ops": i["ops"]}
                        for b, i in nk.backends().items()},
        "cpu_model": nkbench.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "nk_device": nkbench.DEVICE.type,
        **(_gpu_info() if nkbench.ON_GPU else {}),
        "torch_threads": torch.get_num_threads(),
        "nats_kernels_version": nk.__version__,
    })


@pytest.fixture
def use_provider(monkeypatch):
    """``use_provider(name)``: route nats_kernels' ops to that backend for this test."""
    return lambda provider: nkbench.use_backend(monkeypatch, provider)
