"""`nn.Module` wrappers of dilated attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmlongnet.attention.dilated import BACKENDS, check_schedule, dilated_attention


class DilatedAttention(nn.Module):
    """Dilated attention over (B, N, H, D) queries, keys and values (no projections).

    Args:
        segment_lengths: segment length of each branch, e.g. [2048, 4096, 8192].
        dilation_rates: dilation rate of each branch, e.g. [1, 2, 4].
        softmax_scale: score scale, default 1 / sqrt(D).
        attention_dropout: dropout on the attention probabilities, applied in training mode only.
        backend: see `dilated_attention` ("auto", "reference", "sdpa", "flash_attn").

    forward(q, k, v, is_causal=False, key_padding_mask=None, position_bias=None) -> (B, N, H, D),
    with key_padding_mask (B, N) bool, True = padding, and position_bias (H, N, N) or (B, H, N, N)
    added to the scores (the dense reference backend only). Single-device code: to run it on one
    rank's slice of a sequence, `mmlongnet.distributed.parallelize_sequence` swaps it for its
    sharded twin.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        softmax_scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_schedule(segment_lengths, dilation_rates)
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        self.softmax_scale = softmax_scale
        self.attention_dropout = attention_dropout
        self.backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
            key_padding_mask=key_padding_mask, position_bias=position_bias, softmax_scale=self.softmax_scale,
            dropout_p=self.attention_dropout if self.training else 0.0, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"attention_dropout={self.attention_dropout}, backend={self.backend!r}"
        )
