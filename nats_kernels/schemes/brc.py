"""Best-response constraint with the implicit gradient approximation (BRC / IGA, design §5) as a
drop-in for the generator's ``g_loss.backward()``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate as v
from ..distributed import _comm
from ..ops import iga_correction_, iga_ratio, multi_dot
from . import _grads

__all__ = ["BRC"]


class BRC:
    """Best-response constraint (Liu, Gao, Liu, Fan) with the implicit gradient approximation.

    Replaces ``g_loss.backward()`` in the generator step. The discriminator loss ``f`` must be
    evaluated on the same fake batch as the generator loss ``F``, **not detached**::

        brc = BRC(G, D)                                   # once
        fake = G(z)                                       # no .detach()
        fake_logits = D(fake)
        F = bce(fake_logits, ones)                        # generator loss
        f = bce(D(real), ones) + bce(fake_logits, zeros)  # discriminator loss, same fake
        opt_g.zero_grad()
        r = brc.backward(F, f)                            # instead of F.backward()
        opt_g.step()

    With ``D`` and ``G`` the trainable parameters (``requires_grad=True``) of the two modules,
    ``backward`` runs two backward passes, ``df/d(D, G)`` and ``dF/d(D, G)`` (the first keeps the
    graph only when F and f share autograd nodes, as they do through the fake logits; the second
    frees it), then on device

        r = <df/dD, dF/dD> / (<df/dD, df/dD> + eps)             (nats_kernels.iga_ratio)
        generator gradient = dF/dG - r * df/dG                  (nats_kernels.iga_correction_)

    and accumulates the generator gradient into the generator parameters' ``.grad`` the way
    ``loss.backward()`` does: set where ``.grad`` is None (the freshly returned dF/dG becomes
    ``.grad`` and takes the correction in place), added in place otherwise (a stale ``.grad`` that
    is expanded, part of an autograd graph or one of this call's gradients is replaced by a new
    tensor holding the sum). A generator parameter that neither loss depends on keeps its
    ``.grad``; one that only f depends on gets ``-r * df/dG``; gradients missing from one of the
    two passes count as zero. The discriminator's ``.grad`` is not read or written (same tensors,
    same values). No value is read on the host: the call is asynchronous on CUDA like
    ``backward()``. Cost: two backward passes through D and G (design §5's alternative, two passes
    stopping at D and one of ``F - r f`` into G, runs through D three times).

    r changes sign with the sign convention of f (``f`` or ``-f``); the generator update does not.

    Do not freeze the discriminator (``requires_grad_(False)``) around the generator step: r
    needs the gradients with respect to its parameters. Frozen discriminator parameters are left
    out of r.

    Several processes (``torch.distributed``): pass the ``DistributedDataParallel``-wrapped
    modules (either or both; or plain modules and ``process_group=``). DDP's gradient hooks do
    not fire under ``torch.autograd.grad``, so the call reduces itself: df/dD and dF/dD are
    averaged over the ranks (flat buffers of DDP's bucket size, one all-reduce per bucket: twice
    the discriminator's gradient volume) and r is computed from the averages; the correction is
    linear once r is global, so each rank's corrected generator gradient is averaged once (the
    generator's gradient volume) and then accumulated into ``.grad`` as above. Every rank ends
    with the same r and ``.grad``, equal to float tolerance to one process on the concatenation
    of all ranks' batches (when each rank's losses are means over equally sized local batches).
    A freshly set ``.grad`` is a view of the flat buffer (as DDP's ``gradient_as_bucket_view``).
    Each rank must hold the same trainable parameters (checked at construction) and reach the
    same ones, unless a wrapper has ``find_unused_parameters=True``: then the ranks exchange
    which parameters they reached (with the first all-reduce) and read that map on the host once
    per call, as DDP does. Otherwise nothing is read on the host. ``static_graph=True`` wrappers
    are refused, ``no_sync()`` is not honoured (as for :class:`AWLoss`).

    Args:
        generator, discriminator: ``nn.Module``s (or their ``DistributedDataParallel``
            wrappers) with no parameter in common; each module's trainable parameters on one
            device (the same device for both).
        eps: a finite, non-negative Python number added to the denominator of r.
        process_group: the ``torch.distributed`` group to average over when neither module is
            DDP-wrapped; default: the wrappers' group (they must agree), or none.

    Attributes:
        last_ratio: r of the last call (0-d device tensor), or ``None`` before the first call.

    Raises:
        TypeError: a non-module argument or a non-number eps.
        ValueError: a parameter shared by the two modules, a negative or non-finite eps, a module
            without trainable parameters.
    """

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, *, eps: float = 1e-12,
        process_group=None,
    ):
        self.generator = _grads.module("generator", generator)
        self.discriminator = _grads.module("discriminator", discriminator)
        in_d = {id(p) for p in discriminator.parameters()}
        shared = [n for n, p in generator.named_parameters() if id(p) in in_d]
        if shared:
            raise ValueError(
                f"generator and discriminator share parameter(s) {', '.join(shared)}; BRC needs "
                f"the two players' parameters to be disjoint"
            )
        p_g = _grads.trainable("generator", generator)
        p_d = _grads.trainable("discriminator", discriminator)
        self._sync = _comm.setup("BRC", process_group, {"discriminator": p_d, "generator": p_g},
                                 discriminator=discriminator, generator=generator)
        self.process_group = self._sync.group
        self.eps = v.nonnegative("eps", eps)
        self.last_ratio: Tensor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"

    def backward(self, F: Tensor, f: Tensor) -> Tensor:
        """Accumulate ``dF/dG - r * df/dG`` into the generator's ``.grad``; return r.

        Args:
            F: the generator loss, one element, not yet backpropagated.
            f: the discriminator loss on the same, non-detached fake batch, one element.

        Returns:
            r, a detached 0-d tensor on the parameters' device, float32 (float64 when a
            discriminator parameter is float64).

        Raises:
            TypeError: a non-tensor or non-floating loss.
            ValueError: a loss with more than one element or that does not require grad, on
                another device; f that does not depend on the generator (the fake batch was
                detached) or on the discriminator; F that does not depend on the generator;
                a module without trainable parameters or with parameters on two devices.
        """
        p_d = _grads.trainable("discriminator", self.discriminator)
        p_g = _grads.trainable("generator", self.generator)
        device = p_d[0].device
        v.same_device(device, **{"generator parameters": p_g[0]})
        _grads.loss("F", F, device)
        _grads.loss("f", f, device)
        n_d = len(p_d)
        params = p_d + p_g

        retain = _grads.shares_graph(f, F)
        g_f = torch.autograd.grad(f, params, retain_graph=retain, allow_unused=True)
        gf_d, gf_g = g_f[:n_d], g_f[n_d:]
        if all(g is None for g in gf_g):
            raise ValueError(
                "f does not depend on the generator's parameters: the discriminator loss must be "
                "computed on the fake batch G(z) without .detach() (a detached fake batch turns "
                "the best-response correction off)"
            )
        if all(g is None for g in gf_d):
            raise ValueError("f does not depend on any trainable parameter of the discriminator")
        g_F = torch.autograd.grad(F, params, allow_unused=True)
        gF_d, gF_g = g_F[:n_d], g_F[n_d:]
        if all(g is None for g in gF_g):
            raise ValueError("F does not depend on any trainable parameter of the generator")

        if self.process_group is not None:
            return self._global(p_d, p_g, gf_d, gF_d, gf_g, gF_g)
        r = self._ratio(p_d, gf_d, gF_d)

        counts = _grads.storage_counts(g_f, g_F)
        add_to, add = [], []
        corrected: dict[torch.dtype, tuple[list, list]] = {}
        for p, gF, gf in zip(p_g, gF_g, gf_g):
            if gF is None and gf is None:
                continue
            old = p.grad
            if old is not None:
                if old.requires_grad or not v.dense(old) or _grads.storage_key(old) in counts:
                    old = p.grad = torch.empty_like(p).copy_(old.detach())
                if gF is not None:
                    add_to.append(old)
                    add.append(gF)
                buf = old
            elif gf is None:
                keep = _grads.writable_as_grad(gF, p, counts)
                p.grad = gF if keep else torch.empty_like(p).copy_(gF)
                continue
            elif gF is None:
                buf = p.grad = torch.zeros_like(p)
            elif _grads.writable_as_grad(gF, p, counts):
                buf = p.grad = gF
            else:
                buf = p.grad = torch.empty_like(p).copy_(gF)
            if gf is not None:
                bufs, gfs = corrected.setdefault(p.dtype, ([], []))
                bufs.append(buf)
                gfs.append(gf)
        if add_to:
            torch._foreach_add_(add_to, add)
        for dtype, (bufs, gfs) in corrected.items():
            iga_correction_(bufs, gfs, r.to(v.acc_dtype(dtype)))
        self.last_ratio = r
        return r

    def _ratio(self, p_d, gf_d, gF_d) -> Tensor:
        """r over the discriminator parameters that either loss depends on."""
        zeros: dict = {}
        groups: dict[torch.dtype, tuple[list, list]] = {}
        for p, a, b in zip(p_d, gf_d, gF_d):
            if a is None and b is None:
                continue
            a_s, b_s = groups.setdefault(p.dtype, ([], []))
            a_s.append(_grads.zeros(p, zeros) if a is None else a)
            b_s.append(_grads.zeros(p, zeros) if b is None else b)
        if len(groups) == 1:
            ((a_s, b_s),) = groups.values()
            return iga_ratio(a_s, b_s, self.eps)
        acc = v.acc_dtype(*groups)
        dots = sum(multi_dot(a_s, b_s).to(acc) for a_s, b_s in groups.values())
        return dots[2] / (dots[0] + self.eps)

    def _global(self, p_d, p_g, gf_d, gF_d, gf_g, gF_g) -> Tensor:
        """The distributed step: r from the rank-averaged df/dD and dF/dD (one flat all-reduce
        of both per bucket), then each rank's corrected generator gradient ``dF/dG - r df/dG``
        (linear in the local gradients once r is global) averaged in one more all-reduce per
        bucket and accumulated into ``.grad``. The generator's ``.grad`` of a parameter neither
        loss reached on this rank is left alone."""
        group, limit = self._sync.group, self._sync.bucket_bytes
        n = len(p_d)
        used = [a is not None or b is not None for a, b in zip(gf_d, gF_d)]
        used_g = [a is not None or b is not None for a, b in zip(gF_g, gf_g)]
        extra = _comm.used_flags(used + used_g, p_d[0]) if self._sync.find_unused else None
        views = _comm.mean_over_ranks(list(gf_d) + list(gF_d), p_d + p_d, group, limit, extra)
        if extra is not None:  # one host read, as DDP's find_unused_parameters makes
            flags = (extra > 0).tolist()
            used, used_g = flags[:n], flags[n:]
        r = self._ratio(
            p_d,
            [vw if u else None for vw, u in zip(views[:n], used)],
            [vw if u else None for vw, u in zip(views[n:], used)],
        )
        buffers, c = _comm.flat_buffers(gF_g, p_g, limit)  # None counts as zeros
        corrected: dict[torch.dtype, tuple[list, list]] = {}
        for p, buf, gf in zip(p_g, c, gf_g):
            if gf is not None:
                bufs, gfs = corrected.setdefault(p.dtype, ([], []))
                bufs.append(buf)
                gfs.append(gf)
        for dtype, (bufs, gfs) in corrected.items():
            iga_correction_(bufs, gfs, r.to(v.acc_dtype(dtype)))
        _comm.all_reduce_mean_(buffers, group)
        add_to, add = [], []
        for p, buf, u in zip(p_g, c, used_g):
            if not u:
                continue
            old = p.grad
            if old is None:
                p.grad = buf
            elif old.requires_grad or not v.dense(old):
                p.grad = old.detach() + buf
            else:
                add_to.append(old)
                add.append(buf)
        if add_to:
            torch._foreach_add_(add_to, add)
        self.last_ratio = r
        return r
