"""Best-response constraint with the implicit gradient approximation (BRC / IGA, design §5) as a
drop-in for the generator's ``g_loss.backward()``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validate as v
from ..distributed import _comm
from ..ops import iga_correction_, multi_dot
from . import _grads, _implicit

__all__ = ["BRC"]

SOLVERS = ("iga", "cg", "neumann")


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

    What eq. 9 does (design §5.2): with the standard discriminator loss and the non-saturating
    generator loss, ``dF/dG - r df/dG = -(1/n) sum_i [1 + (r - 1) s_i] dl_i/dG`` (``s_i`` the
    sigmoid of fake logit i): the plain per-sample directions, reweighted by the logit alone,
    pushing sample i the wrong way when ``r < 0`` and ``s_i > 1/(1 - r)``. With the saturating
    loss or WGAN it is the scalar gain ``(1 + r)`` on the plain gradient, reversed when
    ``r < -1``. ``|df/dD|`` shrinks as D nears its best response, so ``|r|`` grows then. On the
    8-mode ring this lost modes against the plain GAN (design §5.2 has the numbers);
    ``last_norms`` shows the two norms behind each r, and ``ratio_clamp=(lo, hi)`` bounds r.

    Solvers. ``solver="iga"`` (default) is eq. 9 above. ``"cg"`` and ``"neumann"`` compute the
    implicit best-response term itself (design §5.4): ``v`` solving
    ``(H_DD + damping I) v = dF/dD`` with ``iters`` Hessian-vector products through D (conjugate
    gradients, or the Neumann series with step ``neumann_step``), then the generator gradient
    ``dF/dG - H_GD v`` (``H_GD v``: one more double backward). H_DD of a GAN discriminator is
    in general indefinite: ``damping`` shifts its spectrum, CG needs ``H_DD + damping I``
    positive definite to converge, Neumann every eigenvalue in ``(0, 2/neumann_step)``.
    ``last_residual`` says how far the solve got. Cost: one backward of F, one of f with
    ``create_graph=True``, ``iters`` double backwards through D's part of that graph and one
    into G; memory: the double-backward graph plus five copies of D's gradients (CG). Under
    torch.distributed dF/dD and each product are averaged over the ranks (one all-reduce per
    product: ``iters + 1`` all-reduces of D's gradient volume), so every rank solves the same
    system, that of one process on the concatenated batch; the corrected generator gradient is
    averaged once, as for eq. 9.

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
        solver: ``"iga"``, ``"cg"`` or ``"neumann"`` (see Solvers).
        iters: Hessian-vector products per call of ``"cg"`` / ``"neumann"`` (an int >= 1).
        damping: finite, >= 0, added to H_DD's diagonal by ``"cg"`` / ``"neumann"``.
        neumann_step: the Neumann series' step (finite, > 0).
        ratio_clamp: ``None`` or ``(lo, hi)``, finite numbers with lo <= hi: r is clamped to
            that interval on the device (``"iga"`` only).
        process_group: the ``torch.distributed`` group to average over when neither module is
            DDP-wrapped; default: the wrappers' group (they must agree), or none.

    Attributes:
        last_ratio: r of the last call (0-d device tensor, after ``ratio_clamp``), or ``None``
            before the first call or with another solver.
        last_norms: ``(|df/dD|, |dF/dD|)`` of the last ``"iga"`` call, a (2,) device tensor in
            the accumulation dtype (the global gradients under torch.distributed), else None;
            a read-only property, computed from that call's inner products at each read.
        last_residual: of the last ``"cg"`` call, CG's recursive residual
            ``|dF/dD - (H_DD + damping I) v| / |dF/dD|``; of ``"neumann"``, the last series
            term's norm relative to v's; a 0-d device tensor, else None.

    Raises:
        TypeError: a non-module argument, a non-number eps, damping or neumann_step, a
            non-int iters, a solver that is not a str.
        ValueError: a parameter shared by the two modules, a negative or non-finite eps, a module
            without trainable parameters, an unknown solver, iters < 1, a negative or
            non-finite damping, a non-positive neumann_step, a bad ratio_clamp or one given to
            another solver, discriminator parameters of two dtypes with ``"cg"``/``"neumann"``.
        NotImplementedError: ``"cg"``/``"neumann"`` with ``find_unused_parameters=True``
            wrappers.
    """

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, *, eps: float = 1e-12,
        solver: str = "iga", iters: int = 10, damping: float = 0.01, neumann_step: float = 0.01,
        ratio_clamp: tuple[float, float] | None = None, process_group=None,
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
        self.solver = _solver(solver)
        self.iters = v.integer("iters", iters, minimum=1)
        self.damping = v.nonnegative("damping", damping)
        self.neumann_step = v.positive("neumann_step", neumann_step)
        self.ratio_clamp = _clamp(ratio_clamp, self.solver)
        if self.solver != "iga":
            if len({p.dtype for p in p_d}) > 1:
                raise ValueError(
                    f"solver={self.solver!r} needs the discriminator's trainable parameters in "
                    f"one dtype, got {sorted(str(t) for t in {p.dtype for p in p_d})}"
                )
            if self.process_group is not None and self._sync.find_unused:
                raise NotImplementedError(
                    f"solver={self.solver!r} with find_unused_parameters=True wrappers is not "
                    f"implemented (the ranks would have to agree on the parameters each "
                    f"Hessian-vector product reaches); use solver='iga'"
                )
        self.last_ratio: Tensor | None = None
        self._dots: Tensor | None = None  # the last "iga" call's multi_dot, for last_norms
        self.last_residual: Tensor | None = None

    @property
    def last_norms(self) -> Tensor | None:
        """``(|df/dD|, |dF/dD|)`` of the last ``"iga"`` call (see the class docstring), computed
        from that call's inner products when read (a new tensor at each read), else None."""
        return None if self._dots is None else self._dots[:2].sqrt()

    def __repr__(self) -> str:
        if self.solver == "iga":
            clamp = "" if self.ratio_clamp is None else f", ratio_clamp={self.ratio_clamp}"
            return f"{type(self).__name__}(eps={self.eps}{clamp})"
        step = f", neumann_step={self.neumann_step}" if self.solver == "neumann" else ""
        return (f"{type(self).__name__}(solver={self.solver!r}, iters={self.iters}, "
                f"damping={self.damping}{step})")

    def backward(self, F: Tensor, f: Tensor) -> Tensor:
        """Accumulate ``dF/dG - r * df/dG`` (``"iga"``) or ``dF/dG - H_GD v`` (``"cg"``,
        ``"neumann"``) into the generator's ``.grad``; return r (``last_residual``).

        Args:
            F: the generator loss, one element, not yet backpropagated.
            f: the discriminator loss on the same, non-detached fake batch, one element.

        Returns:
            ``"iga"``: r, a detached 0-d tensor on the parameters' device, float32 (float64 when
            a discriminator parameter is float64); ``"cg"``/``"neumann"``: ``last_residual``.

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

        if self.solver != "iga":
            return self._solve(F, f, p_d, p_g)
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
        self._accumulate(p_g, gF_g, gf_g, r, _grads.storage_counts(g_f, g_F))
        self.last_ratio = r
        return r

    def _accumulate(self, p_g, gF_g, gf_g, r, counts) -> None:
        """``.grad += gF - r * gf`` per generator parameter, as ``loss.backward()`` accumulates
        (see the class docstring); ``counts``: the storages of this call's gradients."""
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
            iga_correction_(bufs, gfs, _grads.to(r, v.acc_dtype(dtype)))

    def _solve(self, F: Tensor, f: Tensor, p_d, p_g) -> Tensor:
        """The "cg" / "neumann" step (design §5.4); returns the solve's residual measure."""
        n_d = len(p_d)
        g_F = torch.autograd.grad(F, p_d + p_g, retain_graph=True, allow_unused=True)
        gF_d, gF_g = g_F[:n_d], g_F[n_d:]
        if all(g is None for g in gF_g):
            raise ValueError("F does not depend on any trainable parameter of the generator")
        gf_d = torch.autograd.grad(f, p_d, create_graph=True, allow_unused=True)
        # Only gradients that depend on some parameter take part: the others have zero rows in
        # H_DD and H_GD (see the _implicit module's docstring).
        active = [i for i, g in enumerate(gf_d) if g is not None and g.requires_grad]
        if not active:
            raise ValueError("f's gradient with respect to the discriminator depends on no "
                             "parameter: there is no best response to differentiate")
        grads = [gf_d[i] for i in active]
        params = [p_d[i] for i in active]
        zeros: dict = {}
        # read only: the solvers copy what they update
        rhs = [_grads.zeros(p_d[i], zeros) if gF_d[i] is None else gF_d[i] for i in active]
        apply = _implicit.hvp_operator(grads, params, self.damping)
        if self.process_group is not None:
            # f and F are means over the ranks' batches: dF/dD and every product H p are the
            # means of the ranks' own (one all-reduce each); the solve is then the same on all
            group, limit = self._sync.group, self._sync.bucket_bytes
            rhs = _comm.mean_over_ranks(rhs, params, group, limit)
            local = apply

            def apply(p):
                return _comm.mean_over_ranks(local(p), params, group, limit)

        if self.solver == "cg":
            sol, residual = _implicit.conjugate_gradient(apply, rhs, self.iters)
        else:
            sol, residual = _implicit.neumann(apply, rhs, self.iters, self.neumann_step)
        h_gd = torch.autograd.grad(grads, p_g, grad_outputs=sol, allow_unused=True)
        if all(g is None for g in h_gd):
            raise ValueError(
                "f's gradient with respect to the discriminator does not depend on the "
                "generator: the discriminator loss must be computed on the fake batch G(z) "
                "without .detach()"
            )
        one = torch.ones((), dtype=v.acc_dtype(p_g[0].dtype), device=p_g[0].device)
        if self.process_group is not None:
            used_g = [a is not None or b is not None for a, b in zip(gF_g, h_gd)]
            self._global_accumulate(p_g, gF_g, h_gd, one, used_g)
        else:
            self._accumulate(p_g, gF_g, h_gd, one, _grads.storage_counts(g_F, h_gd))
        self.last_residual = residual
        return residual

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
        if len(groups) == 1:  # multi_dot's result is in the accumulation dtype already
            ((a_s, b_s),) = groups.values()
            dots = multi_dot(a_s, b_s)
        else:
            acc = v.acc_dtype(*groups)
            dots = sum(multi_dot(a_s, b_s).to(acc) for a_s, b_s in groups.values())
        self._dots = dots  # last_norms reads it
        ff, _, fF = dots.unbind()
        r = fF / (ff + self.eps)
        if self.ratio_clamp is not None:
            r = r.clamp(*self.ratio_clamp)
        return r

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
        self._global_accumulate(p_g, gF_g, gf_g, r, used_g)
        self.last_ratio = r
        return r

    def _global_accumulate(self, p_g, gF_g, gf_g, r, used_g) -> None:
        """Each rank's ``gF - r * gf`` averaged over the ranks (one all-reduce per bucket) and
        accumulated into ``.grad`` where ``used_g``; a parameter no rank reached is left alone."""
        group, limit = self._sync.group, self._sync.bucket_bytes
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


def _solver(solver) -> str:
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a str, one of {SOLVERS}, got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def _clamp(clamp, solver: str) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if solver != "iga":
        raise ValueError(f"ratio_clamp bounds eq. 9's r: it applies to solver='iga' only, not "
                         f"{solver!r}")
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"ratio_clamp must be None or a pair (lo, hi), got {clamp!r}")
    lo = v.finite("ratio_clamp[0]", clamp[0])
    hi = v.finite("ratio_clamp[1]", clamp[1])
    if lo > hi:
        raise ValueError(f"ratio_clamp must have lo <= hi, got ({lo}, {hi})")
    return (lo, hi)
