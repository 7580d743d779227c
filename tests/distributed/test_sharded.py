"""sharded_dilated_attention on 2 and 4 gloo ranks equals dilated_attention on the full sequence.

Legend: B batch, N tokens, P ranks, n = N / P, H heads, D head dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from mmlongnet.attention import dilated_attention
from mmlongnet.distributed import check_split, sharded_dilated_attention, split_sequence
from mmlongnet.distributed import sharded as sharded_module

TOL = 1e-10

# (N, H, segment_lengths, dilation_rates, is_causal, padded, explicit_local)
CASES_P2 = [
    # n = 12: W=4 divides n (local), W=8 crosses a boundary (some ranks), W=24 spans all ranks
    (24, 4, [4, 8, 24], [1, 2, 3], False, False, False),
    (24, 4, [4, 8, 24], [1, 2, 3], True, True, False),
    # W that divides no slice and leaves a short last segment; rate above the head count
    (24, 2, [5, 7, 16], [2, 3, 4], True, False, False),
    (24, 3, [5, 7, 16], [1, 3, 2], False, True, False),
    # every branch through the explicit path (as for dtypes the fused kernels refuse)
    (24, 4, [4, 8, 24], [1, 2, 3], True, True, True),
]
CASES_P4 = [
    # n = 8: W=4 local, W=12 spans 2-3 ranks and not a multiple of n, W=16 two ranks, W=32 all
    (32, 4, [4, 12, 16, 32], [1, 2, 4, 2], True, True, False),
    (32, 4, [4, 12, 32], [2, 3, 4], False, True, False),
]


def _inputs(seed: int, n_tokens: int, heads: int, padded: bool):
    g = torch.Generator().manual_seed(seed)
    shape = (2, n_tokens, heads, 6)  # (B, N, H, D)
    q, k, v, grad = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    mask = None
    if padded:
        mask = torch.rand(2, n_tokens, generator=g) < 0.25  # (B, N), True = padding
        mask[1, :11] = True  # sample 1: its first queries see no key when causal
    return q, k, v, grad, mask


def _check_case(rank: int, world: int, seed: int, case) -> None:
    n_tokens, heads, segments, rates, causal, padded, explicit = case
    q, k, v, grad, mask = _inputs(seed, n_tokens, heads, padded)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dilated_attention(*full, segments, rates, is_causal=causal, key_padding_mask=mask)
    (expected * grad).sum().backward()

    def mine(t):
        return split_sequence(t, world, rank).detach().clone()

    local = [mine(t).requires_grad_() for t in (q, k, v)]
    local_mask = None if mask is None else mine(mask)
    original = sharded_module._sdpa_takes
    if explicit:
        sharded_module._sdpa_takes = lambda q: False
    try:
        out = sharded_dilated_attention(
            *local, segments, rates, is_causal=causal, key_padding_mask=local_mask
        )
    finally:
        sharded_module._sdpa_takes = original
    (out * mine(grad)).sum().backward()
    torch.testing.assert_close(out, mine(expected.detach()), rtol=0, atol=TOL, msg=f"output, case {case}")
    for name, t_local, t_full in zip("qkv", local, full, strict=True):
        torch.testing.assert_close(
            t_local.grad, mine(t_full.grad), rtol=0, atol=TOL, msg=f"d{name} on rank {rank}, case {case}"
        )
    assert out.abs().max() > 0.1  # the comparison is not between zeros


def _check_cases(rank: int, world: int, cases) -> None:
    for seed, case in enumerate(cases):
        _check_case(rank, world, seed, case)
    # ranks that disagree on an option all raise (no rank hangs in a later collective)
    x = torch.randn(1, 4, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"disagree on is_causal: per rank \[1, 0"):
        sharded_dilated_attention(x, x, x, [8], [1], is_causal=rank == 0)


def test_two_ranks_match_single_device():
    run_ranks(_check_cases, 2, CASES_P2)


# (case, the global ranks each rank gathers K/V among, per remote branch in schedule order), P = 4,
# n = 8: W=16 = 2n gathers within blocks of 2 ranks; W=24 = 3n within [0, 3), rank 3 alone keeps
# its own keys; W=32 = 4n over the whole group (passed as is); W=12 not a multiple of n: whole group
CASES_BLOCKS = [
    (
        (32, 4, [4, 16, 24], [1, 2, 3], True, True, False),
        {0: [[0, 1], [0, 1, 2]], 1: [[0, 1], [0, 1, 2]], 2: [[2, 3], [0, 1, 2]], 3: [[2, 3]]},
    ),
    ((32, 4, [8, 32, 12], [1, 2, 3], False, True, False), {p: [[0, 1, 2, 3]] * 2 for p in range(4)}),
]


def _check_blocks(rank: int, world: int, cases) -> None:
    original = sharded_module.all_gather
    for seed, (case, expected) in enumerate(cases):
        calls = []  # per K/V all_gather: (global ranks of its group, rows it returns)

        def recording(x, group=None, calls=calls):
            out = original(x, group)
            calls.append((dist.get_process_group_ranks(group or dist.group.WORLD), out.shape[0]))
            return out

        sharded_module.all_gather = recording
        try:
            _check_case(rank, world, seed, case)
        finally:
            sharded_module.all_gather = original
        assert [ranks for ranks, _ in calls] == expected[rank], f"rank {rank}, case {case}"
        assert all(rows == 2 * len(ranks) for ranks, rows in calls)  # keys and values of each rank
    # groups of blocks of 2 and 3 ranks (rank 3 is alone in its block of 3 and never asks for one); a
    # block of the whole group (W=32) is the group itself and creates none
    assert sorted(m for blocks in sharded_module._BLOCK_GROUPS.values() for m in blocks) == (
        [2, 3] if rank < 3 else [2]
    )


def _check_four_ranks(rank: int, world: int) -> None:
    _check_cases(rank, world, CASES_P4)
    _check_blocks(rank, world, CASES_BLOCKS)


def test_four_ranks_match_single_device_gathering_within_blocks():
    run_ranks(_check_four_ranks, 4)  # one set of processes for both (starting 4 ranks takes seconds)


def test_gather_ranks_are_the_block_of_a_segment():
    # P=4, n=8: W=16 -> blocks of 2, W=24 -> [0, 3) and [3, 4), W=12 (not a multiple) -> all ranks
    assert [sharded_module.gather_ranks(p, 4, 8, 16) for p in range(4)] == [(0, 2), (0, 2), (2, 4), (2, 4)]
    assert [sharded_module.gather_ranks(p, 4, 8, 24) for p in range(4)] == [(0, 3)] * 3 + [(3, 4)]
    assert sharded_module.gather_ranks(3, 4, 8, 12) == (0, 4)
    for p in range(4):  # the window lies inside the gathered ranks
        lo, hi = sharded_module.gather_ranks(p, 4, 8, 24)
        w_lo, w_hi = sharded_module.window(p, 4, 8, 24)
        assert lo <= w_lo < w_hi <= hi


def test_impossible_split_names_what_would_work():
    with pytest.raises(ValueError, match=r"N=1000 tokens cannot be split evenly over P=3 ranks.*e\.g\. 1002"):
        check_split(1000, 3)
    with pytest.raises(ValueError, match="N=2 tokens cannot be split evenly over P=4"):
        split_sequence(torch.zeros(1, 2, 3), 4, 0)
    assert check_split(1002, 3) == 334
    assert split_sequence(torch.arange(12).view(1, 12), 3, 1).tolist() == [[4, 5, 6, 7]]


def test_empty_slice_is_rejected_before_any_communication():
    q = torch.zeros(1, 0, 2, 4)
    with pytest.raises(ValueError, match="n = 0"):
        sharded_dilated_attention(q, q, q, [4], [1])


def test_branch_selection_holds_each_row_once_per_head():
    # P=2, n=6, W=4, R=3, H=4: rows of each head's offset, padded to the largest count
    sel = sharded_module.branch_selection(2, 6, 4, 4, 3)
    for rank in range(2):
        for head in range(4):
            rows = sel.position[rank, :, head][sel.valid[rank, :, head]].tolist()
            expected = [p for p in range(rank * 6, rank * 6 + 6) if p % 4 % 3 == head % 3]
            assert rows == expected
    assert sharded_module.window(0, 2, 6, 4) == (0, 2) and sharded_module.window(1, 2, 6, 4) == (0, 2)
    assert sharded_module.window(2, 3, 6, 4) == (2, 3)  # its segments [12, 16), [16, 18) are its own
