"""The autograd collectives on 2 gloo ranks: values and gradients, also for non-contiguous gradients."""

from __future__ import annotations

import time

import pytest
import torch
from distributed_helpers import run_ranks

from mmlongnet.distributed import (
    all_gather,
    all_gather_no_grad,
    gather_sequence,
    reduce_scatter,
    shard_sequence,
)


def _collectives(rank: int, world: int) -> None:
    # all_gather: rank r holds rows filled with r + 1; the gradient is a non-contiguous (transposed)
    # tensor that differs per rank, and the gradient of x is the sum over ranks of its block
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)  # (L, *)
    gathered = all_gather(x)  # (P * L, *)
    assert gathered.tolist() == [[float(r + 1)] * 3 for r in range(world) for _ in range(2)]
    grad_t = torch.arange(3 * 2 * world, dtype=torch.float64).view(3, 2 * world) * (rank + 1)
    grad = grad_t.t()  # (P * L, 3), non-contiguous
    assert not grad.is_contiguous()
    gathered.backward(grad)
    full = torch.arange(3 * 2 * world, dtype=torch.float64).view(3, 2 * world).t()  # rank-independent part
    expected = full[2 * rank : 2 * rank + 2] * sum(r + 1 for r in range(world))
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)

    # reduce_scatter: the sum over ranks of this rank's block; its backward is an all_gather
    y = (torch.arange(2 * world * 3, dtype=torch.float64).view(2 * world, 3) + 10 * rank).requires_grad_()
    scattered = reduce_scatter(y)  # (L, 3)
    base = torch.arange(2 * world * 3, dtype=torch.float64).view(2 * world, 3)[2 * rank : 2 * rank + 2]
    torch.testing.assert_close(scattered, world * base + 10 * sum(range(world)), rtol=0, atol=0)

    def incoming(r: int) -> torch.Tensor:  # rank r's gradient, (L, 3), non-contiguous
        return torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(r)).t()

    assert not incoming(rank).is_contiguous()
    scattered.backward(incoming(rank))
    every = torch.cat([incoming(r) for r in range(world)])  # (P * L, 3)
    torch.testing.assert_close(y.grad, every, rtol=0, atol=0)

    # gather_sequence along dim 1 and its gradient through a non-contiguous slice
    seq = torch.arange(2 * 4 * world, dtype=torch.float64).view(2, 4 * world)  # (B, N), the same everywhere
    local = shard_sequence(seq).clone().requires_grad_()  # (B, n)
    whole = gather_sequence(local)  # (B, N)
    torch.testing.assert_close(whole, seq, rtol=0, atol=0)
    whole[:, ::2].sum().backward()  # gradient 1 at even positions, non-contiguous pattern
    expected = torch.zeros(2, 4 * world, dtype=torch.float64)
    expected[:, ::2] = world
    torch.testing.assert_close(local.grad, shard_sequence(expected), rtol=0, atol=0)

    mask = torch.tensor([rank == 0, True])
    assert all_gather_no_grad(mask).tolist() == [True, True] + [False, True] * (world - 1)


def test_collectives_values_and_gradients_on_two_ranks():
    run_ranks(_collectives, 2)


def _raise_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    all_gather(torch.zeros(1))  # rank 0 waits for a partner that never comes


def test_a_failing_rank_fails_the_run_instead_of_hanging():
    # Either rank 1's own error arrives first, or rank 0's collective fails because rank 1 is gone;
    # either way the run ends with an error well before the time limit.
    start = time.monotonic()
    with pytest.raises(
        Exception, match="rank 1 failed on purpose|Process 0 terminated with the following error"
    ):
        run_ranks(_raise_on_rank_one, 2, timeout=60.0)
    assert time.monotonic() - start < 45.0
