"""LongNet transformer blocks: pre-LN, MAGNETO sub-LN in attention and FFN, dilated attention.

Legend: B batch, N tokens, M memory (encoder output) tokens, E embed dim (d_model).

Each block is x + dropout(attention(LN(x))) [+ x + dropout(cross_attention(LN(x), memory))]
+ x + dropout(ffn(LN(x))), where attention and FFN carry MAGNETO's sub-LayerNorm
(Wang et al. 2022, arXiv 2210.06423) and its initialisation gain `gamma_init`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.attention.global_queries import GlobalQueries
from mmlongnet.attention.multihead import MultiheadDilatedAttention
from mmlongnet.layers.feedforward import FeedForward
from mmlongnet.layers.multiway import MultiwayRouting, maybe_multiway, route, route_chain

# The former positional arguments of the layers, in their order (the keyword convenience).
_POSITIONAL_FIELDS = ("d_model", "nhead", "dim_feedforward", "segment_lengths", "dilation_rates")


def magneto_gamma(num_layers: int) -> float:
    """MAGNETO's initialisation gain for an encoder-only or decoder-only stack: sqrt(log(2L))."""
    return math.sqrt(math.log(2 * num_layers))


def magneto_encoder_decoder_gammas(num_encoder_layers: int, num_decoder_layers: int) -> tuple[float, float]:
    """MAGNETO's gains (encoder, decoder) for an encoder-decoder with N and M layers:
    sqrt(log(3M) * log(2N) / 3) and sqrt(log(3M))."""
    n, m = num_encoder_layers, num_decoder_layers
    return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m))


def layer_config(config: LongNetLayerConfig | int, args: tuple, kwargs: dict) -> LongNetLayerConfig:
    """`config` itself, or the config that keyword arguments describe: `config` is then d_model,
    and `args` the next of (nhead, dim_feedforward, segment_lengths, dilation_rates)."""
    if isinstance(config, LongNetLayerConfig):
        if args or kwargs:
            raise TypeError(
                f"pass a {type(config).__name__} or its fields as arguments, not both; got a config and "
                f"{sorted(kwargs) or f'{len(args)} positional arguments'}"
            )
        return config
    if len(args) >= len(_POSITIONAL_FIELDS):
        raise TypeError(f"at most {len(_POSITIONAL_FIELDS)} positional fields {_POSITIONAL_FIELDS}, got more")
    return LongNetLayerConfig(**dict(zip(_POSITIONAL_FIELDS, (config, *args), strict=False)), **kwargs)


def check_num_layers(**counts: int) -> None:
    """ValueError naming the count that is not a positive int."""
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(f"{name} must be a positive int, got {count!r}")


class _LongNetBlock(nn.Module):
    """Self-attention (+ optional cross-attention) + FFN, pre-LN; see the encoder/decoder layers."""

    def __init__(
        self,
        config: LongNetLayerConfig,
        *,
        causal: bool,
        cross_attention: Literal["dilated", "dense"] | None,
        num_ways: int,
        gamma_init: float,
        device,
        dtype,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_model, eps = config.d_model, config.layer_norm_eps
        self.self_attn_norm = maybe_multiway(nn.LayerNorm(d_model, eps=eps, **factory), num_ways)
        self.self_attn = MultiheadDilatedAttention.from_config(
            config, causal=causal, num_ways=num_ways, gamma_init=gamma_init, **factory
        )
        self.cross_attn_norm = self.cross_attn = None
        if cross_attention is not None:
            self.cross_attn_norm = nn.LayerNorm(d_model, eps=eps, **factory)
            self.cross_attn = MultiheadDilatedAttention.from_config(
                config, cross_attention=cross_attention, gamma_init=gamma_init, **factory
            )
        self.ffn_norm = maybe_multiway(nn.LayerNorm(d_model, eps=eps, **factory), num_ways)
        self.ffn = FeedForward(
            d_model, config.dim_feedforward, config.activation, config.dropout, layer_norm_eps=eps,
            gamma_init=gamma_init, **factory,
        )  # fmt: skip
        self.ffn = maybe_multiway(self.ffn, num_ways)
        self.dropout = nn.Dropout(config.dropout)
        self.checkpoint_activations = config.checkpoint_activations

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
        global_queries: GlobalQueries | None = None,
    ) -> torch.Tensor:
        h = route(self.self_attn_norm, x, modality_ids)
        h, _ = self.self_attn(
            h, h, h, key_padding_mask=key_padding_mask, is_causal=is_causal, position_offset=position_offset,
            kv_cache=kv_cache, modality_ids=modality_ids, global_queries=global_queries,
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
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class LongNetEncoderLayer(_LongNetBlock):
    """A LongNet encoder layer: dilated self-attention and FFN, pre-LN with MAGNETO sub-LN.

    Args:
        config: a `LongNetLayerConfig`; or, as a convenience, its fields as arguments
            (`LongNetEncoderLayer(d_model, nhead, dim_feedforward, segment_lengths, dilation_rates,
            dropout=..., ...)`), which build it.
        num_ways: > 1 makes the projections, FFN and norms multiway experts (one per modality,
            `MultiwayNetwork`) routed by `modality_ids`; the attention itself spans all tokens.
        gamma_init: MAGNETO initialisation gain (the stacks pass the paper's value).

    forward(src (B, N, E), src_key_padding_mask (B, N) bool True = padding, is_causal=False, *,
    position_offset=0, modality_ids (B, N) long when num_ways > 1, global_queries=None) -> (B, N, E);
    `global_queries` (a `GlobalQueries`): rows whose self-attention is dense over all tokens.
    """

    def __init__(
        self,
        config: LongNetLayerConfig | int,
        *args,
        num_ways: int = 1,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            layer_config(config, args, kwargs), causal=False, cross_attention=None, num_ways=num_ways,
            gamma_init=gamma_init, device=device, dtype=dtype,
        )  # fmt: skip

    def forward(
        self,
        src: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        position_offset: int = 0,
        modality_ids: torch.Tensor | MultiwayRouting | None = None,
        global_queries: GlobalQueries | None = None,
    ) -> torch.Tensor:
        return self._run(
            src, src_key_padding_mask, is_causal, None, None, position_offset, None, modality_ids,
            global_queries,
        )  # fmt: skip


class LongNetDecoderLayer(_LongNetBlock):
    """A LongNet decoder layer: causal dilated self-attention, cross-attention, FFN (pre-LN, sub-LN).

    Args:
        config: a `LongNetLayerConfig`, or its fields as arguments (see `LongNetEncoderLayer`).
        cross_attention: "dense" (default: every target token attends to all memory tokens, any M),
            "dilated" (memory of the target's length, paired by position), or None (no
            cross-attention: a decoder-only language model's layer).
        gamma_init: MAGNETO initialisation gain (the stacks pass the paper's value).

    forward(tgt (B, N, E), memory (B, M, E) or None, tgt_key_padding_mask (B, N),
    memory_key_padding_mask (B, M), *, position_offset=0, kv_cache=None) -> (B, N, E).
    Self-attention is always causal (positions="relative" uses a unidirectional bias); `kv_cache`
    (a `DilatedKVCache`) decodes token by token.
    """

    def __init__(
        self,
        config: LongNetLayerConfig | int,
        *args,
        cross_attention: Literal["dilated", "dense"] | None = "dense",
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        if cross_attention not in ("dilated", "dense", None):
            raise ValueError(f"cross_attention must be 'dilated', 'dense' or None, got {cross_attention!r}")
        super().__init__(
            layer_config(config, args, kwargs), causal=True, cross_attention=cross_attention, num_ways=1,
            gamma_init=gamma_init, device=device, dtype=dtype,
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
