"""design §1: composite functional gradient GAN (CFG) with the annealed weights of NATS.

A port of the official algorithm (``riejohnson/cfg-gan-pt``, ``cfggan.py``: ``DDG.icfg``,
``DDG.generate``, ``DDG.approximate``) with the weight vector ``w`` added, on the training
device throughout: samples never leave the device, each functional-gradient step is one
``torch.autograd.grad`` of ``D_m(x)`` with all-ones output gradients (the gradient of
``D_m(x).sum()``, as the official ``backward(ones_like(d_out))``) plus one fused in-place
``nk.cfg_step_``, and nothing on the per-step path reads a device value back to the host.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate as v
from .._dispatch import ENV_VAR as _BACKEND_ENV
from ..distributed import _comm
from ..ops import cfg_step_
from . import _cuda_graph, _grads

SCALES = ("kl", "logd", "js")


def default_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """The official optimizer for D and the approximator: RMSprop(alpha=0.95, eps=1e-18)."""
    return torch.optim.RMSprop(params, lr=lr, alpha=0.95, eps=1e-18)


# ------------------------------------------------------------------- AnnealedCFG's arguments


def _device_and_z_dtype(generator: nn.Module, discriminator: nn.Module):
    """The training device (the generator's first parameter's, shared by every parameter of both
    modules) and the latent dtype (that parameter's floating dtype, else float32)."""
    g_params = list(generator.parameters())
    if not g_params:
        raise ValueError("generator has no parameters")
    first = g_params[0]
    device = first.device
    for name, module in (("generator", generator), ("discriminator", discriminator)):
        for p in module.parameters():
            if p.device != device:
                raise ValueError(
                    f"{name} has a parameter on {p.device}, expected {device} "
                    "(generator and discriminator on one device)"
                )
    return device, first.dtype if first.is_floating_point() else torch.float32


def _z_shape(z_dim) -> tuple[int, ...]:
    """The latent shape: an int or a non-empty sequence of ints, each >= 1."""
    if v.is_int(z_dim):
        z_dim = (z_dim,)
    if not isinstance(z_dim, Sequence) or not z_dim:
        raise TypeError(f"z_dim must be an int or a tuple of ints, got {z_dim!r}")
    return tuple(v.integer("z_dim", d, minimum=1) for d in z_dim)


def _scale(scale) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return scale


def _optimizer(optimizer) -> Callable[..., torch.optim.Optimizer]:
    if optimizer is None:
        return default_optimizer
    if not callable(optimizer):
        raise TypeError(f"optimizer must be callable, got {type(optimizer).__name__}")
    return optimizer


def _approx_decay(value) -> float:
    x = v.number("approx_decay", value)
    if not 0 <= x < 1:
        raise ValueError(f"approx_decay must be in [0, 1), got {value}")
    return x


def _diff_max(value) -> float | None:
    """None (no check) or a positive finite Python number. The official code switches the check
    off with a value <= 0; here that is None, and 0 or a negative value is refused."""
    if value is None:
        return None
    if v.is_number(value) and value <= 0:
        raise ValueError(f"diff_max must be positive and finite, got {value} (None switches the "
                         f"check off; the official code spells that <= 0)")
    return v.positive("diff_max", value)


def _rng(rng, device: torch.device) -> torch.Generator | None:
    if rng is not None:
        if not isinstance(rng, torch.Generator):
            raise TypeError(f"rng must be a torch.Generator, got {type(rng).__name__}")
        if rng.device.type != device.type:
            raise ValueError(f"rng is on {rng.device}, expected a {device.type} generator")
    return rng


def _d_backward(d_backward):
    if d_backward is not None and not callable(d_backward):
        raise TypeError(f"d_backward must be callable or None, got {type(d_backward).__name__}")
    return d_backward


def _weight_tensor(weights, M: int, device: torch.device) -> Tensor:
    """The M weights, checked positive and finite, as a float64 tensor on ``device``."""
    w = v.weights("weights", weights, M, "M")
    if w is None:
        return torch.ones(M, dtype=torch.float64, device=device)
    if not isinstance(w, Tensor):  # numbers, checked one by one
        return torch.tensor(w, dtype=torch.float64).to(device)
    w = w.detach().to(device=device, dtype=torch.float64)
    # Construction is not the hot path: one host read to reject nonsense early.
    if not bool(torch.all(torch.isfinite(w) & (w > 0))):
        raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
    return w


class DiffMaxExceeded(RuntimeError):
    """:meth:`AnnealedCFG.train_stage` found ``|D(real) - D(fake)| > diff_max`` (design §1.4):
    where the official training loop stops (``break`` before the stage's approximator).

    Attributes:
        stage: the stage it happened in (the ``stage`` counter, which is not advanced).
        diff: the stage's ``D(real) - D(fake)`` as read on the host (``last_stage_diff``).
        diff_max: the threshold it exceeded.
    """

    def __init__(self, stage: int, diff: float, diff_max: float):
        self.stage, self.diff, self.diff_max = stage, diff, diff_max
        super().__init__(
            f"|D(real) - D(fake)| = {abs(diff):g} exceeded diff_max = {diff_max:g} in stage "
            f"{stage}: the official training loop stops here. This stage's discriminator phase "
            f"is done (D, its optimizer, the snapshots), its approximator was skipped (G is the "
            f"last completed stage's) and the stage counter stays at {stage}"
        )


class AnnealedCFG:
    """Annealed CFG (design §1): a generator ``G`` plus ``M`` discriminator snapshots.

    A sample is ``x_0 = G(z)`` moved by ``M`` functional-gradient steps,
    ``x_m = x_{m-1} + eta * w_m * s_m(x_{m-1}) * grad_x D_m(x_{m-1})``, where ``D_m`` is the
    ``m``-th snapshot of the discriminator taken during the current stage. One stage
    (:meth:`train_stage`) is::

        for t in 0..M-1:
            U times: xr = next real batch (B rows); z ~ z_std * N(0, I) of shape (B, *z_dim);
                     x = G(z) moved through snapshots 0..t-1;
                     one optimizer step of D on mean(softplus(-D(xr))) + mean(softplus(D(x)))
            snapshot t = copy of D (parameters and buffers)
        approximator: N pairs (z, x_M) through all M snapshots, generated in batches of
            batch_size (one z draw per batch); then x_epochs epochs, each over a fresh
            randperm(N), in batches of batch_size, of one optimizer step of G on
            sum((G(z) - x_M)^2) / (2 * batch); G's optimizer is created anew each stage.

    The stage's ``D(real) - D(fake)`` (``last_stage_diff``) is the official ``DDG.icfg``'s
    return value: over the ``U`` discriminator steps of the last snapshot (``t = M-1``; the
    official sums restart at each ``t``), the sum of ``D``'s outputs on the real batches minus
    the sum on the generated batches (every output of a sample counts), both as ``D`` gave them
    in the step's forward pass (before its optimizer step), divided by the number of real
    samples; summed in float64 on the device, with no host read. Two official checks read it:

    - NaN: the official stage raises when either sum is NaN. Here a ``RuntimeError`` naming the
      stage and the sum(s) that were NaN, raised at the stage's first host read: at the end of
      the discriminator phase when ``diff_max`` is given (where the official code raises), else
      with the approximator's first epoch mean (one transfer, before the lr rule; ``G`` has then
      taken that epoch's steps), else (``approx_decay=0`` and ``diff_max=None``: no host read)
      never -- read ``last_stage_diff`` yourself.
    - ``diff_max``: the official training loop stops, before the stage's approximator, when
      ``|D(real) - D(fake)| > diff_max`` in a stage whose 0-based index is at least 2000
      (``diff_max_after`` here). Here :class:`DiffMaxExceeded` is raised at that point, so the
      stop cannot go unnoticed: the discriminator phase is done (``D``, its optimizer and the
      snapshots are this stage's), the approximator is skipped (``G`` is the last completed
      stage's; :meth:`generate` gives the official model at its stop), ``stage`` is not
      advanced. A NaN value does not exceed ``diff_max`` (the NaN check above catches NaN sums).

    The discriminator and its optimizer persist across stages; the snapshots are overwritten
    each stage. ``G`` runs in eval mode while producing samples (as the official
    ``is_train=False``) and in train mode while it is fitted; its previous mode is restored.
    Snapshots run in the mode ``D`` was in when they were taken. Not included: the official
    ``initialize_G`` (fitting ``G`` to a random projection before the first stage) -- start from
    any ``G`` you like.

    Random numbers, in this order, from ``rng`` (or the global generator of the device): one
    ``torch.randn((B, *z_dim))`` per discriminator step, one ``torch.randn((n, *z_dim))`` per
    approximator batch to generate, one ``torch.randperm(N)`` per approximator epoch, all on the
    training device; ``z_std != 1`` multiplies the normal draw.

    Host syncs: none per step. The approximator's learning-rate rule of the official code
    (multiply lr by ``approx_decay`` when an epoch's mean loss went up, at most
    ``approx_redmax`` times per stage) reads that mean once per epoch; it also raises on a NaN
    mean there. ``approx_decay=0`` switches the rule off and with it those reads. ``diff_max``
    adds one host read per stage (``last_stage_diff`` and the two sums, at the end of the
    discriminator phase); with ``diff_max=None`` there is none beyond the lr rule's.

    Several processes (``torch.distributed``): pass ``DistributedDataParallel``-wrapped modules
    (or plain ones and ``process_group=``), each rank with its own real batches and its own
    ``rng`` (seed it per rank, or the ranks draw the same ``z``). The discriminator steps and the
    approximator's regression of ``G`` then average their gradients over the ranks (DDP's
    ``backward()``, or this class for a module that is not wrapped: it also copies such a
    module's parameters and buffers from the group's first rank at construction, as DDP does),
    and the approximator's epoch mean is averaged before its learning-rate rule reads it, so
    the parameters of ``G``, ``D`` and the snapshots and the optimizers stay identical on every
    rank. Buffers (BatchNorm's running statistics) are rank 0's in ``D`` at each snapshot and in
    ``G`` after each stage (broadcast then); a snapshot in train mode still updates its running
    statistics with each rank's samples while it moves them (its outputs use batch statistics,
    so they do not depend on them). Samples are
    moved with the unwrapped modules: ``generate`` runs per rank, with no collective, and each
    rank fits ``G`` on its own ``N`` samples (``N`` per rank). With ``d_backward`` the
    discriminator's gradients are its business (``AWLoss`` of the wrapped discriminator
    averages them). ``state_dict`` holds the unwrapped modules' states. ``last_stage_diff`` is
    the group's: the two sums and the sample count are averaged over the ranks at the end of
    each discriminator phase (one 24-byte all-reduce per stage), so every rank takes the same
    NaN and ``diff_max`` decisions.

    Args:
        generator: ``G``, an ``nn.Module`` mapping ``(B, *z_dim)`` to samples (or its DDP
            wrapper). Its output is
            updated in place by the functional-gradient steps, so it must be a fresh tensor
            (not a parameter or a view of one).
        discriminator: ``D``, an ``nn.Module`` mapping samples to one logit per sample
            (``(B,)`` or ``(B, 1)``; more outputs per sample are fine with ``scale="kl"``).
            Same device as ``G``. ``M`` deep copies are kept as snapshots.
        M: number of functional-gradient steps and of snapshots (cfg_T, 15 in the paper).
        eta: step size (cfg_eta; official 0.5/2.5/0.1 MNIST, 0.25/0.5 SVHN, 1.0/2.5/0.5
            LSUN-64), a positive Python number.
        weights: the annealed weight vector, a 1-D floating tensor or a sequence of ``M``
            positive numbers, e.g. ``nk.annealed_weights(1, 0.01, M)`` (below 128x128) or
            ``nk.annealed_weights(20, 1, M)`` (256x256) -- see
            :func:`~nats_kernels.schemes.preset_weights`.
            ``None`` (explicitly) is plain CFG, ``w = 1``. Checked positive and finite once,
            here; kept on the device in float32 (float64 for float64 samples).
        U: discriminator updates per snapshot (cfg_U).
        N: generated examples the approximator fits per stage (cfg_N).
        x_epochs: approximator epochs per stage (cfg_x_epo).
        lr: learning rate of D's and the approximator's optimizer (2.5e-4 official).
        batch_size: approximator batch size (the discriminator's batch is the real batch's).
        z_dim: latent shape, an int or a tuple of ints (e.g. ``(100, 1, 1)``).
        z_std: standard deviation of the latent normal.
        scale: per-sample factor ``s_m``: ``"kl"`` (s = 1, the official code), ``"logd"``
            (``sigmoid(-D_m(x))``) or ``"js"`` (``sigmoid(D_m(x))``); needs one logit per sample.
        optimizer: ``optimizer(params, lr) -> torch.optim.Optimizer`` for D (once) and for G
            (each stage); default :func:`default_optimizer`.
        approx_decay: lr factor of the approximator's rule (0.1 official; 0 disables it).
        approx_redmax: at most this many lr reductions per stage (3 official). ``None``: no
            limit; ``0``: no reduction at all; negative: refused. (The official code reads any
            value ``<= 0`` as no limit: write ``None`` for its ``0``.)
        diff_max: stop (raise :class:`DiffMaxExceeded`) when ``|last_stage_diff|`` exceeds this
            in a stage at or after ``diff_max_after``; a positive Python number (official
            ``--diff_max``, default 40 in ``train_cfggan.py``), or ``None`` (the default here):
            no check and no per-stage host read. The official ``<= 0`` ("off") is ``None`` here.
        diff_max_after: the first stage (the 0-based ``stage`` counter) the ``diff_max`` rule
            applies to: 2000, the official start-up phase (hard-coded there).
        rng: an optional ``torch.Generator`` on the training device for every draw above.
        d_backward: replaces the discriminator's ``loss.backward()``: called as
            ``d_backward(loss_real, loss_fake, real_logits, fake_logits)`` with the two
            terms of D's loss (``mean(softplus(-D(xr)))``, ``mean(softplus(D(x)))``) and the
            raw logits, it writes D's gradients and returns the loss to log -- e.g.
            ``AWLoss(discriminator).backward`` for aw-loss. Default: the sum's backward.
        process_group: the ``torch.distributed`` group for modules that are not DDP-wrapped;
            default: the wrappers' group, or none (one process).
        cuda_graph: ``True``: :meth:`generate` (and so the approximator's samples in
            :meth:`train_stage`) moves each batch by replaying a CUDA graph of the whole M-step
            loop, captured on first use per batch layout (shape, strides, dtype; a last partial
            batch gets its own graph; at most 8 layouts are kept; a capture runs the loop three
            times eagerly first and synchronizes the device, a replay never does; the warm-up
            runs' updates of snapshot buffers are undone). Same results as the eager
            loop (same kernels on the same addresses); the discriminator phase's moves stay
            eager. The graph bakes in ``eta``, ``scale``, the weights, the snapshot modules,
            their parameters' and buffers' storage, their train/eval flags, the backend
            override and the autocast state: a change to any of them is detected at the next
            :meth:`generate` call, which captures anew (values copied into the snapshots in
            place, as each stage does, need no new capture). Not detected, so not allowed: a
            snapshot's ``forward`` that changes what it computes without changing any of the
            above (e.g. a Python attribute it branches on). A snapshot that draws random
            numbers (dropout in train mode) gets other draws than the eager loop. CUDA only:
            ``ValueError`` on another device. With several processes each rank captures its
            own graphs (``generate`` runs per rank, with no collective). Design §1.4.

    Attributes:
        snapshots: the ``M`` discriminator copies. ``d_optimizer``: D's optimizer.
        stage: completed stages. ``last_d_loss``: D's loss of the last step (0-d, detached).
        last_approx_loss: the approximator's mean loss over its last epoch (0-d, detached).
        last_stage_diff: the last stage's ``D(real) - D(fake)`` (above): a 0-d float64 tensor on
            the training device, set at the end of each discriminator phase (also when a check
            then raises); ``None`` before the first stage.

    Raises:
        TypeError / ValueError: on arguments of the wrong type, range, length or device.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        *,
        M: int = 15,
        eta: float,
        weights: Tensor | Sequence[float] | None,
        U: int = 1,
        N: int = 640,
        x_epochs: int = 10,
        lr: float = 2.5e-4,
        batch_size: int = 64,
        z_dim: int | Sequence[int] = 100,
        z_std: float = 1.0,
        scale: str = "kl",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        approx_decay: float = 0.1,
        approx_redmax: int | None = 3,
        diff_max: float | None = None,
        diff_max_after: int = 2000,
        rng: torch.Generator | None = None,
        d_backward: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
        process_group=None,
        cuda_graph: bool = False,
    ):
        self.generator = _grads.module("generator", generator)
        self.discriminator = _grads.module("discriminator", discriminator)
        self.device, self.z_dtype = _device_and_z_dtype(generator, discriminator)
        self.M = v.integer("M", M, minimum=1)
        self.eta = v.positive("eta", eta)
        self.U = v.integer("U", U, minimum=1)
        self.N = v.integer("N", N, minimum=1)
        self.x_epochs = v.integer("x_epochs", x_epochs, minimum=1)
        self.lr = v.positive("lr", lr)
        self.batch_size = v.integer("batch_size", batch_size, minimum=1)
        self.z_shape = _z_shape(z_dim)
        self.z_std = v.positive("z_std", z_std)
        self.scale = _scale(scale)
        self.make_optimizer = _optimizer(optimizer)
        self.approx_decay = _approx_decay(approx_decay)
        self.approx_redmax = (None if approx_redmax is None
                              else v.integer("approx_redmax", approx_redmax, minimum=0))
        self.diff_max = _diff_max(diff_max)
        self.diff_max_after = v.integer("diff_max_after", diff_max_after, minimum=0)
        self.rng = _rng(rng, self.device)
        self.d_backward = _d_backward(d_backward)
        self.cuda_graph = v.flag("cuda_graph", cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs the models on a CUDA device, they are on {self.device} "
                f"(CUDA graphs exist on CUDA only; leave cuda_graph=False elsewhere)"
            )
        self._graphs = _cuda_graph.MoveGraphs() if self.cuda_graph else None
        self.weights = _weight_tensor(weights, self.M, self.device)
        self._weights_by_dtype: dict[torch.dtype, list[Tensor]] = {}
        self._join_group(process_group)

        self.snapshots = [copy.deepcopy(self._D) for _ in range(self.M)]
        for snap in self.snapshots:
            snap.requires_grad_(False)
        self._d_state = self._tensors(self._D)
        self._snap_states = [self._tensors(s) for s in self.snapshots]
        self.d_optimizer = self.make_optimizer(
            [p for p in discriminator.parameters() if p.requires_grad], self.lr
        )
        self.stage = 0
        self.last_d_loss: Tensor | None = None
        self.last_approx_loss: Tensor | None = None
        self.last_stage_diff: Tensor | None = None
        self._real_source = None
        self._real_iter = None

    def _join_group(self, process_group) -> None:
        """Several processes: the DDP wrappers (or process_group=) decide the group; samples are
        generated and moved with the unwrapped modules themselves (no collective per rank). Its
        own steps use backward(), so DDP's static_graph is fine here."""
        generator, discriminator = self.generator, self.discriminator
        self._sync = _comm.setup("AnnealedCFG", process_group, autograd_grad=False,
                                 generator=generator, discriminator=discriminator)
        self.process_group = self._sync.group
        self._G, self._D = _comm.unwrap(generator), _comm.unwrap(discriminator)
        self._sync_g = self._sync_d = False
        if self.process_group is not None:
            # A module that is not DDP-wrapped starts from rank 0's state (as DDP would) and has
            # its gradients averaged here; D's only when this class runs its backward.
            self._sync_g = not _comm.is_ddp(generator)
            self._sync_d = not _comm.is_ddp(discriminator) and self.d_backward is None
            for module, wrapped in ((generator, self._sync_g),
                                    (discriminator, not _comm.is_ddp(discriminator))):
                if wrapped:
                    _comm.broadcast_module(module, self.process_group)

    @staticmethod
    def _tensors(module: nn.Module) -> list[Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _step_weights(self, dtype: torch.dtype) -> list[Tensor]:
        """The M weights as 0-d device tensors in the accumulation dtype of ``dtype``."""
        acc = v.acc_dtype(dtype)
        ws = self._weights_by_dtype.get(acc)
        if ws is None:
            ws = list(self.weights.to(acc).unbind(0))
            self._weights_by_dtype[acc] = ws
        return ws

    # ------------------------------------------------------------------------------ sampling

    def _z(self, n: int) -> Tensor:
        z = torch.randn((n, *self.z_shape), generator=self.rng, device=self.device,
                        dtype=self.z_dtype)
        return z if self.z_std == 1.0 else z * self.z_std

    def _g_eval(self, z: Tensor) -> Tensor:
        """G(z) in eval mode, as a private copy the CFG steps may write in place: a generator
        output may share memory with z, a parameter, a buffer, an attribute or a preallocated
        output buffer (e.g. ``nn.Identity``, a learnt point set returned as is, a CUDA-graph
        static output), and moving samples must change none of them. One batch copy, next to
        the M forward/backward passes of the snapshots."""
        g = self._G
        was_training = g.training
        g.eval()
        try:
            with torch.no_grad():
                x = g(z)
        except Exception as e:  # the user's model failed: say what it was given
            e.add_note(f"(AnnealedCFG called the generator with z of shape {tuple(z.shape)}, "
                       f"dtype {z.dtype}: z_dim={self.z_shape}, z_dtype={self.z_dtype})")
            raise
        finally:
            g.train(was_training)
        if not isinstance(x, Tensor):
            raise TypeError(f"generator must return a tensor, got {type(x).__name__}")
        return x.clone()

    def _move(self, x: Tensor, steps: int) -> Tensor:
        """x through snapshots 0..steps-1, in place: x += eta * w_m * s_m * grad_x D_m(x)."""
        if steps == 0:
            return x
        if not x.is_floating_point():
            raise TypeError(f"generator output must be floating, got {x.dtype}")
        ws = self._step_weights(x.dtype)
        batch = x.shape[0]
        eta, scale, snapshots = self.eta, self.scale, self.snapshots
        with torch.enable_grad():  # once, not per step; the steps themselves record nothing
            for m in range(steps):
                xg = x.detach().requires_grad_(True)
                d = snapshots[m](xg)  # grad of d.sum(), as the official backward(ones_like)
                (grad,) = torch.autograd.grad(d, xg, torch.ones_like(d))
                s = None
                if scale != "kl":
                    if d.numel() != batch:
                        raise ValueError(
                            f"scale={scale!r} needs one discriminator output per sample, got "
                            f"shape {tuple(d.shape)} for {batch} samples"
                        )
                    logit = d.detach().reshape(batch)
                    s = torch.sigmoid(-logit) if scale == "logd" else torch.sigmoid(logit)
                cfg_step_(x, grad, ws[m], eta=eta, scale=s)
        return x

    def _move_all(self, x: Tensor) -> Tensor:
        """The loop a CUDA graph captures: ``x`` through all ``M`` snapshots, in place."""
        return self._move(x, self.M)

    def _graph_state(self, steps: int, dtype: torch.dtype) -> tuple[tuple, tuple]:
        """The signature of what a captured loop of ``steps`` steps on ``dtype`` samples bakes in
        (``cuda_graph=True``), and the objects it names (kept alive with the graphs).

        By value: ``steps``, ``eta``, ``scale``, the ``NATS_KERNELS_BACKEND`` override (which
        kernel ``cfg_step_`` launches), the autocast state and every snapshot submodule's
        ``training`` flag. By identity and address: the step weights (replaced by
        ``load_state_dict``), the snapshot modules and their parameters and buffers (``_snapshot``
        and ``load_state_dict`` copy into them in place, which a graph sees; replacing one, e.g.
        ``load_state_dict(assign=True)``, changes the signature). Host work only, no device read.
        """
        ws = self._step_weights(dtype)
        snaps = self.snapshots[:steps]
        tensors = [t for s in snaps for t in (*s.parameters(), *s.buffers())]
        state = (
            steps, dtype, self.eta, self.scale, os.environ.get(_BACKEND_ENV),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            tuple((id(w), w.data_ptr()) for w in ws),
            tuple(id(s) for s in snaps),
            tuple((id(t), t.data_ptr()) for t in tensors),
            tuple(m.training for s in snaps for m in s.modules()),
        )
        return state, (ws, snaps, tensors)

    def generate(self, n: int, *, batch_size: int | None = None, return_z: bool = False):
        """``n`` samples ``G(z)`` moved through all ``M`` snapshots, on the training device.

        Under ``torch.no_grad`` except the input-gradient computations. Draws one
        ``randn((b, *z_dim))`` per batch of ``batch_size`` (default: all ``n`` at once).
        With ``cuda_graph=True`` each batch's M steps are one CUDA-graph replay, captured on
        the first batch of its layout (the class's ``cuda_graph`` argument).

        Returns:
            the ``(n, ...)`` samples (detached), or ``(samples, z)`` with ``return_z=True``.
        """
        n = v.integer("n", n, minimum=1)
        batch_size = v.integer("batch_size", n if batch_size is None else batch_size, minimum=1)
        return_z = v.flag("return_z", return_z)
        xs, zs = [], []
        graphs, state_dtype = self._graphs, None
        for start in range(0, n, batch_size):
            z = self._z(min(batch_size, n - start))
            x = self._g_eval(z)
            if graphs is None or not x.is_floating_point():
                x = self._move(x, self.M)  # (a non-floating x raises there)
            else:
                if x.dtype != state_dtype:  # once per call: the check is host work per snapshot
                    graphs.use_state(*self._graph_state(self.M, x.dtype))
                    state_dtype = x.dtype
                x = graphs.move(x, self._move_all, self.snapshots)
            xs.append(x)
            zs.append(z)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        if return_z:
            return x, (zs[0] if len(zs) == 1 else torch.cat(zs))
        return x

    # ------------------------------------------------------------------------------ training

    def _next_real(self, needed: int, got: int) -> Tensor:
        try:
            batch = next(self._real_iter)
        except StopIteration:
            if self._real_iter is self._real_source:  # a one-shot iterator: cannot restart
                raise RuntimeError(
                    f"real_batches ran out: a stage takes M * U = {needed} batches, this one "
                    f"got {got}; pass a re-iterable (list, DataLoader) to have it restarted"
                ) from None
            self._real_iter = iter(self._real_source)
            try:
                batch = next(self._real_iter)
            except StopIteration:
                raise ValueError("real_batches is empty") from None
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]  # (images, labels) from a DataLoader
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"real_batches must yield tensors or (tensor, ...) tuples, got "
                f"{type(batch).__name__}"
            )
        if not batch.is_floating_point():
            raise TypeError(
                f"real_batches yields {batch.dtype} tensors; the discriminator takes floating "
                f"samples (convert them, e.g. images to float in [-1, 1])"
            )
        if batch.dim() == 0 or batch.shape[0] == 0:
            raise ValueError(
                f"real_batches must yield batches (B, ...) with B >= 1, got shape "
                f"{tuple(batch.shape)}"
            )
        return batch.to(self.device, non_blocking=True)

    def _snapshot(self, t: int) -> None:
        if self.process_group is not None:  # running statistics differ per rank: take rank 0's
            _comm.broadcast_module(self._D, self.process_group, parameters=False)
        with torch.no_grad():
            torch._foreach_copy_(self._snap_states[t], self._d_state)
        self.snapshots[t].train(self.discriminator.training)

    def train_stage(self, real_batches: Iterable) -> None:
        """One stage: ``M * U`` discriminator steps with ``M`` snapshots, then the approximator.

        Args:
            real_batches: where real batches come from; exactly ``M * U`` are consumed per
                stage. Each item is a tensor ``(B, ...)`` or a tuple/list whose first element is
                (e.g. ``(images, labels)``); it is moved to the training device (a no-op when it
                is there already). A re-iterable (list, ``DataLoader``) passed again in the next
                stage continues where the last stage stopped and is restarted when exhausted
                (as the official ``get_next``); a one-shot iterator that runs out raises.

        Raises:
            TypeError: a batch that is not a tensor (or a tuple/list starting with one), or of
                a non-floating dtype.
            ValueError: an empty batch, or samples with another number of values than the
                generator's (checked before the discriminator sees them; another layout of as
                many values, e.g. (1, 28, 28) against (784,), is left to the discriminator).
            RuntimeError: a one-shot iterator that runs out within the stage; NaN in the sums of
                ``D``'s outputs behind ``last_stage_diff`` (see the class docstring for when that
                is checked) or in the approximator's epoch mean, naming the stage.
            DiffMaxExceeded: ``|last_stage_diff| > diff_max`` (a ``RuntimeError``; class
                docstring): where the official training loop stops.
        """
        if real_batches is not self._real_source:
            self._real_source = real_batches
            self._real_iter = iter(real_batches)
        needed = self.M * self.U
        D, opt = self.discriminator, self.d_optimizer
        got = 0
        # The official icfg's sum_real, sum_fake, count: restarted at each t, so only the last
        # snapshot's U steps are kept (on the device, in float64 as the official Python floats).
        sum_real = sum_fake = None
        count = 0
        for t in range(self.M):
            for _ in range(self.U):
                xr = self._next_real(needed, got)
                got += 1
                x = self._move(self._g_eval(self._z(xr.shape[0])), t)
                if xr[0].numel() != x[0].numel():  # another layout of as many values is D's
                    raise ValueError(       # business (e.g. (1, 28, 28) images, (784,) samples)
                        f"real_batches yields samples of shape {tuple(xr.shape[1:])} "
                        f"({xr[0].numel()} values) but the generator's samples have shape "
                        f"{tuple(x.shape[1:])} ({x[0].numel()} values); the discriminator sees "
                        f"both"
                    )
                opt.zero_grad(set_to_none=True)
                real_logits, fake_logits = D(xr), D(x)
                loss_real = F.softplus(-real_logits).mean()
                loss_fake = F.softplus(fake_logits).mean()
                if self.d_backward is None:
                    loss = loss_real + loss_fake
                    loss.backward()
                    if self._sync_d:
                        self._average_grads(D)
                else:
                    loss = self.d_backward(loss_real, loss_fake, real_logits, fake_logits)
                opt.step()
                self.last_d_loss = loss.detach()
                if t == self.M - 1:
                    r = real_logits.detach().sum(dtype=torch.float64)
                    f = fake_logits.detach().sum(dtype=torch.float64)
                    sum_real = r if sum_real is None else sum_real + r
                    sum_fake = f if sum_fake is None else sum_fake + f
                    count += xr.shape[0]
            self._snapshot(t)
        sums = self._stage_diff(sum_real, sum_fake, count)
        if self.diff_max is not None:
            self._check_stage(sums)
            sums = None  # checked: nothing left for the approximator's first read
        self._approximate(sums)
        if self.process_group is not None:
            _comm.broadcast_module(self._G, self.process_group, parameters=False)
        self.stage += 1

    def _stage_diff(self, sum_real: Tensor, sum_fake: Tensor, count: int) -> Tensor:
        """Set ``last_stage_diff`` = (sum_real - sum_fake) / count (averaged over the ranks of a
        group first: one all-reduce of three numbers) and return the two sums, (2,) float64."""
        sums = torch.stack([sum_real, sum_fake])
        if self.process_group is None:
            self.last_stage_diff = (sums[0] - sums[1]) / count
            return sums
        buf = torch.cat([sums, sums.new_full((1,), count)])  # a fill: no host-to-device copy
        _comm.all_reduce_mean_([buf], self.process_group)
        self.last_stage_diff = (buf[0] - buf[1]) / buf[2]
        return buf[:2]

    def _raise_if_d_nan(self, sum_real: float, sum_fake: float) -> None:
        """The official ``raise_if_nan(sum_real); raise_if_nan(sum_fake)``, naming the stage."""
        nan = [name for name, value in (("D(real)", sum_real), ("D(fake)", sum_fake))
               if math.isnan(value)]
        if nan:
            raise RuntimeError(
                f"discriminator output is NaN in stage {self.stage}: the sum of "
                f"{' and of '.join(nan)} over the last snapshot's U = {self.U} step(s) is NaN "
                f"(last_stage_diff holds the stage's value)"
            )

    def _check_stage(self, sums: Tensor) -> None:
        """The official per-stage checks with ``diff_max`` given: one host read of the two sums
        and ``last_stage_diff``, then NaN (raise) and the ``diff_max`` rule (class docstring)."""
        sum_real, sum_fake, diff = torch.cat(
            [sums, self.last_stage_diff.reshape(1)]).tolist()  # the stage's one host read
        self._raise_if_d_nan(sum_real, sum_fake)
        if self.stage >= self.diff_max_after and abs(diff) > self.diff_max:
            raise DiffMaxExceeded(self.stage, diff, self.diff_max)

    def _approximate(self, d_sums: Tensor | None = None) -> None:
        """The approximator. ``d_sums``: the discriminator phase's two sums, not yet checked for
        NaN; read along with the first epoch mean the lr rule reads (no read of their own)."""
        n_total, bs = self.N, self.batch_size
        targets, zs = self.generate(n_total, batch_size=bs, return_z=True)
        G = self.generator
        params = [p for p in G.parameters() if p.requires_grad]
        opt = self.make_optimizer(params, self.lr)
        was_training = G.training
        G.train()
        reductions, last_mean = 0, math.inf
        try:
            for _ in range(self.x_epochs):
                perm = torch.randperm(n_total, generator=self.rng, device=self.device)
                total = torch.zeros((), device=self.device, dtype=v.acc_dtype(targets.dtype))
                batches = 0
                for start in range(0, n_total, bs):
                    idx = perm[start : start + bs]
                    fake = G(zs[idx])
                    loss = ((fake - targets[idx]) ** 2).sum() / (2 * idx.shape[0])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if self._sync_g:
                        self._average_grads(G)
                    opt.step()
                    total += loss.detach()
                    batches += 1
                mean = total / batches
                if self.process_group is not None:  # every rank decays lr alike
                    _comm.all_reduce_mean_([mean.reshape(1)], self.process_group)
                self.last_approx_loss = mean
                if self.approx_decay > 0:
                    if d_sums is not None:  # the same single read, D's NaN check riding along
                        value, sum_real, sum_fake = torch.cat(
                            [mean.reshape(1).to(torch.float64), d_sums]).tolist()
                        d_sums = None
                        self._raise_if_d_nan(sum_real, sum_fake)
                    else:
                        value = float(mean)  # the one host read per epoch (see class docstring)
                    if math.isnan(value):
                        raise RuntimeError(f"approximator loss is NaN in stage {self.stage}")
                    limit_ok = self.approx_redmax is None or reductions < self.approx_redmax
                    if value > last_mean and limit_ok:
                        for group in opt.param_groups:
                            group["lr"] = group["lr"] * self.approx_decay
                        reductions += 1
                    last_mean = value
        finally:
            G.train(was_training)

    def _average_grads(self, module: nn.Module) -> None:
        """Average the ``.grad`` of ``module``'s trainable parameters over the ranks (for a module
        that is not DDP-wrapped; a parameter without ``.grad`` counts as zeros there and keeps
        None here)."""
        params = [p for p in module.parameters() if p.requires_grad]
        _comm.average_in_place_([p.grad for p in params], params, self.process_group,
                                self._sync.bucket_bytes)

    # --------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Generator, discriminator, snapshots, D's optimizer, weights, eta and the stage
        counter. (G's optimizer is recreated each stage, so there is none to save; the position
        in ``real_batches`` and the random generator's state are the caller's.)"""
        return {
            "generator": self._G.state_dict(),
            "discriminator": self._D.state_dict(),
            "snapshots": [s.state_dict() for s in self.snapshots],
            "d_optimizer": self.d_optimizer.state_dict(),
            "weights": self.weights.clone(),
            "eta": self.eta,
            "stage": self.stage,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (into modules of the same architecture)."""
        missing = {"generator", "discriminator", "snapshots", "d_optimizer", "weights", "eta",
                   "stage"} - set(state)
        if missing:
            raise KeyError(f"state dict lacks {sorted(missing)}")
        if len(state["snapshots"]) != self.M:
            raise ValueError(
                f"state dict holds {len(state['snapshots'])} snapshots, this AnnealedCFG M = "
                f"{self.M}"
            )
        self._G.load_state_dict(state["generator"])
        self._D.load_state_dict(state["discriminator"])
        for snap, sd in zip(self.snapshots, state["snapshots"]):
            snap.load_state_dict(sd)
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.weights = _weight_tensor(state["weights"], self.M, self.device)
        self._weights_by_dtype = {}
        self.eta = v.positive("eta", state["eta"])
        self.stage = v.integer("stage", state["stage"], minimum=0)
