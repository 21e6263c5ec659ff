"""CUDA-graph replay of ``AnnealedCFG``'s M-step functional-gradient loop (design §1.4,
``AnnealedCFG(..., cuda_graph=True)``).

One graph per batch layout (shape, strides, dtype, device) holds the whole loop of
``AnnealedCFG._move``: per step the snapshot's forward pass, ``torch.autograd.grad`` of its
output, the optional sigmoid scale and ``cfg_step_``. A replay reads the samples from a static
buffer (the generator's output is copied into it) and leaves the moved samples there (copied
out, since the next replay overwrites them). Everything else the graph reads is baked in at
capture by address or by value; :class:`MoveGraphs` drops every graph when the signature of
that state (``AnnealedCFG._graph_state``) changes and captures anew on the next call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

WARMUP = 3  # eager runs on a side stream before the capture (PyTorch's CUDA-graph docs)
MAX_GRAPHS = 8  # batch layouts kept per AnnealedCFG (least recently used dropped first)


def capture(fn: Callable[[], object], prepare: Callable[[], object] | None = None,
            warmup: int = WARMUP):
    """``fn`` run ``warmup`` times on a side stream (each after ``prepare``), then captured once
    in a ``torch.cuda.CUDAGraph``, which is returned (not replayed). The capture itself runs no
    kernel; ``torch.cuda.graph`` synchronizes the device around it (not a hot path)."""
    cuda = torch.cuda
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    with cuda.stream(side):
        for _ in range(warmup):
            if prepare is not None:
                prepare()
            fn()
    cuda.current_stream().wait_stream(side)
    graph = cuda.CUDAGraph()
    with cuda.graph(graph):
        fn()
    return graph


def _layout(x: Tensor) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


class MoveGraphs:
    """The captured loops of one ``AnnealedCFG``: ``{batch layout: (graph, static buffer)}``,
    valid for one baked-state signature.

    ``capture`` is :func:`capture` (tests pass a stand-in that runs on the CPU). ``captures``
    counts the captures made (the re-capture decisions are tested with it).
    """

    def __init__(self, capture_fn: Callable = capture, max_graphs: int = MAX_GRAPHS):
        self._capture = capture_fn
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[object, Tensor]] = OrderedDict()
        self._state: tuple | None = None
        self._keep: object = None
        self.captures = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._state = self._keep = None

    def use_state(self, state: tuple, keep: object) -> None:
        """Drop every graph unless ``state`` (the signature of what the graphs bake in) equals
        the one they were captured under. ``keep`` holds the tensors and modules whose ``id``
        and address the signature names, so neither can be reused by another object while the
        signature is kept."""
        if state != self._state:
            self.clear()
            self._state, self._keep = state, keep

    def move(self, x: Tensor, body: Callable[[Tensor], object],
             snapshots: Sequence[nn.Module]) -> Tensor:
        """``body(x)`` (the in-place M-step loop) by replaying the graph of ``x``'s layout,
        captured first if there is none: ``x`` is copied into the static buffer, the graph
        replayed and the result copied back into ``x``, which is returned."""
        key = _layout(x)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._new(x, body, snapshots)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static = entry
        static.copy_(x)
        graph.replay()
        return x.copy_(static)

    def _new(self, x: Tensor, body: Callable[[Tensor], object],
             snapshots: Sequence[nn.Module]) -> tuple[object, Tensor]:
        static = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        # The warm-up runs are real forward passes: a snapshot in train mode (BatchNorm) would
        # update its running statistics WARMUP extra times. Put them back afterwards.
        buffers = [b for s in snapshots for b in s.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            graph = self._capture(lambda: body(static), lambda: static.copy_(x))
        except Exception as e:
            e.add_note("(AnnealedCFG(cuda_graph=True) was capturing the M-step loop in a CUDA "
                       f"graph, samples of shape {tuple(x.shape)} and dtype {x.dtype}: a "
                       "discriminator whose forward pass reads a device value on the host, or "
                       "does anything else a CUDA graph cannot hold, needs cuda_graph=False)")
            raise
        finally:
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, saved)
        self.captures += 1
        return graph, static
