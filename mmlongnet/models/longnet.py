"""LongNet models: encoder and decoder stacks, the encoder-decoder, and the decoder-only LM.

Legend: B batch, N tokens, M memory (encoder output) tokens, E embed dim (d_model), V vocabulary.

The LM follows the LongNet paper's language model (Ding et al. 2023, arXiv 2307.02486, sec. 4):
a decoder-only stack of causal dilated attention; the defaults of `LongNetLM` are its base
configuration (768 wide, 12 heads, 12 layers, FFN 3072, segments 2K..32K, rates 1, 2, 4, 6, 12).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlongnet._config import check_field_types
from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.multihead import PositionsArg
from mmlongnet.layers.feedforward import Activation
from mmlongnet.layers.multiway import MultiwayRouting
from mmlongnet.models.blocks import (
    LONGNET_DILATION_RATES,
    LONGNET_SEGMENT_LENGTHS,
    LongNetDecoderLayer,
    LongNetEncoderLayer,
    check_block_args,
    magneto_encoder_decoder_gammas,
    magneto_gamma,
)
from mmlongnet.pretrained import Pretrained


class _LayerStack(nn.Module):
    """`num_layers` layers of `layer_class` and a final LayerNorm (the shared part of the stacks)."""

    layer_class: type[nn.Module]

    def __init__(
        self, num_layers: int, d_model: int, nhead: int, *, gamma_init: float | None = None, **layer_kwargs
    ):
        super().__init__()
        check_block_args(
            d_model, nhead, layer_kwargs.get("dim_feedforward", 2048), 0.0, num_layers=num_layers
        )
        gamma = magneto_gamma(num_layers) if gamma_init is None else gamma_init
        self.layers = nn.ModuleList(
            self.layer_class(d_model, nhead, gamma_init=gamma, **layer_kwargs) for _ in range(num_layers)
        )
        factory = {k: layer_kwargs[k] for k in ("device", "dtype") if k in layer_kwargs}
        self.norm = nn.LayerNorm(d_model, eps=layer_kwargs.get("layer_norm_eps", 1e-5), **factory)


class LongNetEncoder(_LayerStack):
    """A stack of `LongNetEncoderLayer`s with a final LayerNorm.

    Args: num_layers, then the arguments of `LongNetEncoderLayer` (gamma_init defaults to
    MAGNETO's sqrt(log(2 * num_layers))).

    forward(x (B, N, E), key_padding_mask (B, N) bool True = padding, is_causal=False, *,
    position_offset=0, modality_ids=None) -> (B, N, E); `modality_ids` (B, N) long (or a
    `MultiwayRouting`) routes the tokens of multiway layers (num_ways > 1; the final LayerNorm is shared).
    """

    layer_class = LongNetEncoderLayer

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        position_offset: int = 0,
        modality_ids: torch.Tensor | MultiwayRouting | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(
                x, key_padding_mask, is_causal, position_offset=position_offset, modality_ids=modality_ids
            )
        return self.norm(x)


class LongNetDecoder(_LayerStack):
    """A stack of `LongNetDecoderLayer`s with a final LayerNorm.

    Args: num_layers, then the arguments of `LongNetDecoderLayer` (gamma_init defaults to
    MAGNETO's sqrt(log(2 * num_layers))).

    forward(x (B, N, E), memory (B, M, E) or None, key_padding_mask (B, N),
    memory_key_padding_mask (B, M), *, position_offset=0, kv_caches=None) -> (B, N, E);
    `kv_caches`: one `DilatedKVCache` per layer (see `new_caches`) for token-by-token decoding.
    """

    layer_class = LongNetDecoderLayer

    def new_caches(self) -> list[DilatedKVCache]:
        """Empty key/value caches, one per layer, for `forward(..., kv_caches=...)`."""
        attn = self.layers[0].self_attn
        if attn.attention != "dilated":
            raise ValueError("cached decoding needs dilated self-attention (this decoder is dense)")
        return [DilatedKVCache(attn.segment_lengths, attn.dilation_rates) for _ in self.layers]

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        *,
        position_offset: int = 0,
        kv_caches: Sequence[DilatedKVCache] | None = None,
    ) -> torch.Tensor:
        if kv_caches is not None and len(kv_caches) != len(self.layers):
            raise ValueError(
                f"kv_caches must hold one cache per layer ({len(self.layers)}), got {len(kv_caches)}"
            )
        for i, layer in enumerate(self.layers):
            x = layer(
                x, memory, key_padding_mask, memory_key_padding_mask, position_offset=position_offset,
                kv_cache=kv_caches[i] if kv_caches is not None else None,
            )  # fmt: skip
        return self.norm(x)


class LongNet(nn.Module):
    """LongNet encoder-decoder on embeddings, with `nn.Transformer(batch_first=True)`'s call.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward: sizes.
        segment_lengths, dilation_rates: the dilated-attention schedule of both stacks.
        dropout, attention_dropout, activation, layer_norm_eps, checkpoint_activations, backend:
            as in `LongNetEncoderLayer`.
        positions: positions of both stacks' self-attention ("rope" by default).
        cross_attention: "dense" (default) or "dilated" (source and target of one length).

    Initialised with MAGNETO's encoder-decoder gains (sqrt(log(3M) log(2N) / 3) for the
    encoder, sqrt(log(3M)) for the decoder).

    forward(src (B, M, E), tgt (B, N, E), src_key_padding_mask (B, M), tgt_key_padding_mask (B, N),
    memory_key_padding_mask (B, M), default: src_key_padding_mask) -> (B, N, E).
    """

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: Activation = "gelu",
        layer_norm_eps: float = 1e-5,
        positions: PositionsArg = "rope",
        cross_attention: Literal["dilated", "dense"] = "dense",
        checkpoint_activations: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_block_args(
            d_model, nhead, dim_feedforward, dropout, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
        )  # fmt: skip
        gamma_encoder, gamma_decoder = magneto_encoder_decoder_gammas(num_encoder_layers, num_decoder_layers)
        shared = dict(
            dim_feedforward=dim_feedforward, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
            dropout=dropout, attention_dropout=attention_dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, positions=positions, checkpoint_activations=checkpoint_activations,
            backend=backend, device=device, dtype=dtype,
        )  # fmt: skip
        self.encoder = LongNetEncoder(num_encoder_layers, d_model, nhead, gamma_init=gamma_encoder, **shared)
        self.decoder = LongNetDecoder(
            num_decoder_layers,
            d_model,
            nhead,
            gamma_init=gamma_decoder,
            cross_attention=cross_attention,
            **shared,
        )

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = self.encoder(src, src_key_padding_mask)  # (B, M, E)
        if memory_key_padding_mask is None:
            memory_key_padding_mask = src_key_padding_mask
        return self.decoder(tgt, memory, tgt_key_padding_mask, memory_key_padding_mask)  # (B, N, E)


@dataclass
class LongNetLMConfig:
    """The arguments of `LongNetLM` (what `LongNetLM.save_pretrained` writes to config.json)."""

    num_tokens: int
    """V, the vocabulary size."""
    d_model: int = 768
    """E, the width."""
    nhead: int = 12
    """Attention heads."""
    num_layers: int = 12
    """Decoder layers."""
    dim_feedforward: int = 3072
    """FFN hidden size."""
    segment_lengths: list[int] = field(default_factory=lambda: list(LONGNET_SEGMENT_LENGTHS))
    """Segment length of each dilated-attention branch."""
    dilation_rates: list[int] = field(default_factory=lambda: list(LONGNET_DILATION_RATES))
    """Dilation rate of each branch."""
    dropout: float = 0.0
    """Residual and FFN dropout."""
    attention_dropout: float = 0.0
    """Dropout of the attention weights."""
    activation: Activation = "gelu"
    """FFN activation."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    positions: PositionsArg = "rope"
    """"rope", "xpos", "relative" or None."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    checkpoint_activations: bool = False
    """Recompute each layer in the backward."""
    attention: Literal["dilated", "dense"] = "dilated"
    """"dilated", or "dense" (full causal attention)."""
    backend: str = "auto"
    """The dilated-attention backend."""

    def __post_init__(self) -> None:
        check_field_types(self)  # the values themselves are checked by `LongNetLM`


class LongNetLM(Pretrained, nn.Module):
    """Decoder-only LongNet language model (the paper's LM; defaults = its base configuration).

    Args:
        num_tokens: V, the vocabulary size.
        d_model, nhead, num_layers, dim_feedforward: sizes (768, 12, 12, 3072).
        segment_lengths, dilation_rates: [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12].
        dropout, attention_dropout, activation, layer_norm_eps, checkpoint_activations, backend:
            as in `LongNetEncoderLayer`.
        positions: "rope" (default), "xpos", "relative" or None.
        tie_embeddings: share the token embedding with the output projection.
        attention: "dilated", or "dense" (full causal attention: the baseline LongNet is compared with).

    forward(tokens (B, N) long, key_padding_mask (B, N) bool True = padding) -> logits (B, N, V).

    `save_pretrained(dir)` / `LongNetLM.from_pretrained(dir or hub id)`: config.json (`LongNetLMConfig`)
    and model.safetensors; `self.config` holds the arguments.
    """

    config_class = LongNetLMConfig

    @classmethod
    def _from_config(cls, config: LongNetLMConfig) -> LongNetLM:
        return cls(**dataclasses.asdict(config))

    def __init__(
        self,
        num_tokens: int,
        d_model: int = 768,
        nhead: int = 12,
        num_layers: int = 12,
        dim_feedforward: int = 3072,
        segment_lengths: Sequence[int] = LONGNET_SEGMENT_LENGTHS,
        dilation_rates: Sequence[int] = LONGNET_DILATION_RATES,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation: Activation = "gelu",
        layer_norm_eps: float = 1e-5,
        positions: PositionsArg = "rope",
        tie_embeddings: bool = False,
        checkpoint_activations: bool = False,
        attention: Literal["dilated", "dense"] = "dilated",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        check_block_args(d_model, nhead, dim_feedforward, dropout, num_layers=num_layers)
        factory = {"device": device, "dtype": dtype}
        self.config = LongNetLMConfig(
            num_tokens, d_model, nhead, num_layers, dim_feedforward, list(segment_lengths),
            list(dilation_rates), dropout, attention_dropout, activation, layer_norm_eps, positions,
            tie_embeddings, checkpoint_activations, attention, backend,
        )  # fmt: skip
        self.num_tokens, self.d_model = num_tokens, d_model
        self.embedding = nn.Embedding(num_tokens, d_model, **factory)
        self.dropout = nn.Dropout(dropout)
        self.decoder = LongNetDecoder(
            num_layers, d_model, nhead, dim_feedforward=dim_feedforward, segment_lengths=segment_lengths,
            dilation_rates=dilation_rates, dropout=dropout, attention_dropout=attention_dropout,
            activation=activation, layer_norm_eps=layer_norm_eps, positions=positions,
            checkpoint_activations=checkpoint_activations, self_attention=attention, cross_attention=None,
            backend=backend, **factory,
        )  # fmt: skip
        self.lm_head = nn.Linear(d_model, num_tokens, bias=False, **factory)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding and output projection ~ N(0, 1 / d_model); the layers initialise themselves."""
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5)
        if self.lm_head.weight is not self.embedding.weight:
            nn.init.normal_(self.lm_head.weight, std=self.d_model**-0.5)

    def forward(
        self,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        kv_caches: Sequence[DilatedKVCache] | None = None,
    ) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a (B, N) long tensor, got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a (B, N) long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        self._check_ids(tokens)
        x = self.dropout(self.embedding(tokens))  # (B, N, E)
        x = self.decoder(x, key_padding_mask=key_padding_mask, kv_caches=kv_caches)  # (B, N, E)
        return self.lm_head(x)  # (B, N, V)

    def _check_ids(self, tokens: torch.Tensor) -> None:
        """Token ids outside [0, V) raise before the embedding: a ValueError naming the first one for
        CPU tensors (read in NumPy, no dispatcher op); on a device, or while compiled, an asynchronous
        assert, so that the check costs no host sync (it fails at the next sync instead)."""
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            ids = tokens.numpy()
            bad = (ids < 0) | (ids >= self.num_tokens)
            if bad.any():
                row, col = (int(i) for i in np.argwhere(bad)[0])
                raise ValueError(
                    f"tokens[{row}, {col}] = {int(ids[row, col])} is outside the vocabulary "
                    f"[0, {self.num_tokens})"
                )
        elif tokens.numel():
            inside = ((tokens >= 0) & (tokens < self.num_tokens)).all()
            torch._assert_async(
                inside, f"LongNetLM: a token id is outside the vocabulary [0, {self.num_tokens})"
            )

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue `tokens` (B, N) long by `max_new_tokens`; returns (B, N + max_new_tokens).

        temperature=0 is greedy decoding; otherwise tokens are sampled from softmax(logits / T),
        restricted to the top_k most likely when given. With `use_cache` (default) every layer keeps
        a `DilatedKVCache`: per branch only the keys/values of its current segment, so memory is
        bounded by the segment lengths, not by the generated length; the result equals decoding
        with a full forward pass per token (`use_cache=False`). Put the model in eval mode first.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be an int or None, got {top_k!r}")
        if top_k is not None and not 0 < top_k <= self.num_tokens:
            raise ValueError(f"top_k must be in [1, num_tokens={self.num_tokens}], got {top_k}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty (B, N) prompt, got {tuple(tokens.shape)}")
        caches = self.decoder.new_caches() if use_cache else None
        logits = self(tokens, kv_caches=caches)[:, -1]  # (B, V)
        generated = [tokens]
        for step in range(max_new_tokens):
            next_token = _sample(logits, temperature, top_k, generator)  # (B, 1)
            generated.append(next_token)
            if step + 1 == max_new_tokens:
                break
            if caches is not None:
                logits = self(next_token, kv_caches=caches)[:, -1]
            else:
                logits = self(torch.cat(generated, dim=1))[:, -1]
        return torch.cat(generated, dim=1)


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next tokens: argmax for temperature 0, else a (top-k) sample."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
