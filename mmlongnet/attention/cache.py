"""Key/value cache for causal dilated attention, one token at a time.

Legend: B batch, N tokens, H heads, D head dim, W segment length, R dilation rate,
C = ceil(W / R) cache slots of one branch, Ho heads of one offset.

A causal query at position t, in branch (W, R), lies in the segment starting at s = t - t mod W
and is selected for the heads h with h mod R == (t - s) mod R; it attends to the keys of its
segment at positions s + o + j*R <= t for those heads (o its offset). So the branch only ever needs
the keys of its current segment, and of each key only the heads whose offset selects it: slot j
of head h holds position s + (h mod R) + j*R. That is C slots per branch, independent of how
many tokens have been generated: the cache of a layer holds sum_i ceil(W_i / R_i) positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmlongnet.attention.dilated import check_schedule
from mmlongnet.attention.merge import accumulation_dtype, merge_lse, merge_weighted

# (query position, key positions (n,)) -> additive score bias (H, n)
ScoreBias = Callable[[int, torch.Tensor], torch.Tensor]


class DilatedKVCache:
    """The keys and values each branch of causal dilated attention still attends to.

    Usage: `prefill(k, v)` with the keys/values of a prompt at positions [0, N) (after running
    the prompt through `dilated_attention(..., is_causal=True)`), then `step(q, k, v)` for each new
    token, which returns exactly the output row that causal `dilated_attention` over the whole
    sequence would give at that position.

    Args:
        segment_lengths, dilation_rates: the branch schedule of the attention it serves.
    """

    def __init__(self, segment_lengths: list[int], dilation_rates: list[int]) -> None:
        self.segment_lengths, self.dilation_rates = check_schedule(segment_lengths, dilation_rates)
        self.length = 0  # tokens seen so far: the position of the next token
        self.keys: list[torch.Tensor] = []  # per branch (B, C, H, D)
        self.values: list[torch.Tensor] = []

    def _branches(self):
        return zip(self.segment_lengths, self.dilation_rates, strict=True)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store what the branches keep of a prompt's keys and values, k, v: (B, N, H, D)."""
        if self.length:
            raise RuntimeError("DilatedKVCache.prefill: the cache already holds tokens; use a new cache")
        batch, seq_len, num_heads, head_dim = k.shape
        self.keys, self.values = [], []
        for w, r in self._branches():
            start = seq_len - seq_len % w  # the segment the next token falls in
            slots = -(-w // r)
            keys = k.new_zeros(batch, slots, num_heads, head_dim)  # (B, C, H, D)
            values = v.new_zeros(batch, slots, num_heads, head_dim)
            for offset in range(min(r, num_heads)):
                rows = slice(start + offset, seq_len, r)  # this offset's positions in the segment
                count = len(range(seq_len)[rows])
                keys[:, :count, offset::r] = k[:, rows, offset::r]
                values[:, :count, offset::r] = v[:, rows, offset::r]
            self.keys.append(keys)
            self.values.append(values)
        self.length = seq_len

    @torch.no_grad()
    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        softmax_scale: float | None = None,
        score_bias: ScoreBias | None = None,
    ) -> torch.Tensor:
        """Attend from the next token, q, k, v: (B, 1, H, D), and add its key/value to the cache.

        `score_bias(t, key_positions)` may return an additive (H, n) bias (e.g. a relative position
        bias). Returns (B, 1, H, D), equal to row t of causal dilated attention over all t + 1 tokens.
        """
        if not self.keys:
            raise RuntimeError("DilatedKVCache.step: call prefill(k, v) with the prompt first")
        batch, _, num_heads, head_dim = q.shape
        t = self.length
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        acc_dtype = accumulation_dtype(q.dtype)
        lse = q.new_full((batch, num_heads), float("-inf"), dtype=acc_dtype)  # (B, H)
        parts = []
        for (w, r), keys, values in zip(self._branches(), self.keys, self.values, strict=True):
            in_segment = t % w
            offset, slot = in_segment % r, in_segment // r
            if offset >= num_heads:  # no head selects this position in this branch
                continue
            heads = slice(offset, num_heads, r)
            keys[:, slot, heads] = k[:, 0, heads]
            values[:, slot, heads] = v[:, 0, heads]
            query = q[:, 0, heads].to(acc_dtype)  # (B, Ho, D)
            branch_keys = keys[:, : slot + 1, heads].to(acc_dtype)  # (B, n, Ho, D)
            scores = torch.einsum("bhd,bnhd->bhn", query, branch_keys) * scale  # (B, Ho, n)
            if score_bias is not None:
                positions = t - in_segment + offset + r * torch.arange(slot + 1, device=q.device)
                scores = scores + score_bias(t, positions)[heads].to(acc_dtype)
            branch_lse = scores.logsumexp(-1)  # (B, Ho)
            probs = torch.exp(scores - branch_lse[..., None])
            out = torch.einsum("bhn,bnhd->bhd", probs, values[:, : slot + 1, heads].to(acc_dtype))
            merge_lse(lse[:, heads], branch_lse)
            parts.append((heads, out, branch_lse))
        out = q.new_zeros((batch, num_heads, head_dim), dtype=acc_dtype)  # (B, H, D)
        for heads, branch_out, branch_lse in parts:
            merge_weighted(out[:, heads], branch_out, branch_lse, lse[:, heads])
        self.length = t + 1
        return out.to(q.dtype)[:, None]  # (B, 1, H, D)

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
