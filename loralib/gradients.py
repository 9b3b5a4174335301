"""Gradient and cross-process primitives of the upper step (shared by the trainer and the estimators' callers).

* :func:`gradients`: first-order gradients of a scalar, through ``torch.autograd.grad`` or, where that route cannot
  see the parameters (reentrant activation checkpointing recomputes its segment inside ``backward`` and accumulates
  into ``.grad``; FSDP2 reaches sharded parameters only through ``backward``), through ``backward()`` into ``.grad``
  with the parameters' own ``.grad`` saved and put back.
* :func:`mean_over_processes`: the element-wise mean over the processes of a data-parallel run, so N processes
  compute what one process computes on the same global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["gradients", "mean_over_processes", "share_of_global_batch", "world", "zeros_for_none"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _engine_reduced(t: torch.Tensor) -> bool:
    """A ``DTensor``: the gradient of a sharded parameter, which the sharding engine has already reduced (FSDP2's
    reduce-scatter averages over the data-parallel processes); each process holds its own shard of it."""
    return isinstance(t, DTensor)


def mean_over_processes(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The element-wise mean of ``tensors`` over the processes of a data-parallel run (unchanged in one process).

    ``DTensor`` entries (gradients of FSDP2-sharded parameters: already averaged by FSDP's reduce-scatter, and each
    process holds a different shard) pass through unchanged.
    """
    _, size = world()
    if size == 1:
        return list(tensors)
    out = []
    for t in tensors:
        if t is not None and not _engine_reduced(t):
            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(size)
        out.append(t)
    return out


def share_of_global_batch(count: torch.Tensor) -> float | None:
    """``count · N / Σ count`` over the N processes of a data-parallel run (None in one process).

    A process whose loss is the mean over its own ``count`` items (rows, or label tokens) multiplies it by this
    factor; the mean over processes of the scaled losses (and of their gradients: DDP's average, and
    :func:`mean_over_processes`) is then the mean over all items of the global batch, whatever each process's count
    (padded rows with uneven token counts, a partial last batch). Every process must call it (one all-reduce).

    Raises:
        ValueError: the global batch has no item (every label is -100).
    """
    _, size = world()
    if size == 1:
        return None
    total = count.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if not float(total) > 0:
        raise ValueError("the global batch has no label to learn from (every label is -100 on every process)")
    return float(count) * size / float(total)


def zeros_for_none(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` with every ``None`` (a parameter the loss does not reach) replaced by zeros shaped like it."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def gradients(
    loss: torch.Tensor, params: Sequence[torch.Tensor], by_backward: bool = False, leaves: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor | None, ...]:
    """``∂loss/∂params`` (``None`` for a parameter ``loss`` does not reach).

    ``by_backward=False``: ``torch.autograd.grad``. ``by_backward=True``: ``loss.backward()`` into ``.grad`` of
    leaf that requires grad, ``params`` read back, and the ``.grad`` of ``params`` and of ``leaves`` (pass every
    other leaf that requires grad: ``backward`` reaches them too) put back as they were.
    """
    if not by_backward:
        return torch.autograd.grad(loss, list(params), allow_unused=True)
    params = list(params)
    touched = params + [t for t in leaves if all(t is not p for p in params)]
    saved = [t.grad for t in touched]
    for t in touched:
        t.grad = None
    try:
        loss.backward()
        return tuple(p.grad for p in params)
    finally:
        for t, g in zip(touched, saved):
            t.grad = g
