"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Each module here registers its launchers with ``_dispatch.register("triton", op)`` when
imported: ``cfg`` (cfg_accumulate, cfg_accumulate_list, cfg_step_), ``aw`` (multi_dot,
aw_weights, aw_combine_), ``iga`` (iga_ratio, iga_correction_), ``median``
(median_pairwise_distance; its design is in that module's docstring). Each launcher has the
signature and semantics of the reference function it replaces (nats_kernels/reference).

Design
------
* Multi-tensor ops (multi_dot, iga_ratio, aw_combine_, iga_correction_): no pointer table (the
  interpreter cannot load pointers from memory) and no ``torch.cat``. Each launch takes up to
  ``SLOTS`` (16) tensors per list as tuple kernel arguments with their sizes and strides; every
  tensor is cut into ``CHUNK``-element (8192) programs, and a program finds its tensor by
  comparing its id with the first program of each slot. Longer lists take ceil(P / 16)
  launches; empty tensors take none.
* Reductions: each program writes its partial sums into its own slot of a buffer; one
  single-program kernel adds the slots in chunk order and applies the scalar rule on device
  (the three sums, the IGA ratio, or the aw means and weight table). Chunking and order depend
  on shapes, strides and dtypes only: the same inputs give bit-identical results.
* cfg: one pass, one program per 1024 elements; x0, the M gradients and the per-sample scale
  are read once and ``out`` written once. The list form reads up to ``MAX_LIST`` (16) gradients
  per launch; more go through a float32/float64 scratch with the same additions in the same
  order (bit-identical to the stacked form).
* Layouts: operands whose joint layout has at most two dims after merging (contiguous, sliced,
  transposed) are read in place, contiguous ones on a fast path; a view laid out in three or
  more dims (or an expanded input) is read from a contiguous copy, and such an output is
  computed in a contiguous tensor that is then copied into it. An output may be the very same
  view as an input; an input overlapping an output any other way is copied first.
* dtypes: float16 / bfloat16 / float32 / float64; half types are converted to float32 right
  after loading and rounded once when stored, so every bfloat16 case runs under the
  interpreter too. No host synchronization: launchers read metadata only, scalars (eta, eps,
  hyperparameters) are float64 kernel arguments, 0-d tensors are read by the kernels.

What only a GPU exercises
-------------------------
The interpreter runs these same kernels and launchers (there is no GPU-only code path), but
not Triton's compiler: the typing of the tuple arguments and of the slot-selection branches,
the float64 argument annotations, ``do_not_specialize``, vectorized loads, and floating-point
contraction (the compiler may fuse ``a + b * c`` into one FMA, so compiled results can differ
from interpreted ones in the last bit, deterministically). tests/test_triton_interpret.py
compiles every kernel variant the launchers produce down to an sm_90 cubin without a GPU. What
has run where: the Status paragraph of README.md.
"""

from . import aw, cfg, iga, median  # noqa: F401  (register the kernels)
