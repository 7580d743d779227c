"""The benchmark's FLOP counting: exact attended-pair counts against a brute-force mask count."""

import pytest
import torch
from benchmark_loader import load_benchmark

bench = load_benchmark("attention")


def brute_force_pairs(n, segment_lengths, dilation_rates, heads, causal):
    """Count pairs from explicit (N, N) masks, built row by row from the definition."""
    position = torch.arange(n)
    total = 0
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        segment = position // w  # (N,) segment of each token; the last one may be partial
        within = position % w  # (N,) index t within the segment
        for h in range(heads):
            selected = within % r == h % r  # (N,)
            mask = selected[:, None] & selected[None, :] & (segment[:, None] == segment[None, :])  # (N, N)
            if causal:
                mask &= position[None, :] <= position[:, None]
            total += int(mask.sum())
    return total


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("n", "segment_lengths", "dilation_rates", "heads"),
    [
        (64, [16], [1], 1),  # dense segments
        (64, [8, 16, 32], [1, 2, 4], 4),  # N a multiple of every W
        (70, [8, 16, 32], [1, 2, 4], 4),  # partial last segment
        (10, [16, 32], [1, 2], 3),  # N shorter than every W: one segment
        (50, [12, 20], [5, 6], 7),  # W % R != 0, offsets with fewer rows, more heads than R
        (45, [8, 16], [6, 12], 16),  # R > W / 2, offsets with no row in the last segment
        (97, [2, 4, 8, 16, 32], [1, 2, 4, 6, 12], 16),  # the "lm" schedule, scaled down
    ],
)
def test_count_pairs_matches_brute_force(n, segment_lengths, dilation_rates, heads, causal):
    expected = brute_force_pairs(n, segment_lengths, dilation_rates, heads, causal)
    assert bench.count_pairs(n, segment_lengths, dilation_rates, heads, causal) == expected


def test_paper_schedule_work_at_one_million_tokens():
    # every branch has W / R = 2048 rows per head: 2048 * N * (1 + 1/2 + ... + 1/16) pairs per head
    n, heads = 2**20, 16
    pairs = bench.count_pairs(n, *bench.SCHEDULES["paper"], heads)
    assert pairs == heads * n * 2048 * 31 // 16
    assert bench.useful_flops(pairs, 64, "fwd") == 4 * 64 * pairs
    assert bench.useful_flops(pairs, 64, "fwdbwd") == 3.5 * 4 * 64 * pairs


def test_dense_segment_baseline_shapes():
    # (S, L) per branch: B * ceil(N / W) segments of ceil(min(W, N) / R) rows
    assert bench.dense_segment_shape(2**20, 1, 32768, 16) == (32, 2048)
    assert bench.dense_segment_shape(2**20, 2, 16384, 6) == (128, 2731)
    assert bench.dense_segment_shape(8192, 1, 32768, 16) == (1, 512)
