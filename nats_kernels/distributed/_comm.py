"""The collectives the schemes use under ``torch.distributed``: which process group, and the
mean over ranks of a list of gradients in a few flat all-reduces (DDP's bucketing, without DDP).

Nothing here reads a tensor value on the host. The mean is a SUM all-reduce divided by the world
size (gloo has no AVG); it is what DDP computes, and equals the gradient of one process on the
concatenated batch when each rank's loss is a mean over an equal-sized local batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Bytes per flat all-reduce buffer when the module is not DDP-wrapped (DDP's own default,
#: ``bucket_cap_mb=25``); a DDP-wrapped module's ``bucket_bytes_cap`` is used otherwise.
DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Sync:
    """How a scheme reduces: over ``group`` (None: one process, nothing to reduce), in flat
    buffers of ``bucket_bytes``, exchanging the map of reached parameters when a DDP wrapper
    says they may differ between ranks (``find_unused``)."""

    group: object
    bucket_bytes: int
    find_unused: bool


def setup(what: str, process_group, layouts: dict[str, Sequence[Tensor]] | None = None, *,
          autograd_grad: bool = True, **modules: nn.Module) -> Sync:
    """What a scheme's constructor decides once: the DDP options it cannot live with (only
    when it takes gradients with ``torch.autograd.grad``), the group, the bucket size, and that
    every rank holds the same trainable parameters (each list of ``layouts``)."""
    if autograd_grad:
        check_ddp_options(what, **modules)
    group = resolve_group(process_group, **modules)
    if group is not None:
        for name, params in (layouts or {}).items():
            check_same_layout(group, f"{what} ({name})", params)
    return Sync(group, bucket_bytes(**modules), finds_unused(**modules))


def _ddp_type():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # a torch built without distributed support
        return None
    return DistributedDataParallel


def is_ddp(module) -> bool:
    ddp = _ddp_type()
    return ddp is not None and isinstance(module, ddp)


def unwrap(module: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (``.module``), or ``module`` itself."""
    return module.module if is_ddp(module) else module


def resolve_group(process_group, **modules: nn.Module):
    """The process group a scheme reduces over, or None when it runs as one process.

    ``process_group`` (a ``torch.distributed.ProcessGroup``) wins; else the group of the
    DDP-wrapped modules among ``modules`` (they must agree); else None. A group of one rank is
    None too: there is nothing to reduce."""
    import torch.distributed as dist

    if process_group is not None:
        if not dist.is_available():
            raise RuntimeError("process_group given, but this torch has no torch.distributed")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
            )
        group = process_group
    else:
        found = {name: m.process_group for name, m in modules.items() if is_ddp(m)}
        if not found:
            return None
        names = list(found)
        group = found[names[0]]
        for name in names[1:]:
            if found[name] is not group:
                raise ValueError(
                    f"{names[0]} and {name} are wrapped in DistributedDataParallel with "
                    f"different process groups; pass process_group= to choose one"
                )
    return group if dist.get_world_size(group) > 1 else None


def check_ddp_options(what: str, **modules: nn.Module) -> None:
    """Refuse DDP wrappers whose options the autograd.grad passes of the schemes would break:
    ``static_graph=True`` records the graph of the first backward DDP sees, and a first
    iteration made of ``torch.autograd.grad`` passes (invisible to DDP) leaves it recording no
    gradient, so every later plain ``backward()`` would silently go unsynchronized."""
    for name, m in modules.items():
        if is_ddp(m) and getattr(m, "static_graph", False):
            raise ValueError(
                f"{what}: {name} is wrapped with DistributedDataParallel(static_graph=True); "
                f"{what} takes its gradients with torch.autograd.grad, which DDP does not see, "
                f"and a static graph recorded without them leaves later backward() calls "
                f"unsynchronized. Wrap it without static_graph (the default)."
            )


def finds_unused(**modules: nn.Module) -> bool:
    """Whether a DDP wrapper among ``modules`` was told that the parameters a step reaches may
    differ between ranks (``find_unused_parameters=True``)."""
    return any(is_ddp(m) and m.find_unused_parameters for m in modules.values())


def used_flags(used: Sequence[bool], like: Tensor) -> Tensor:
    """0/1 flags in float64 on ``like``'s device, to ride along in an averaged ``extra``."""
    return torch.tensor([float(u) for u in used], dtype=torch.float64).to(like.device)


def bucket_bytes(**modules: nn.Module) -> int:
    """The bucket size of the first DDP-wrapped module, else :data:`DEFAULT_BUCKET_BYTES`."""
    for m in modules.values():
        if is_ddp(m):
            return int(getattr(m, "bucket_bytes_cap", DEFAULT_BUCKET_BYTES))
    return DEFAULT_BUCKET_BYTES


def check_same_layout(group, what: str, params: Sequence[Tensor]) -> None:
    """Raise on every rank when the ranks' trainable parameters differ in number, shape or dtype
    (the flat buffers would not line up). Construction-time: one all_gather_object."""
    import torch.distributed as dist

    mine = [(tuple(p.shape), str(p.dtype)) for p in params]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise ValueError(
                f"{what}: the trainable parameters differ between ranks (rank 0 has "
                f"{len(everyone[0])}, rank {rank} has {len(theirs)} with these shapes and "
                f"dtypes); every rank must hold the same model"
            )


def flat_buffers(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor], limit: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Copy ``tensors`` into flat buffers, one dtype per buffer and at most ``limit`` bytes each
    (a tensor larger than the limit gets a buffer of its own); a None counts as zeros shaped
    like the matching entry of ``like``. Returns (buffers, views): ``views[i]`` is the slice of
    a buffer holding ``tensors[i]``, contiguous, shaped like ``like[i]``. The layout depends only
    on shapes and dtypes, so it is the same on every rank that holds the same model."""
    plan: list[tuple[torch.dtype, list[int]]] = []  # (dtype, indices) per buffer
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i, p in enumerate(like):
        nbytes = p.numel() * p.element_size()
        idx, size = open_.get(p.dtype, (None, 0))
        if idx is None or size + nbytes > limit:
            idx = []
            plan.append((p.dtype, idx))
            size = 0
        idx.append(i)
        open_[p.dtype] = (idx, size + nbytes)
    buffers: list[Tensor] = []
    views: list[Tensor | None] = [None] * len(like)
    dsts, srcs = [], []
    for dtype, idx in plan:
        buf = torch.empty(
            sum(like[i].numel() for i in idx), dtype=dtype, device=like[idx[0]].device
        )
        buffers.append(buf)
        for i, part in zip(idx, buf.split([like[i].numel() for i in idx])):
            view = part.view(like[i].shape)
            views[i] = view
            if tensors[i] is None:
                view.zero_()
            else:
                dsts.append(view)
                srcs.append(tensors[i])
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    return buffers, views


def all_reduce_mean_(buffers: Sequence[Tensor], group, extra: Tensor | None = None) -> None:
    """Replace each buffer (and ``extra``) by its mean over the ranks of ``group``: every
    all-reduce is started before the first is waited on, so they overlap."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    todo = list(buffers) + ([extra] if extra is not None else [])
    works = [dist.all_reduce(b, group=group, async_op=True) for b in todo]
    for w in works:
        w.wait()
    torch._foreach_div_(todo, float(world))


def average_in_place_(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor], group, limit: int,
    extra: Tensor | None = None,
) -> list[Tensor]:
    """Replace each tensor by its mean over ranks (a None takes part as zeros and stays None);
    returns the views of the flat buffers, for entries the caller wants to fill itself."""
    buffers, views = flat_buffers(tensors, like, limit)
    all_reduce_mean_(buffers, group, extra)
    have = [(t, vw) for t, vw in zip(tensors, views) if t is not None]
    if have:
        torch._foreach_copy_([t for t, _ in have], [vw for _, vw in have])
    return views


def mean_over_ranks(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor], group, limit: int,
    extra: Tensor | None = None,
) -> list[Tensor]:
    """The mean over ranks of each tensor (None = zeros shaped like ``like[i]``), as views of
    fresh flat buffers; ``extra`` (a small tensor, e.g. statistics) is averaged in place along."""
    buffers, views = flat_buffers(tensors, like, limit)
    all_reduce_mean_(buffers, group, extra)
    return views


def broadcast_module(module: nn.Module, group, parameters: bool = True) -> None:
    """Copy the parameters (unless ``parameters=False``) and buffers of the group's first rank
    to every rank (what DDP does at construction, and for buffers before each forward), a few
    flat broadcasts."""
    import torch.distributed as dist

    tensors = [*(module.parameters() if parameters else ()), *module.buffers()]
    if not tensors:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        buffers, views = flat_buffers(tensors, tensors, DEFAULT_BUCKET_BYTES)
        for b in buffers:
            dist.broadcast(b, src=src, group=group)
        torch._foreach_copy_(tensors, views)
