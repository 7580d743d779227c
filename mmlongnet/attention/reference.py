"""The ground truth of dilated attention: one dense, masked softmax over the branches' keys.

Legend: B batch, N tokens, H heads, D head dim. Memory is O(H * N^2): for tests and small inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def branch_multiplicity(
    seq_len: int,
    num_heads: int,
    segment_lengths: list[int],
    dilation_rates: list[int],
    *,
    is_causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """How many branches let query i of head h see key j: (H, N, N) int64.

    Branch (w, r): i and j lie in the same segment [s*w, (s+1)*w) and both have in-segment
    index t with t mod r == h mod r; causal keeps j <= i.
    """
    positions = torch.arange(seq_len, device=device)
    heads = torch.arange(num_heads, device=device)
    count = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.int64, device=device)
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        segment = positions // w
        selected = (positions % w % r)[None, :] == (heads % r)[:, None]  # (H, N)
        same_segment = segment[:, None] == segment[None, :]  # (N, N)
        count += (selected[:, :, None] & selected[:, None, :] & same_segment).long()
    if is_causal:
        count = count.tril()
    return count


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dilated attention computed densely: softmax over all keys with score + log(multiplicity).

    q, k, v: (B, N, H, D); key_padding_mask: (B, N) bool, True = padding; position_bias: (H, N, N)
    or (B, H, N, N) additive score bias. Returns (B, N, H, D).
    A key reached through m branches counts m times; a query with no reachable key outputs 0.
    Differentiable by autograd in any dtype and on any device.
    """
    _, seq_len, num_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    count = branch_multiplicity(
        seq_len, num_heads, segment_lengths, dilation_rates, is_causal=is_causal, device=q.device
    )
    allowed = (count > 0)[None]  # (1, H, N, N)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale + count.to(q.dtype).log()
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    dead = ~allowed.any(-1, keepdim=True)  # rows with no key: softmax over zeros, then zeroed
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, v)
