"""LongNet transformer blocks: pre-LN, MAGNETO sub-LN in attention and FFN, dilated attention.

Legend: B batch, N tokens, M memory (encoder output) tokens, E embed dim (d_model).

Each block is x + dropout(attention(LN(x))) [+ x + dropout(cross_attention(LN(x), memory))]
+ x + dropout(ffn(LN(x))), where attention and FFN carry MAGNETO's sub-LayerNorm
(Wang et al. 2022, arXiv 2210.06423) and its initialisation gain `gamma_init`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.dilated import check_schedule
from mmlongnet.attention.multihead import MultiheadDilatedAttention, PositionsArg
from mmlongnet.attention.sharding import current_shard, use_shard
from mmlongnet.layers.feedforward import Activation, FeedForward
from mmlongnet.layers.multiway import MultiwayRouting, maybe_multiway, route, route_chain
from mmlongnet.layers.relative_bias import RelativePositionBias

LONGNET_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
LONGNET_DILATION_RATES = (1, 2, 4, 6, 12)  # the LongNet paper's language-model schedule


def magneto_gamma(num_layers: int) -> float:
    """MAGNETO's initialisation gain for an encoder-only or decoder-only stack: sqrt(log(2L))."""
    return math.sqrt(math.log(2 * num_layers))


def magneto_encoder_decoder_gammas(num_encoder_layers: int, num_decoder_layers: int) -> tuple[float, float]:
    """MAGNETO's gains (encoder, decoder) for an encoder-decoder with N and M layers:
    sqrt(log(3M) * log(2N) / 3) and sqrt(log(3M))."""
    n, m = num_encoder_layers, num_decoder_layers
    return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m))


def check_block_args(d_model: int, nhead: int, dim_feedforward: int, dropout: float, **counts: int) -> None:
    """ValueError naming the field for a bad width, head count, FFN size, dropout or layer count."""
    if not isinstance(d_model, int) or d_model <= 0:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    if not isinstance(nhead, int) or nhead <= 0 or d_model % nhead:
        raise ValueError(f"nhead must be a positive divisor of d_model={d_model}, got nhead={nhead!r}")
    if not isinstance(dim_feedforward, int) or dim_feedforward <= 0:
        raise ValueError(f"dim_feedforward must be a positive int, got {dim_feedforward!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    for name, count in counts.items():
        if not isinstance(count, int) or count <= 0:
            raise ValueError(f"{name} must be a positive int, got {count!r}")


class _LongNetBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + FFN, pre-LN; see the encoder/decoder layers."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        dropout: float,
        attention_dropout: float,
        activation: Activation,
        layer_norm_eps: float,
        positions: PositionsArg,
        gamma_init: float,
        checkpoint_activations: bool,
        self_attention: Literal["dilated", "dense"],
        cross_attention: Literal["dilated", "dense"] | None,
        num_ways: int,
        backend: str,
        device,
        dtype,
    ) -> None:
        super().__init__()
        check_block_args(d_model, nhead, dim_feedforward, dropout)
        segment_lengths, dilation_rates = check_schedule(segment_lengths, dilation_rates)
        factory = {"device": device, "dtype": dtype}
        common = dict(
            dropout=attention_dropout, layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, backend=backend,
            **factory,
        )  # fmt: skip
        self.self_attn_norm = maybe_multiway(nn.LayerNorm(d_model, eps=layer_norm_eps, **factory), num_ways)
        self.self_attn = MultiheadDilatedAttention(
            d_model, nhead, segment_lengths, dilation_rates, positions=positions, attention=self_attention,
            num_ways=num_ways, **common,
        )  # fmt: skip
        self.cross_attn_norm = self.cross_attn = None
        if cross_attention is not None:
            self.cross_attn_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
            self.cross_attn = MultiheadDilatedAttention(
                d_model, nhead, segment_lengths, dilation_rates, attention=cross_attention, **common
            )
        self.ffn_norm = maybe_multiway(nn.LayerNorm(d_model, eps=layer_norm_eps, **factory), num_ways)
        self.ffn = FeedForward(
            d_model, dim_feedforward, activation, dropout, layer_norm_eps=layer_norm_eps,
            gamma_init=gamma_init, **factory,
        )  # fmt: skip
        self.ffn = maybe_multiway(self.ffn, num_ways)
        self.dropout = nn.Dropout(dropout)
        self.checkpoint_activations = checkpoint_activations

    def _forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        memory: torch.Tensor | None,
        memory_key_padding_mask: torch.Tensor | None,
        position_offset: int,
        kv_cache: DilatedKVCache | None,
        modality_ids: torch.Tensor | MultiwayRouting | None,
    ) -> torch.Tensor:
        h = route(self.self_attn_norm, x, modality_ids)
        h, _ = self.self_attn(
            h, h, h, key_padding_mask=key_padding_mask, is_causal=is_causal, position_offset=position_offset,
            kv_cache=kv_cache, modality_ids=modality_ids,
        )  # fmt: skip
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("this decoder layer has cross-attention: pass memory (B, M, E)")
            h, _ = self.cross_attn(
                self.cross_attn_norm(x), memory, memory, key_padding_mask=memory_key_padding_mask
            )
            x = x + self.dropout(h)
        return x + self.dropout(route_chain((self.ffn_norm, self.ffn), x, modality_ids))

    def _run(self, *args) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # The recomputation in backward runs under the sequence shard of the forward (if any),
            # also when backward is called after the `sequence_parallel` block has been left.
            shard = current_shard()
            return checkpoint(
                self._forward,
                *args,
                use_reentrant=False,
                context_fn=lambda: (nullcontext(), use_shard(shard)),
            )
        return self._forward(*args)


class LongNetEncoderLayer(_LongNetBlock):
    """A LongNet encoder layer: dilated self-attention and FFN, pre-LN with MAGNETO sub-LN.

    Args:
        d_model: E; nhead: heads (E divisible by nhead); dim_feedforward: FFN hidden size.
        segment_lengths, dilation_rates: the dilated-attention schedule.
        dropout: residual and FFN-hidden dropout; attention_dropout: on attention probabilities
            (runs the dense reference attention, so keep 0 for long inputs).
        activation: "gelu", "relu" or "silu"; layer_norm_eps: LayerNorm epsilon.
        positions: "rope", "xpos", "relative", a position module, or None (see
            `MultiheadDilatedAttention`).
        gamma_init: MAGNETO initialisation gain (the stacks pass the paper's value).
        checkpoint_activations: recompute this layer in the backward instead of storing activations.
        self_attention: "dilated", or "dense" for full attention (a baseline).
        num_ways: > 1 makes the projections, FFN and norms multiway experts (one per modality,
            `MultiwayNetwork`) routed by `modality_ids`; the attention itself spans all tokens.
        backend: the `dilated_attention` backend.

    forward(src (B, N, E), src_key_padding_mask (B, N) bool True = padding, is_causal=False, *,
    position_offset=0, modality_ids (B, N) long when num_ways > 1) -> (B, N, E).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: Activation = "gelu",
        layer_norm_eps: float = 1e-5,
        positions: PositionsArg = None,
        gamma_init: float = 1.0,
        checkpoint_activations: bool = False,
        self_attention: Literal["dilated", "dense"] = "dilated",
        num_ways: int = 1,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, segment_lengths, dilation_rates, dropout, attention_dropout,
            activation, layer_norm_eps, positions, gamma_init, checkpoint_activations, self_attention, None,
            num_ways, backend, device, dtype,
        )  # fmt: skip

    def forward(
        self,
        src: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        position_offset: int = 0,
        modality_ids: torch.Tensor | MultiwayRouting | None = None,
    ) -> torch.Tensor:
        return self._run(
            src, src_key_padding_mask, is_causal, None, None, position_offset, None, modality_ids
        )


class LongNetDecoderLayer(_LongNetBlock):
    """A LongNet decoder layer: causal dilated self-attention, cross-attention, FFN (pre-LN, sub-LN).

    Args: those of `LongNetEncoderLayer`, plus
        cross_attention: "dense" (default: every target token attends to all memory tokens, any M),
            "dilated" (memory of the target's length, paired by position), or None (no
            cross-attention: a decoder-only language model's layer).

    forward(tgt (B, N, E), memory (B, M, E) or None, tgt_key_padding_mask (B, N),
    memory_key_padding_mask (B, M), *, position_offset=0, kv_cache=None) -> (B, N, E).
    Self-attention is always causal (positions="relative" uses a unidirectional bias); `kv_cache`
    (a `DilatedKVCache`) decodes token by token.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: Activation = "gelu",
        layer_norm_eps: float = 1e-5,
        positions: PositionsArg = None,
        gamma_init: float = 1.0,
        checkpoint_activations: bool = False,
        self_attention: Literal["dilated", "dense"] = "dilated",
        cross_attention: Literal["dilated", "dense"] | None = "dense",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if positions == "relative":  # causal: distances to past keys only
            positions = RelativePositionBias(nhead, bidirectional=False, device=device, dtype=dtype)
        super().__init__(
            d_model, nhead, dim_feedforward, segment_lengths, dilation_rates, dropout, attention_dropout,
            activation, layer_norm_eps, positions, gamma_init, checkpoint_activations, self_attention,
            cross_attention, 1, backend, device, dtype,
        )  # fmt: skip

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        *,
        position_offset: int = 0,
        kv_cache: DilatedKVCache | None = None,
    ) -> torch.Tensor:
        if kv_cache is not None:  # decoding: no recomputation to save
            return self._forward(tgt, tgt_key_padding_mask, True, memory, memory_key_padding_mask,
                                 position_offset, kv_cache, None)  # fmt: skip
        return self._run(
            tgt, tgt_key_padding_mask, True, memory, memory_key_padding_mask, position_offset, None, None
        )
