"""A rank that rejects its input and stays alive (a notebook, a server, a retry loop): its peers
raise promptly with its message instead of waiting in a collective; a rank that fails outside
any check holds them no longer than the strategy's `timeout_s`; block groups die with their
parent group."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mmlongnet.distributed import all_gather, sharded_dilated_attention
from mmlongnet.distributed import sharded as sharded_module
from mmlongnet.training import SequenceParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_helpers import run_ranks  # noqa: E402

SCHEDULE = ([4, 16], [1, 2])  # n = 8 per rank: the second branch crosses ranks


def _bad_input_on_one_rank(rank: int, world: int) -> None:
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    # rank 1 passes an int mask (a TypeError of its own check); the others are fine
    bad = mask.long() if rank == 1 else mask
    start = time.monotonic()
    with pytest.raises(TypeError) as caught:
        sharded_dilated_attention(q, k, v, *SCHEDULE, key_padding_mask=bad)
    assert time.monotonic() - start < 5.0
    if rank == 1:
        assert "key_padding_mask must be a bool tensor" in str(caught.value)
    else:
        assert "rank 1 of the group rejected its input: key_padding_mask must be a bool tensor" in str(
            caught.value
        )
    # a value error (softmax_scale=inf on rank 0 only) reaches rank 1 the same way
    scale = float("inf") if rank == 0 else None
    with pytest.raises(ValueError, match="softmax_scale must be a positive, finite number"):
        sharded_dilated_attention(q, k, v, *SCHEDULE, key_padding_mask=mask, softmax_scale=scale)
    # the group is still in step: the next good call runs on every rank
    out = sharded_dilated_attention(q, k, v, *SCHEDULE, key_padding_mask=mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    _block_groups_die_with_their_parent()


def _block_groups_die_with_their_parent() -> None:
    """The block groups cached for a parent group are dropped once the parent is destroyed."""
    group = dist.new_group([0, 1])
    assert sharded_module.block_group(group, 1) is None  # blocks of one rank: no group, but cached
    assert group in sharded_module._BLOCK_GROUPS
    count = len(sharded_module._BLOCK_GROUPS)
    # every rank has finished connecting the group before any rank tears it down (else a fast rank
    # closes its sockets while a slow one is still connecting: "Connection closed by peer")
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    del group
    gc.collect()
    assert len(sharded_module._BLOCK_GROUPS) == count - 1


def test_an_input_one_rank_rejects_raises_on_every_rank_with_its_message():
    # and (in the same spawn) block groups are dropped with their parent group
    run_ranks(_bad_input_on_one_rank, 2, timeout=60.0)


def _alive_rank_fails_outside_a_check(rank: int, world: int, timeout: float) -> None:
    strategy = SequenceParallelStrategy(sequence_parallel_size=2, timeout_s=timeout)
    group = dist.new_group([0, 1], timeout=strategy._timeout)
    if rank == 1:
        try:
            raise RuntimeError("rank 1 failed before its collective")
        except RuntimeError:
            time.sleep(2 * timeout)  # alive, never joins the collective
        return
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        all_gather(torch.zeros(1), group)
    assert time.monotonic() - start < timeout + 4.0


def test_a_failing_rank_that_stays_alive_holds_its_peers_only_for_timeout_s():
    run_ranks(_alive_rank_fails_outside_a_check, 2, 1.0, timeout=60.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"timeout_s": 0}, ValueError, "timeout_s must be a positive, finite"),
        ({"timeout_s": float("inf")}, ValueError, "timeout_s must be a positive, finite"),
        ({"timeout_s": "10"}, TypeError, "timeout_s must be a number"),
        ({"validate": "no"}, TypeError, "validate must be a bool"),
    ],
)
def test_strategy_options_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        SequenceParallelStrategy(sequence_parallel_size=2, **kwargs)


def test_strategy_timeout_s_sets_the_process_group_timeout():
    assert SequenceParallelStrategy(sequence_parallel_size=2, timeout_s=7.5)._timeout.total_seconds() == 7.5
