"""Adaptive weighted discriminator loss (aw-loss, design §4) as a drop-in for
``d_loss.backward()``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate as v
from ..distributed import _comm
from ..ops import aw_combine_, aw_weights, multi_dot
from . import _grads

__all__ = ["AWLoss"]


# ------------------------------------------------------------------------------- AWLoss


class AWLoss:
    """Adaptive weighted discriminator loss (Zadorozhnyy et al., CVPR 2021), design §4/§7.

    Replaces ``d_loss.backward()`` in a discriminator step that computes a real-only term ``L_r``
    and a fake-only term ``L_f`` (hinge, BCE, LSGAN, ...)::

        aw = AWLoss(D)                                   # once
        real_logits, fake_logits = D(real), D(fake.detach())
        loss_real = relu(1 - real_logits).mean()
        loss_fake = relu(1 + fake_logits).mean()
        opt_d.zero_grad()                                # optional: .grad is overwritten
        d_loss = aw.backward(loss_real, loss_fake, real_logits, fake_logits)
        opt_d.step()

    ``backward`` takes ``g_r = dL_r/dtheta`` and ``g_f = dL_f/dtheta`` with
    :func:`torch.autograd.grad` over the discriminator's parameters that require grad (two
    backward passes; the first keeps the graph only when the two losses share autograd nodes,
    the second frees it, as ``d_loss.backward()`` would), decides ``(w_r, w_f)`` on device with
    :func:`nats_kernels.multi_dot` and :func:`nats_kernels.aw_weights` and writes
    ``w_r * g_r + w_f * g_f`` into each parameter's ``.grad`` with
    :func:`nats_kernels.aw_combine_`. No gradient is copied or concatenated and no value is read
    on the host: the call is asynchronous on CUDA like ``backward()``. Memory: the two gradient
    sets; where ``.grad`` is None the freshly returned ``g_r`` becomes the output buffer and the
    ``.grad`` (when autograd handed it out for this parameter alone, with the parameter's strides
    and no tensor hook on the parameter; as with ``backward()``, a custom autograd Function that
    returns, as a gradient, a tensor it keeps elsewhere would see that tensor overwritten).

    ``.grad`` after the call, per discriminator parameter:

    - requires grad, used by either loss: ``w_r * g_r + w_f * g_f`` (a gradient missing from one
      pass counts as zero). Any previous ``.grad`` is overwritten: in place when it is a dense
      tensor outside any autograd graph and not one of the gradients being combined (so gradient
      buckets such as DDP's stay valid), else replaced by a new tensor;
    - requires grad, used by neither loss: ``None``, as after ``zero_grad()`` and ``backward()``;
    - ``requires_grad=False`` (frozen): not touched.

    Several processes (``torch.distributed``): pass the ``DistributedDataParallel``-wrapped
    discriminator (or a plain module and ``process_group=``). ``torch.autograd.grad`` never fires
    DDP's gradient hooks, so the call reduces itself: ``g_r`` and ``g_f`` are averaged over the
    ranks in flat buffers of DDP's bucket size (one all-reduce per bucket, all in flight at
    once: twice the volume of DDP's own gradient all-reduce, plus one of six float64 numbers
    for the logits' sigmoid sums and counts and the two losses). The rule is then decided on the
    global gradients and the global sigmoid means, so every rank ends the call with the same
    ``.grad``, ``last_weights`` and ``last_case``, equal to float tolerance to one process on
    the concatenation of all ranks' batches (when every rank's losses are means over equally
    sized local batches, DDP's own condition). Nothing is read on the host. Each rank must hold
    the same trainable parameters (checked at construction) and, by default, reach the same
    ones (a parameter no loss reached on this rank keeps ``.grad`` None, as DDP's default
    ``find_unused_parameters=False`` assumes); a wrapper made with
    ``find_unused_parameters=True`` has the ranks exchange which parameters they reached (in the
    same all-reduce as the statistics) and read that map on the host once per call, as DDP does
    then, so a parameter reached on another rank only gets its averaged gradient here too.
    ``static_graph=True`` wrappers are refused (DDP would record a graph without these passes
    and stop synchronizing later ``backward()`` calls); ``no_sync()`` is not honoured (every
    call averages). Memory: a flat copy of both gradient sets.

    Args:
        discriminator: the ``nn.Module`` whose trainable parameters take the gradient, or its
            ``DistributedDataParallel`` wrapper. Parameters are looked up at each call, so
            freezing / unfreezing between calls is honoured (identically on every rank).
            All trainable parameters on one device; several floating dtypes are fine.
        normalized: ``True`` for Algorithm 1 (the paper's default, weights scaled by the inverse
            gradient norms), ``False`` for Algorithm 2.
        alpha1, alpha2, delta, eps: the rule's constants (design §4), finite Python numbers;
            ``eps >= 0``.
        process_group: the ``torch.distributed`` group to average over when the discriminator
            is not DDP-wrapped (e.g. ``torch.distributed.group.WORLD``); default: the DDP
            wrapper's group, or none (one process). A group of one rank reduces nothing.

    Attributes:
        last_weights: ``(w_r, w_f)`` of the last call, 0-d device tensors (float32, float64 when a
            parameter is float64), or ``None`` before the first call.
        last_case: the rule's case (1..5) of the last call, a 0-d int64 device tensor, for logging.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        *,
        normalized: bool = True,
        alpha1: float = 0.5,
        alpha2: float = 0.75,
        delta: float = 0.05,
        eps: float = 0.05,
        process_group=None,
    ) -> None:
        self.discriminator = _grads.module("discriminator", discriminator)
        params = _grads.trainable("discriminator", discriminator)
        self._sync = _comm.setup("AWLoss", process_group, {"discriminator": params},
                                 discriminator=discriminator)
        self.process_group = self._sync.group
        self.normalized = v.flag("normalized", normalized)
        self.alpha1 = v.finite("alpha1", alpha1)
        self.alpha2 = v.finite("alpha2", alpha2)
        self.delta = v.finite("delta", delta)
        self.eps = v.finite("eps", eps, minimum=0.0)
        self.last_weights: tuple[Tensor, Tensor] | None = None
        self.last_case: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(normalized={self.normalized}, alpha1={self.alpha1}, "
            f"alpha2={self.alpha2}, delta={self.delta}, eps={self.eps})"
        )

    def backward(
        self, loss_real: Tensor, loss_fake: Tensor, real_logits: Tensor, fake_logits: Tensor
    ) -> Tensor:
        """Write the aw-loss gradient into the discriminator's ``.grad``; return the loss.

        Args:
            loss_real: L_r, a one-element loss on real data only, not yet backpropagated.
            loss_fake: L_f, a one-element loss on fake data only.
            real_logits, fake_logits: the raw discriminator outputs the losses were computed from
                (any non-empty shape; only ``mean(sigmoid(.))`` of their values is used).
                All four on the discriminator's device.

        Returns:
            The detached aw loss ``w_r * L_r + w_f * L_f``, 0-d, in the losses' (promoted) dtype.

        Raises:
            TypeError: a non-tensor or non-floating argument.
            ValueError: a loss with more than one element, a loss that does not require grad or
                does not depend on any trainable discriminator parameter, empty logits, arguments
                on another device, a discriminator without trainable parameters.
        """
        params = _grads.trainable("discriminator", self.discriminator)
        device = params[0].device
        _grads.loss("loss_real", loss_real, device)
        _grads.loss("loss_fake", loss_fake, device)
        for name, t in (("real_logits", real_logits), ("fake_logits", fake_logits)):
            v.tensor(name, t)
            v.same_device(device, **{name: t})
            if t.numel() == 0:
                raise ValueError(f"{name} must not be empty (its sigmoid mean decides the case)")

        retain = _grads.shares_graph(loss_real, loss_fake)
        g_r = torch.autograd.grad(loss_real, params, retain_graph=retain, allow_unused=True)
        if all(g is None for g in g_r):
            raise ValueError(
                "loss_real does not depend on any trainable parameter of the discriminator"
            )
        g_f = torch.autograd.grad(loss_fake, params, allow_unused=True)
        if all(g is None for g in g_f):
            raise ValueError(
                "loss_fake does not depend on any trainable parameter of the discriminator"
            )
        losses = (_grads.scalar(loss_real), _grads.scalar(loss_fake))
        if self.process_group is not None:
            g_r, g_f, real_logits, fake_logits, losses = self._global(
                params, g_r, g_f, real_logits, fake_logits, losses
            )

        counts = _grads.storage_counts(g_r, g_f)
        zeros: dict = {}
        groups: dict[torch.dtype, tuple[list, list, list]] = {}
        for p, gr, gf in zip(params, g_r, g_f):
            if gr is None and gf is None:
                p.grad = None
                continue
            old = p.grad
            if (old is not None and not old.requires_grad and v.dense(old)
                    and _grads.storage_key(old) not in counts):
                out = old
            elif _grads.writable_as_grad(gr, p, counts):
                out = gr
            else:
                out = torch.empty_like(p, memory_format=torch.preserve_format)
            outs, rs, fs = groups.setdefault(p.dtype, ([], [], []))
            outs.append(out)
            rs.append(_grads.zeros(p, zeros) if gr is None else gr)
            fs.append(_grads.zeros(p, zeros) if gf is None else gf)
            if old is not out:
                p.grad = out

        acc = v.acc_dtype(*groups)
        if len(groups) == 1:
            ((_, rs, fs),) = groups.values()
            dots = multi_dot(rs, fs)
        else:
            dots = sum(multi_dot(rs, fs).to(acc) for _, rs, fs in groups.values())
        w_r, w_f, case = aw_weights(
            dots,
            real_logits.detach(),
            fake_logits.detach(),
            normalized=self.normalized,
            alpha1=self.alpha1,
            alpha2=self.alpha2,
            delta=self.delta,
            eps=self.eps,
        )
        for dtype, (outs, rs, fs) in groups.items():
            a = v.acc_dtype(dtype)
            aw_combine_(outs, rs, fs, _grads.to(w_r, a), _grads.to(w_f, a))

        self.last_weights = (w_r, w_f)
        self.last_case = case
        out_dtype = torch.promote_types(loss_real.dtype, loss_fake.dtype)
        loss = w_r * losses[0] + w_f * losses[1]
        return _grads.to(loss, out_dtype)

    def _global(self, params, g_r, g_f, real_logits, fake_logits, losses):
        """What one process would see on the whole batch: g_r and g_f averaged over the ranks
        (flat buffers, a few all-reduces), the sigmoid means of all ranks' logits (handed to the
        rule as one logit each, ``logit(mean)``, in float64) and the two losses averaged. A
        parameter that neither loss reached on this rank keeps ``.grad`` None; the others use
        the averages. One float64 all-reduce of six numbers rides along; nothing is read on the
        host."""
        def stats(logits):
            s = torch.sigmoid(logits.detach().to(torch.float64))
            return s.sum(), s.new_full((), float(s.numel()))

        sum_r, n_r = stats(real_logits)
        sum_f, n_f = stats(fake_logits)
        extra = torch.stack([sum_r, n_r, sum_f, n_f, losses[0].to(torch.float64),
                             losses[1].to(torch.float64)])
        n = len(params)
        used = [a is not None or b is not None for a, b in zip(g_r, g_f)]
        sync = self._sync
        if sync.find_unused:  # the parameters reached may differ between ranks
            extra = torch.cat([extra, _comm.used_flags(used, extra)])
        views = _comm.mean_over_ranks(
            list(g_r) + list(g_f), params + params, sync.group, sync.bucket_bytes, extra
        )
        if sync.find_unused:  # one host read, as DDP's find_unused_parameters makes
            used = (extra[6:] > 0).tolist()
        g_r = [vw if u else None for vw, u in zip(views[:n], used)]
        g_f = [vw if u else None for vw, u in zip(views[n:], used)]
        real = torch.logit(extra[0] / extra[1]).reshape(1)
        fake = torch.logit(extra[2] / extra[3]).reshape(1)
        return g_r, g_f, real, fake, (extra[4].to(losses[0].dtype), extra[5].to(losses[1].dtype))
