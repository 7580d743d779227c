"""The dense reference against independent, slow constructions of the same mathematics."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmlongnet.attention import branch_multiplicity, dilated_attention_reference


def slow_mixture(q, k, v, segment_lengths, dilation_rates, is_causal=False, key_padding_mask=None):
    """Per query: concatenate each branch's key set (duplicates kept), one softmax over it."""
    batch, seq_len, num_heads, head_dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(num_heads):
            for i in range(seq_len):
                keys = []
                for w, r in zip(segment_lengths, dilation_rates, strict=True):
                    start = i // w * w
                    if (i - start) % r != h % r:
                        continue
                    for j in range(start + h % r, min(start + w, seq_len), r):
                        if is_causal and j > i:
                            continue
                        if key_padding_mask is not None and key_padding_mask[b, j]:
                            continue
                        keys.append(j)
                if not keys:
                    continue
                scores = torch.stack([q[b, i, h] @ k[b, j, h] for j in keys]) / math.sqrt(head_dim)
                out[b, i, h] = torch.softmax(scores, 0) @ v[b, keys, h]
    return out


@pytest.mark.parametrize(
    ("seq_len", "segment_lengths", "dilation_rates", "num_heads", "is_causal", "masked"),
    [
        (13, [4, 8], [1, 2], 3, False, False),
        (13, [4, 8], [1, 2], 3, True, True),
        (10, [3, 5, 16], [1, 3, 4], 2, False, True),
        (9, [4], [2], 5, True, False),
    ],
)
def test_reference_equals_softmax_over_concatenated_branch_keys(
    seq_len, segment_lengths, dilation_rates, num_heads, is_causal, masked
):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, seq_len, num_heads, 4, dtype=torch.float64) for _ in range(3))
    mask = None
    if masked:
        mask = torch.zeros(2, seq_len, dtype=torch.bool)
        mask[0, -4:] = True
        mask[1, :3] = True
    expected = slow_mixture(q, k, v, segment_lengths, dilation_rates, is_causal, mask)
    actual = dilated_attention_reference(
        q, k, v, segment_lengths, dilation_rates, is_causal=is_causal, key_padding_mask=mask
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_multiplicity_counts_branches_that_reach_a_pair():
    count = branch_multiplicity(8, 2, [4, 8], [1, 2])
    # head 0 (offset 0 in both branches): query 0 and key 2 share segment [0,4) of branch 1
    # and are both even rows of branch 2's segment [0, 8).
    assert count[0, 0, 2].item() == 2
    assert count[0, 0, 4].item() == 1  # only branch 2 (different segments of branch 1)
    assert count[1, 0, 1].item() == 1  # head 1: offset 1 in branch 2 skips row 0; branch 1 counts
    assert count[1, 1, 5].item() == 1  # rows 1 and 5: odd rows of branch 2
    assert count[0, 1, 5].item() == 0


def test_single_dense_branch_is_scaled_dot_product_attention():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 11, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        ours = dilated_attention_reference(q, k, v, [11], [1], is_causal=causal)
        theirs = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
