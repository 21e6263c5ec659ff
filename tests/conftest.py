import pytest


@pytest.fixture(autouse=True)
def _backend_override(request, monkeypatch):
    """Tests parametrized with ``backend`` run with NATS_KERNELS_BACKEND set to it, so an
    unavailable backend is an error, never a silent fallback to the reference."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is not None:
        monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
    yield
