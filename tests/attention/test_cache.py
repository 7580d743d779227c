"""DilatedKVCache: token-by-token causal dilated attention equals the full causal op, row by row."""

import pytest
import torch

from mmlongnet.attention import DilatedKVCache, dilated_attention

SCHEDULES = [
    ([4, 8, 16], [1, 2, 4], 4),  # segments nest, rates divide the head count
    ([5, 12], [2, 3], 3),  # segments that do not divide each other, w % r != 0
    ([6, 10], [4, 3], 5),  # w % r != 0 for both branches, 5 heads over offsets 0-3 and 0-2
    ([3], [1], 2),  # plain local attention
    ([7, 9], [7, 9], 2),  # rates above the head count: some positions are skipped by every head
]


@pytest.mark.parametrize(("segments", "rates", "heads"), SCHEDULES)
@pytest.mark.parametrize("prompt", [1, 4, 9, 16])
def test_steps_equal_the_rows_of_full_causal_attention(segments, rates, heads, prompt):
    torch.manual_seed(prompt)
    q, k, v = (torch.randn(2, 41, heads, 6, dtype=torch.float64) for _ in range(3))
    full = dilated_attention(q, k, v, segments, rates, is_causal=True, backend="reference")
    cache = DilatedKVCache(segments, rates)
    cache.prefill(k[:, :prompt], v[:, :prompt])
    steps = [cache.step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]) for t in range(prompt, 41)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, prompt:], rtol=1e-12, atol=1e-12)
    assert cache.length == 41


def test_memory_is_bounded_by_the_segments_not_the_generated_length():
    segments, rates, heads, dim = [8, 32], [1, 4], 4, 2
    cache = DilatedKVCache(segments, rates)
    k = torch.randn(1, 3, heads, dim)
    cache.prefill(k, k)
    held = cache.memory_bytes()
    for _ in range(200):
        cache.step(k[:, :1], k[:, :1], k[:, :1])
    assert cache.memory_bytes() == held
    slots = sum(-(-w // r) for w, r in zip(segments, rates, strict=True))  # 8 + 8
    assert held == 2 * slots * heads * dim * k.element_size()


def test_low_precision_steps_stay_within_the_bf16_error_of_the_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 30, 4, 8) for _ in range(3))
    exact = dilated_attention(q.double(), k.double(), v.double(), [4, 16], [1, 2], is_causal=True)
    low = [t.bfloat16() for t in (q, k, v)]
    reference_error = (dilated_attention(*low, [4, 16], [1, 2], is_causal=True, backend="reference").double()
                       - exact)[:, 10:].abs().max()  # fmt: skip
    cache = DilatedKVCache([4, 16], [1, 2])
    cache.prefill(low[1][:, :10], low[2][:, :10])
    steps = torch.cat([cache.step(*(t[:, i : i + 1] for t in low)) for i in range(10, 30)], dim=1)
    assert steps.dtype == torch.bfloat16
    assert (steps.double() - exact[:, 10:]).abs().max() <= 2 * reference_error


def test_misuse_raises():
    cache = DilatedKVCache([4], [1])
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="prefill"):
        cache.step(x, x, x)
    cache.prefill(x, x)
    with pytest.raises(RuntimeError, match="already holds"):
        cache.prefill(x, x)
    with pytest.raises(ValueError, match="equal length"):
        DilatedKVCache([4, 8], [1])
