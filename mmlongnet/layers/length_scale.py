"""Scalable-Softmax (SSMax; Nakanishi 2025, arXiv 2501.19399): attention scores scaled by s * log n.

Legend: B batch, N query tokens, M keys, H heads, D head dim.

Softmax over n keys flattens as n grows: with fixed scores, the largest weight falls like 1/n, so
a head that singles out (or counts) a few keys at one length loses them at a longer one. SSMax
multiplies each query's scores by s_h * log(n), n the keys in its context and s_h a learned scale
per head: key weights become n^(s_h * score), so a score margin of 1 / s_h over the other keys
keeps a key's weight as n grows, at every length alike. Scaling the scores is scaling the query,
so it runs before any attention kernel, on every backend and schedule.

n of a query: its sample's keys that are not padding; causal, those at or before it (with a
decoding cache, every position the cache has seen, plus the query's own). With dilated attention
n is the context the query belongs to, not the keys its branches reach: the branches' own counts
grow with n too, slower, and s_h absorbs the difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def context_lengths(
    key_len: int,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    cached: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n of every query, float32: (B or 1, M) causal (query i is key i), (B or 1, 1) not.

    Args:
        key_len: M, the keys of the call (causal: the queries too).
        key_padding_mask: (B, M) bool, True = padding, or None.
        is_causal: count the keys at or before each query only.
        cached: positions a decoding cache holds before the call's first key (causal only).
    """
    if key_padding_mask is None:
        if is_causal:
            return torch.arange(cached + 1, cached + key_len + 1, device=device, dtype=torch.float32)[None]
        return torch.full((1, 1), float(key_len), device=device)
    valid = (~key_padding_mask).to(torch.float32)  # (B, M)
    return cached + valid.cumsum(1) if is_causal else valid.sum(1, keepdim=True)


class LengthScale(nn.Module):
    """SSMax's query scale: q (B, N, H, D) -> q * s_h * log(n), n from `context_lengths`.

    Args:
        num_heads: H; one learned scale s_h each.
        reference_length: n0 >= 2: every s_h starts at 1 / log(n0), so scores keep their values at
            n0 keys, shorter contexts start softer and longer ones sharper.

    forward(q (B, N, H, D), key_len M, key_padding_mask (B, M) or None, is_causal, cached=0) -> q
    scaled, same shape and dtype. A query with n <= 1 (one key or none) gets scale 0: its single
    key takes all the weight either way, and a query with none outputs zeros.
    """

    def __init__(self, num_heads: int, reference_length: int, *, device=None, dtype=None) -> None:
        super().__init__()
        check_reference_length(reference_length)
        self.reference_length = reference_length
        self.scale = nn.Parameter(torch.empty(num_heads, device=device, dtype=dtype))  # (H,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, 1.0 / math.log(self.reference_length))

    def forward(
        self,
        q: torch.Tensor,
        key_len: int,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        cached: int = 0,
    ) -> torch.Tensor:
        n = context_lengths(key_len, key_padding_mask, is_causal, cached, q.device)  # (B or 1, N or 1)
        exact = torch.float64 if q.dtype == torch.float64 else torch.float32  # the factor's dtype
        log_n = n.to(exact).clamp(min=1.0).log()
        factor = log_n[..., None] * self.scale.to(exact)  # (B or 1, N or 1, H)
        return q * factor[..., None].to(q.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.scale.numel()}, reference_length={self.reference_length}"


def check_reference_length(value) -> None:
    """ValueError unless `value` is an int >= 2 (log n0 must be positive)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"the scalable softmax's reference length must be an int >= 2 (keys), got {value!r}")
