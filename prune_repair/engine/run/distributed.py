"""Exact statistics across processes with ``torch.distributed``.

When a process group is initialized (``torchrun``), each rank measures its shard of the
calibration data and the engine pools the per-rank statistics exactly, in float64:
counts and sums are all-reduced, then the centered second moments about the POOLED mean
(the parallel-variance formula ``m2 = sum_r [m2_r + n_r (mean_r - mean)^2]``), never an
average of per-rank variances. Without a process group every function here is a no-op
that returns its input, so a single process runs exactly as before.

Hook for other statistics (e.g. Gram matrices): :func:`all_reduce_sum_` sums a tensor
over ranks in place, in float64, on the device the backend needs.

Example (one process: nothing to reduce):
    >>> import torch
    >>> from prune_repair.engine.stats.activation import ChannelStats
    >>> s = ChannelStats.of(torch.arange(6.0).reshape(3, 2), -1)
    >>> pooled = all_reduce_channel_stats({"l": s}, {"l": 2})["l"]
    >>> pooled is s, world_size(), shard(10)
    (True, 1, slice(0, 10, None))
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

Moments = tuple[float, torch.Tensor, torch.Tensor]
"""``(count, mean, m2)``: count of values, their mean and centered (co-)moment sum."""
Comoment = Callable[[torch.Tensor], torch.Tensor]
"""``comoment(delta)``: the m2 of one value at offset ``delta`` from the mean (``delta**2``)."""


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialized (with more than one rank)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes sharing the work (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, the one that writes outputs and prints."""
    return rank() == 0


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The contiguous share of ``n`` samples of rank ``rank_``: ``[r*n//W, (r+1)*n//W)``.

    >>> [shard(10, r, 3) for r in range(3)]
    [slice(0, 3, None), slice(3, 6, None), slice(6, 10, None)]
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where the backend reduces: the current CUDA device for NCCL, the CPU otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (float64 recommended), and return it.

    The tensor is moved to the backend's device and back when needed. One collective.

    >>> all_reduce_sum_(torch.ones(2, dtype=torch.float64))
    tensor([1., 1.], dtype=torch.float64)
    """
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    work = tensor if tensor.device == device and tensor.is_contiguous() else tensor.to(device).contiguous()
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all ranks (a scalar)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(torch.empty(0)))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return type(value)(t.item())


def _square(delta: torch.Tensor) -> torch.Tensor:
    return delta.square()


def pool_moments(parts: Sequence[Moments], comoments: Sequence[Comoment] | None = None) -> list[Moments]:
    """Pooled ``(count, mean, m2)`` of each part over all ranks: two collectives in all.

    First ``count`` and ``count * mean`` are summed (giving the pooled mean), then
    ``m2_r + n_r * comoment(mean_r - mean)``. A part with count 0 contributes nothing
    (a rank that never saw a site). ``comoments[i]`` defaults to squaring (variances).

    >>> pool_moments([(3, torch.zeros(2), torch.ones(2))])[0][0]
    3
    """
    if not is_distributed() or not parts:
        return list(parts)
    comoments = list(comoments) if comoments is not None else [_square] * len(parts)
    device = _comm_device(parts[0][1])
    firsts = []
    for n, mean, _ in parts:
        firsts += [torch.tensor([float(n)], dtype=torch.float64, device=device),
                   (mean.to(device, torch.float64) * float(n)).flatten()]
    flat = torch.cat(firsts)
    torch.distributed.all_reduce(flat)
    starts = [0]
    for _, mean, _ in parts[:-1]:
        starts.append(starts[-1] + 1 + mean.numel())
    totals = flat[starts].tolist()  # one host sync for all parts
    pooled, seconds = [], []
    for (n, mean, m2), comoment, offset, total in zip(parts, comoments, starts, totals):
        sums = flat[offset + 1:offset + 1 + mean.numel()].view(mean.shape)
        mean_all = sums / total if total > 0 else torch.zeros_like(sums)
        local = m2.to(device, torch.float64)
        if n > 0:
            local = local + float(n) * comoment(mean.to(device, torch.float64) - mean_all)
        else:
            local = torch.zeros_like(local)
        pooled.append((total, mean_all, m2))
        seconds.append(local.flatten())
    flat2 = torch.cat(seconds)
    torch.distributed.all_reduce(flat2)
    out, offset = [], 0
    for total, mean_all, m2 in pooled:
        dev = m2.device
        out.append((round(total), mean_all.to(dev), flat2[offset:offset + m2.numel()].view(m2.shape).to(dev)))
        offset += m2.numel()
    return out


def all_reduce_channel_stats(stats: Mapping[str, Any], channels: Mapping[str, int], cls: type | None = None
                             ) -> dict[str, Any]:
    """Pool per-site :class:`~prune_repair.engine.stats.activation.ChannelStats` over ranks (two
    collectives for all sites); ``cls(count, mean, m2)`` builds the results (default:
    the class of the given statistics).

    ``channels`` names every site (in the same order on every rank) and its channel
    count; a site missing or ``None`` on this rank contributes zero samples, and comes
    back ``None`` when no rank measured it. Without a process group ``stats`` is returned.
    """
    if not is_distributed():
        return dict(stats)
    parts = []
    present = [s for s in stats.values() if s is not None]
    cls = cls or (type(present[0]) if present else None)
    device = present[0].mean.device if present else torch.device("cpu")
    for fqn, c in channels.items():
        s = stats.get(fqn)
        if s is None:
            zero = torch.zeros(c, dtype=torch.float64, device=device)
            parts.append((0, zero, zero))
        else:
            parts.append((s.count, s.mean, s.m2))
    out = {}
    for fqn, (n, mean, m2) in zip(channels, pool_moments(parts)):
        if n > 0 and cls is None:
            raise ValueError("this rank measured no statistics: pass cls= to build the pooled ones")
        out[fqn] = cls(n, mean, m2) if n > 0 else None
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper;
    ``ValueError`` for FSDP, whose sharded parameters cannot be folded into.

    >>> m = nn.Linear(2, 2)
    >>> unwrap(m) is m
    True
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be FSDP-wrapped (importing is slow)
    FSDPModule = getattr(fsdp, "FSDPModule", ())
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel" or isinstance(m, FSDPModule):
            raise ValueError(
                "FSDP-sharded models are not supported yet: gather a full state dict (e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True), "
                "load it into an unwrapped model on every rank (or wrap it in DistributedDataParallel) "
                "and repair that")
    return model


def weights_checksum(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the state_dict's names, dtypes, shapes and bytes (the same weights give the same hex).

    >>> weights_checksum({"w": torch.zeros(2)}) == weights_checksum({"w": torch.zeros(2)})
    True
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same-shaped ``tensor`` of every rank concatenated along ``dim`` in rank order."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    work = tensor.to(device).contiguous()
    parts = [torch.empty_like(work) for _ in range(world_size())]
    torch.distributed.all_gather(parts, work)
    return torch.cat(parts, dim=dim).to(tensor.device)


@contextlib.contextmanager
def process_group_from_env(device_type: str = "cpu", timeout_s: float = 1800.0) -> Iterator[bool]:
    """Initialize the process group a launcher (``torchrun``) describes in the environment.

    Yields True when this block created the group (``WORLD_SIZE`` > 1 and none was
    initialized; destroyed on exit), False otherwise. NCCL for ``device_type="cuda"``
    (each rank on ``cuda:LOCAL_RANK``), gloo else.

    >>> with process_group_from_env() as created:
    ...     created
    False
    """
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield False
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()
