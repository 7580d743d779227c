"""Autograd-aware collectives over a process group, along dim 0.

Legend: P ranks in the group, L rows of one rank along dim 0, * any trailing shape.

`all_gather(x)`: every rank passes (L, *) and receives (P * L, *), rank p's rows at [p*L, (p+1)*L).
Its backward is a reduce-scatter: rank p receives the sum over ranks of their incoming gradient's
rows [p*L, (p+1)*L). `reduce_scatter` is the converse pair.

Every tensor is made contiguous before it enters a collective, in the forward and in the
backward: PyTorch's `torch.distributed.nn.functional.all_gather` (torch 2.11, gloo) returns wrong
gradients for a non-contiguous incoming gradient, which is why these Functions exist. Both
directions use `all_gather_into_tensor` and `reduce_scatter_tensor`, which the gloo backend of
torch 2.11 implements as well as NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_rank(group: Group = None) -> int:
    """This process's rank within `group` (None: the default group)."""
    return dist.get_rank(group)


def group_size(group: Group = None) -> int:
    """The number of ranks P of `group` (None: the default group)."""
    return dist.get_world_size(group)


def _gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(L, *) -> (P * L, *), no autograd."""
    x = x.contiguous()
    out = x.new_empty((group_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(P * L, *) -> (L, *), the sum over ranks of their rows [rank*L, (rank+1)*L), no autograd."""
    size = group_size(group)
    if x.shape[0] % size:
        raise ValueError(
            f"reduce_scatter needs dim 0 divisible by the group size {size}, got {tuple(x.shape)}"
        )
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


class AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward is a reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group), None


class ReduceScatter(torch.autograd.Function):
    """reduce-scatter (sum) along dim 0 whose backward is an all_gather of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.group), None


def all_gather(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Concatenate every rank's x along dim 0, differentiably.

    x: (L, *), the same shape on every rank. Returns (P * L, *); the gradient reaching x is the
    sum over ranks of the gradients of rows [rank*L, (rank+1)*L).
    """
    return AllGather.apply(x, group)


def reduce_scatter(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum x over ranks and keep this rank's block of rows, differentiably.

    x: (P * L, *), the same shape on every rank. Returns (L, *) = sum over ranks of their rows
    [rank*L, (rank+1)*L); the gradient reaching x is the all_gather of the incoming gradients.
    """
    return ReduceScatter.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """all_gather of a tensor that needs no gradient (masks, metadata): (L, *) -> (P * L, *).

    bool tensors travel as uint8.
    """
    if x.dtype == torch.bool:
        return _gather(x.to(torch.uint8), group).bool()
    return _gather(x.detach(), group)
