import os

import pytest
import torch

# Modules that test the triton backend itself run where it runs: with a GPU, or under
# TRITON_INTERPRET=1. On a CPU-only default run they are not collected (rather than skipped):
# tests/test_triton_interpret.py runs them in a TRITON_INTERPRET=1 subprocess instead.
TRITON_ONLY_MODULES = ["test_triton.py", "test_triton_median.py"]
# tests/test_gpu.py (sync debug mode, CUDA graphs, compile on CUDA tensors) needs a real GPU:
# .ci/gpu_check runs it there.
collect_ignore = (
    [] if torch.cuda.is_available()
    else ["test_gpu.py"] + ([] if os.environ.get("TRITON_INTERPRET") == "1"
                            else TRITON_ONLY_MODULES)
)


@pytest.fixture(autouse=True)
def _backend_override(request, monkeypatch):
    """Tests parametrized with ``backend`` run with NATS_KERNELS_BACKEND set to it, so an
    unavailable backend is an error, never a silent fallback to the reference."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is not None:
        monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
    yield


@pytest.fixture(autouse=True)
def threads(request):
    """Run tests marked single_thread with one thread, and give them a way back to the pool.

    On a shared 2-core machine every parallel region of a 2-thread OpenMP pool can wait a whole
    time slice for a descheduled thread: tiny backward passes and 40k-element reductions were
    measured 100x-1000x slower than with one thread. The ``*_threaded`` tests call
    ``threads()`` to run the ops under the full pool, so that a multi-threaded CPU kernel still
    has its split reductions and split writes checked (the huge-ish tensor there is larger than
    one parallel grain)."""
    n = torch.get_num_threads()
    if request.node.get_closest_marker("single_thread"):
        torch.set_num_threads(1)
    yield lambda: torch.set_num_threads(n)
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _digits_classifier_cache(tmp_path_factory):
    """The digits classifier (design §6.4) is cached in a folder of this session, never in the
    user's cache: the first test that evaluates digits trains it (seconds), the rest load it.
    tests/test_digits.py points the cache elsewhere where it tests the cache itself."""
    if "NATS_KERNELS_CACHE" in os.environ:
        yield
        return
    os.environ["NATS_KERNELS_CACHE"] = str(tmp_path_factory.mktemp("nats_kernels_cache"))
    try:
        yield
    finally:
        os.environ.pop("NATS_KERNELS_CACHE", None)
