"""design §2: the nested (annealed) training scheme -- NTS / NATS, and CTS as its ``n_d = 1`` case.

A schedule, not a kernel: it decides *when* the discriminator and the generator step and with
which weight. :func:`nested_schedule` is the bare order of one outer iteration;
:class:`NestedTrainer` drives a user's own step functions over it, with three ways of letting the
weight act (``mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .. import _validate as v
from ..distributed import _comm
from ..ops import cfg_accumulate
from . import _grads

MODES = ("loss", "lr", "accumulate")


def _check_n_d_k(n_d, k) -> tuple[int, int]:
    return v.integer("n_d", n_d, minimum=1), v.integer("k", k, minimum=1)


def nested_schedule(
    n_d: int, weights: Sequence[float] | Tensor | None = None, k: int = 1
) -> Iterator[tuple[str, float | Tensor | None]]:
    """The order of one outer iteration of the nested training scheme (design §2)::

        for j in 1..n_d:
            k times: ("D", None)
            for i in 1..j: ("G", w[i])

    so it yields ``n_d * k`` D items and ``n_d * (n_d + 1) / 2`` G items. Block ``j`` uses the
    first ``j`` weights, in order: every block restarts at ``w[1]``.

    - ``weights=None``: all ones -- NTS.
    - ``weights=nk.annealed_weights(1, 0.01, n_d)`` (or ``[1, 0.01]``-style presets, see
      :func:`~nats_kernels.schemes.preset_weights`): NATS.
    - ``n_d=1`` (and ``weights=None`` or ``[1]``): the common alternating scheme, CTS.

    Args:
        n_d: nesting number N_d, a Python int >= 1 (paper: 5/10/15/20 for GAN, LSGAN, WGAN,
            hinge; 4 for BigGAN; 2 for DDGAN).
        weights: None, a sequence of ``n_d`` positive finite Python numbers (yielded as Python
            floats), or a 1-D floating tensor of length ``n_d`` (yielded as its 0-d elements,
            views that stay on the tensor's device: no host sync; values are not checked).
        k: discriminator steps per block (K; 1 in the paper), a Python int >= 1.

    Returns:
        An iterator over ``(kind, weight)`` pairs: ``("D", None)`` or ``("G", w)``. Arguments
        are checked when this function is called, not on the first ``next()``.

    Raises:
        TypeError: non-int ``n_d``/``k``, weights of the wrong type or dtype.
        ValueError: ``n_d < 1``, ``k < 1``, weights of the wrong length/shape, a non-positive or
            non-finite weight number.
    """
    n_d, k = _check_n_d_k(n_d, k)
    checked = v.weights("weights", weights, n_d, "n_d")
    return _schedule(n_d, checked, k)


def _schedule(n_d: int, weights, k: int):
    for j in range(1, n_d + 1):
        for _ in range(k):
            yield ("D", None)
        for i in range(j):
            yield ("G", 1.0 if weights is None else weights[i])


class NestedTrainer:
    """Drive a user's discriminator and generator steps over the nested schedule (design §2).

    ::

        def d_step():                       # the trainer's usual discriminator step
            opt_d.zero_grad(); d_loss(...).backward(); opt_d.step()

        def g_step(w):                      # mode="loss": the usual G step, loss times w
            opt_g.zero_grad(); (w * g_loss(...)).backward(); opt_g.step()

        trainer = NestedTrainer(d_step, g_step, n_d=5, weights=nk.annealed_weights(1, .01, 5))
        trainer.run(n_outer)                # or trainer.run_outer() inside your own loop

    One outer iteration (:meth:`run_outer`) is, for ``j = 1..n_d``: ``k`` calls of ``d_step()``,
    then ``j`` generator steps weighted ``w[1..j]``. How the weight acts depends on ``mode``, and
    so does the contract of ``g_step``:

    ``mode="loss"`` (default; the paper's NATS, Algorithm 3 line 10)
        ``g_step(w)`` is the user's complete generator step (zero_grad, forward on a fresh
        ``z``, backward, optimizer step) with the weight ``w`` in its loss. ``w`` is a Python
        float (weights None or numbers) or a 0-d tensor element of ``weights`` (kept on its
        device). The trainer only calls it; ``g_optimizer``/``generator`` are not needed
        (ignored). Where ``w`` goes is the user's choice, and the two choices differ::

            g_loss_fn(w * D(G(z)))      # the NATS paper: w on the discriminator's output
            w * g_loss_fn(D(G(z)))      # w on the loss

        They coincide only for a loss linear in D's output (WGAN's ``-mean D``). With the
        non-saturating ``softplus(-l)``, ``w`` on the output flattens the loss (its gradient
        is ``w * sigmoid(-w l)`` per logit, not ``w * sigmoid(-l)``); with Adam a constant
        factor on the loss is nearly cancelled (below), a factor on the output is not.

    ``mode="lr"``
        ``g_step()`` -- called **without arguments** -- is the user's complete generator step on
        the *unweighted* loss. Around each call the trainer sets the ``lr`` of every param group
        of ``g_optimizer`` to ``lr * w`` and afterwards restores the previous value exactly (the
        same Python float object, or for a tensor lr an in-place copy of the saved value), also
        when ``g_step`` raises. Tensor weights are read to the host **once**, at construction.
        Do not step an LR scheduler inside ``g_step``: the restore would undo it.

    ``mode="accumulate"``
        ``g_step()`` -- called **without arguments** -- returns the generator's *unweighted*
        scalar loss tensor on a fresh ``z`` and does **not** call backward or step. For each
        block ``j`` the trainer evaluates the ``j`` losses at the same generator parameters,
        takes ``torch.autograd.grad`` of each over the generator parameters (those of
        ``generator``, else those of ``g_optimizer``, that require grad), combines them
        per parameter with ``nk.cfg_accumulate`` into ``sum_i w[i] * grad_i`` in one pass, writes
        that into ``.grad`` (overwriting what was there; a parameter no loss reached keeps
        ``.grad`` None) and calls ``g_optimizer.step()`` once. So a block makes ``j`` generator
        forward/backward passes but one optimizer step: it is *not* the same trajectory as
        ``"loss"`` (there the parameters move between the ``j`` steps), it is the weighted
        gradient of the block's losses at the block's starting point. The ``j`` gradient sets of
        a block are alive together until the step (memory: up to ``n_d`` generator gradients).

    Why more than one mode: with Adam/RMSprop, a *constant* factor on the loss is almost
    cancelled by the optimizer's normalisation (the update is nearly scale invariant; only
    ``eps`` and the moment estimates' transient see it). In ``"loss"`` mode the annealing acts
    through the *changing* scale across the consecutive steps of a block (the second-moment
    estimate lags behind), which is what the paper does. ``"lr"`` applies ``w`` where such
    optimizers do not cancel it (the step size); ``"accumulate"`` applies it as relative weights
    between the block's gradients, which no optimizer cancels. With plain SGD, ``"loss"`` and
    ``"lr"`` are the same update.

    Args:
        d_step: ``d_step()``, the complete discriminator step (return value ignored).
        g_step: the generator step, see the modes above.
        n_d, weights, k: as :func:`nested_schedule`. In ``"accumulate"`` mode number weights are
            put on each parameter's device, in float32 (float64 for float64 parameters).
        mode: ``"loss"``, ``"lr"`` or ``"accumulate"``.
        g_optimizer: the generator's optimizer; required by ``"lr"`` and ``"accumulate"``.
        generator: optional module whose parameters (those requiring grad) get the accumulated
            gradient in ``"accumulate"`` mode; default: the parameters of ``g_optimizer``.
        process_group: ``"accumulate"`` mode under ``torch.distributed`` with a generator that
            is not DDP-wrapped: the group to average the block's gradient over. Default: the
            group of a DDP-wrapped ``generator``, or none.

    Several processes (``torch.distributed``): in ``"loss"`` and ``"lr"`` mode the user's steps
    call ``backward()`` themselves, so DDP-wrapped modules synchronize as usual and the trainer
    has nothing to add. In ``"accumulate"`` mode the gradients come from
    ``torch.autograd.grad``, which DDP does not see: pass the DDP-wrapped module as
    ``generator`` (or ``process_group=``) and the trainer averages each block's weighted
    gradient over the ranks (one flat all-reduce per bucket per block, the generator's gradient
    volume) before the optimizer step, so every rank steps alike, as one process on the
    concatenation of the ranks' batches would. The ranks must reach the same parameters unless
    the wrapper has ``find_unused_parameters=True`` (then they exchange which they reached and
    read it on the host once per block, as DDP does); ``static_graph=True`` is refused.

    Attributes:
        d_steps: ``d_step`` calls so far (``n_d * k`` per outer iteration).
        g_steps: generator steps of the schedule so far, i.e. ``g_step`` calls
            (``n_d * (n_d + 1) / 2`` per outer iteration, in every mode).
        g_optimizer_steps: generator optimizer steps the trainer made (``"accumulate"``: ``n_d``
            per outer iteration; 0 in the other modes, where ``g_step`` steps itself).
        outer_steps: outer iterations completed.

    Raises:
        TypeError / ValueError: as :func:`nested_schedule`; non-callable steps; an unknown mode;
            a missing ``g_optimizer`` in ``"lr"``/``"accumulate"`` mode; no trainable parameter.
    """

    def __init__(
        self,
        d_step: Callable[[], object],
        g_step: Callable[..., object],
        *,
        n_d: int,
        weights: Sequence[float] | Tensor | None = None,
        k: int = 1,
        mode: str = "loss",
        g_optimizer: torch.optim.Optimizer | None = None,
        generator: torch.nn.Module | None = None,
        process_group=None,
    ):
        if not callable(d_step):
            raise TypeError(f"d_step must be callable, got {type(d_step).__name__}")
        if not callable(g_step):
            raise TypeError(f"g_step must be callable, got {type(g_step).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.n_d, self.k = _check_n_d_k(n_d, k)
        self.weights = v.weights("weights", weights, self.n_d, "n_d")
        self.mode = mode
        self.d_step = d_step
        self.g_step = g_step
        self.g_optimizer = g_optimizer
        self.generator = generator
        if mode != "loss" and not isinstance(g_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"mode={mode!r} needs g_optimizer, a torch.optim.Optimizer, "
                f"got {type(g_optimizer).__name__}"
            )
        if generator is not None and not isinstance(generator, torch.nn.Module):
            raise TypeError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
        if mode == "lr":
            # One host read at construction; the per-step path only multiplies Python floats.
            w = self.weights
            self._lr_weights = (
                [1.0] * self.n_d if w is None else w.tolist() if isinstance(w, Tensor) else w
            )
        if mode == "accumulate":
            if generator is not None:
                params = [p for p in generator.parameters() if p.requires_grad]
            else:
                groups = g_optimizer.param_groups
                params = [p for g in groups for p in g["params"] if p.requires_grad]
            if not params:
                raise ValueError("accumulate mode found no generator parameter requiring grad")
            self._params = params
            self._acc_weights: dict[tuple, Tensor] = {}
            self._sync = _comm.setup("NestedTrainer", process_group, {"generator": params},
                                     generator=generator)
            self.process_group = self._sync.group
        else:
            self.process_group = None
        self.d_steps = 0
        self.g_steps = 0
        self.g_optimizer_steps = 0
        self.outer_steps = 0

    # ------------------------------------------------------------------------------ driving

    def schedule(self) -> Iterator[tuple[str, float | Tensor | None]]:
        """:func:`nested_schedule` of this trainer's ``n_d``, ``weights`` and ``k``."""
        return _schedule(self.n_d, self.weights, self.k)

    def run(self, n_outer: int) -> None:
        """Run ``n_outer`` outer iterations."""
        for _ in range(v.integer("n_outer", n_outer, minimum=0)):
            self.run_outer()

    def run_outer(self) -> None:
        """One outer iteration: ``n_d * k`` discriminator steps, ``n_d(n_d+1)/2`` generator
        steps, in the order of :func:`nested_schedule`."""
        for j in range(1, self.n_d + 1):
            for _ in range(self.k):
                self.d_step()
                self.d_steps += 1
            if self.mode == "loss":
                for i in range(j):
                    self.g_step(1.0 if self.weights is None else self.weights[i])
                    self.g_steps += 1
            elif self.mode == "lr":
                for i in range(j):
                    self._lr_step(self._lr_weights[i])
                    self.g_steps += 1
            else:
                self._accumulate_block(j)
        self.outer_steps += 1

    # ------------------------------------------------------------------------------ lr mode

    def _lr_step(self, w: float) -> None:
        groups = self.g_optimizer.param_groups
        saved = [g["lr"] for g in groups]
        copies = [lr.clone() if isinstance(lr, Tensor) else None for lr in saved]
        try:
            for g, lr in zip(groups, saved):
                if isinstance(lr, Tensor):
                    lr.mul_(w)
                else:
                    g["lr"] = lr * w
            self.g_step()
        finally:
            for g, lr, copy in zip(groups, saved, copies):
                if copy is not None:
                    lr.copy_(copy)
                g["lr"] = lr

    # ---------------------------------------------------------------------- accumulate mode

    def _weights_on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        acc = v.acc_dtype(dtype)
        key = (device, acc)
        w = self._acc_weights.get(key)
        if w is None:
            if isinstance(self.weights, Tensor):
                w = self.weights.to(device=device)
            elif self.weights is None:
                w = torch.ones(self.n_d, device=device, dtype=acc)
            else:
                w = torch.tensor(self.weights, dtype=acc).to(device)
            self._acc_weights[key] = w
        return w

    def _accumulate_block(self, j: int) -> None:
        params = self._params
        per_step = []
        for _ in range(j):
            loss = self.g_step()
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise TypeError(
                    "in accumulate mode g_step() must return the generator loss as a 0-d "
                    f"tensor (no backward, no step), got {shape}"
                )
            per_step.append(torch.autograd.grad(loss, params, allow_unused=True))
            self.g_steps += 1
        written, zeros = [], {}
        for p_index, p in enumerate(params):
            grads = [step[p_index] for step in per_step]
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                written.append(None)
                continue
            w = self._weights_on(p.device, p.dtype)
            if len(present) == j:
                used, w_used = grads, w[:j]
            else:  # some losses did not reach p: sum over those that did
                used = [grads[i] for i in present]
                w_used = w[torch.tensor(present, device=p.device)]
            # x0 = zeros that take no memory (stride 0): out = sum_i w_i * g_i in one pass.
            zero = _grads.zeros(p, zeros)
            # written in place when it is a plain gradient; a .grad that is part of a graph
            # (after backward(create_graph=True)) is replaced, as AWLoss and BRC do
            out = p.grad if (p.grad is not None and p.grad.shape == p.shape
                             and p.grad.dtype == p.dtype and not p.grad.is_sparse
                             and not p.grad.requires_grad) else None
            p.grad = cfg_accumulate(zero, used, w_used, out=out)
            written.append(p.grad)
        if self.process_group is not None:
            # the weighted sum is linear: its mean over ranks is the sum of the means, one
            # flat all-reduce per bucket per block (a parameter no loss reached counts as zeros)
            used = [g is not None for g in written]
            extra = _comm.used_flags(used, params[0]) if self._sync.find_unused else None
            views = _comm.average_in_place_(written, params, self.process_group,
                                            self._sync.bucket_bytes, extra)
            if extra is not None:  # one host read, as DDP's find_unused_parameters makes
                for p, g, vw, u in zip(params, written, views, (extra > 0).tolist()):
                    if u and g is None:  # reached on another rank only
                        p.grad = vw.clone()
        self.g_optimizer.step()
        self.g_optimizer_steps += 1
