"""LongNet models: encoder and decoder stacks, the encoder-decoder, and the decoder-only LM.

Legend: B batch, N tokens, M memory (encoder output) tokens, E embed dim (d_model), V vocabulary.

The LM follows the LongNet paper's language model (Ding et al. 2023, arXiv 2307.02486, sec. 4):
a decoder-only stack of causal dilated attention; the defaults of `LongNetLM` are its base
configuration (768 wide, 12 heads, 12 layers, FFN 3072, segments 2K..32K, rates 1, 2, 4, 6, 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.attention.global_queries import GlobalQueries
from mmlongnet.layers.multiway import MultiwayRouting
from mmlongnet.layers.token_shift import TokenShift
from mmlongnet.models.blocks import (
    LongNetDecoderLayer,
    LongNetEncoderLayer,
    check_num_layers,
    layer_config,
    magneto_encoder_decoder_gammas,
    magneto_gamma,
)
from mmlongnet.pretrained import Pretrained


class _LayerStack(nn.Module):
    """`num_layers` layers of `layer_class` and a final LayerNorm (the shared part of the stacks).

    Args:
        num_layers: the layers of the stack.
        config: a `LongNetLayerConfig`; or its fields as arguments (`d_model, nhead,
            dim_feedforward=..., ...`, see `LongNetEncoderLayer`), which build it.
        gamma_init: MAGNETO initialisation gain of every layer (default sqrt(log(2 * num_layers))).
        layer_options: the role of the layers (`num_ways` of an encoder, `cross_attention` of a
            decoder), device and dtype: keywords of `layer_class`.
    """

    layer_class: type[nn.Module]

    def __init__(
        self,
        num_layers: int,
        config: LongNetLayerConfig | int,
        *args,
        gamma_init: float | None,
        layer_options: dict,
        **kwargs,
    ) -> None:
        super().__init__()
        check_num_layers(num_layers=num_layers)
        config = layer_config(config, args, kwargs)
        gamma = magneto_gamma(num_layers) if gamma_init is None else gamma_init
        self.layers = nn.ModuleList(
            self.layer_class(config, gamma_init=gamma, **layer_options) for _ in range(num_layers)
        )
        factory = {"device": layer_options["device"], "dtype": layer_options["dtype"]}
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, **factory)


class LongNetEncoder(_LayerStack):
    """A stack of `LongNetEncoderLayer`s with a final LayerNorm.

    Args: num_layers, then a `LongNetLayerConfig` or its fields as arguments; gamma_init (default
    MAGNETO's sqrt(log(2 * num_layers))), num_ways, device, dtype as keywords.

    forward(x (B, N, E), key_padding_mask (B, N) bool True = padding, is_causal=False, *,
    position_offset=0, modality_ids=None, global_queries=None) -> (B, N, E); `modality_ids` (B, N) long
    (or a `MultiwayRouting`) routes the tokens of multiway layers (num_ways > 1; the final LayerNorm is
    shared); `global_queries` (a `GlobalQueries`) marks rows whose self-attention is dense in every layer.
    """

    layer_class = LongNetEncoderLayer

    def __init__(
        self,
        num_layers: int,
        config: LongNetLayerConfig | int,
        *args,
        gamma_init: float | None = None,
        num_ways: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        options = {"num_ways": num_ways, "device": device, "dtype": dtype}
        super().__init__(num_layers, config, *args, gamma_init=gamma_init, layer_options=options, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        position_offset: int = 0,
        modality_ids: torch.Tensor | MultiwayRouting | None = None,
        global_queries: GlobalQueries | None = None,
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(
                x, key_padding_mask, is_causal, position_offset=position_offset, modality_ids=modality_ids,
                global_queries=global_queries,
            )  # fmt: skip
        return self.norm(x)


class LongNetDecoder(_LayerStack):
    """A stack of `LongNetDecoderLayer`s with a final LayerNorm.

    Args: num_layers, then a `LongNetLayerConfig` or its fields as arguments; gamma_init (default
    MAGNETO's sqrt(log(2 * num_layers))), cross_attention ("dense", "dilated" or None, see
    `LongNetDecoderLayer`), device, dtype as keywords.

    forward(x (B, N, E), memory (B, M, E) or None, key_padding_mask (B, N),
    memory_key_padding_mask (B, M), *, position_offset=0, kv_caches=None) -> (B, N, E);
    `kv_caches`: one `DilatedKVCache` per layer (see `new_caches`) for token-by-token decoding.
    """

    layer_class = LongNetDecoderLayer

    def __init__(
        self,
        num_layers: int,
        config: LongNetLayerConfig | int,
        *args,
        gamma_init: float | None = None,
        cross_attention: Literal["dilated", "dense"] | None = "dense",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        options = {"cross_attention": cross_attention, "device": device, "dtype": dtype}
        super().__init__(num_layers, config, *args, gamma_init=gamma_init, layer_options=options, **kwargs)

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


@dataclass(kw_only=True)
class LongNetConfig(LongNetLayerConfig):
    """The arguments of `LongNet`: the layer fields of both stacks, their depths and the
    cross-attention (keyword-only)."""

    d_model: int = 512
    """E, the width."""
    nhead: int = 8
    """Attention heads."""
    positions: Literal["rope", "xpos", "relative"] | None = "rope"
    """Positions of both stacks' self-attention (see `LongNetLayerConfig.positions`)."""
    num_encoder_layers: int = 6
    """Encoder layers (N)."""
    num_decoder_layers: int = 6
    """Decoder layers (M)."""
    cross_attention: Literal["dilated", "dense"] = "dense"
    """"dense" (every target token attends to all memory tokens), or "dilated" (source and target
    of one length, paired by position)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_layers(
            num_encoder_layers=self.num_encoder_layers, num_decoder_layers=self.num_decoder_layers
        )
        if self.cross_attention not in ("dilated", "dense"):
            raise ValueError(f"cross_attention must be 'dilated' or 'dense', got {self.cross_attention!r}")


class LongNet(nn.Module):
    """LongNet encoder-decoder on embeddings, with `nn.Transformer(batch_first=True)`'s call.

    Args:
        config: a `LongNetConfig` (512 wide, 8 heads, 6 + 6 layers, FFN 2048, RoPE, dense
            cross-attention); or, as a convenience, its fields as keywords, which build it.

    Initialised with MAGNETO's encoder-decoder gains (sqrt(log(3M) log(2N) / 3) for the
    encoder, sqrt(log(3M)) for the decoder).

    forward(src (B, M, E), tgt (B, N, E), src_key_padding_mask (B, M), tgt_key_padding_mask (B, N),
    memory_key_padding_mask (B, M), default: src_key_padding_mask) -> (B, N, E).
    """

    def __init__(
        self,
        config: LongNetConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            config = LongNetConfig(**kwargs)
        elif not isinstance(config, LongNetConfig) or kwargs:
            raise TypeError(
                f"pass a LongNetConfig or its fields as keywords, got {type(config).__name__} and "
                f"{sorted(kwargs)}"
            )
        self.config = config
        gammas = magneto_encoder_decoder_gammas(config.num_encoder_layers, config.num_decoder_layers)
        factory = {"device": device, "dtype": dtype}
        self.encoder = LongNetEncoder(config.num_encoder_layers, config, gamma_init=gammas[0], **factory)
        self.decoder = LongNetDecoder(
            config.num_decoder_layers, config, gamma_init=gammas[1], cross_attention=config.cross_attention,
            **factory,
        )  # fmt: skip

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


@dataclass(kw_only=True)
class LongNetLMConfig(LongNetLayerConfig):
    """The arguments of `LongNetLM` (what `LongNetLM.save_pretrained` writes to config.json): the
    vocabulary, the layer fields, the depth; the defaults are the LongNet paper's base LM. Only
    num_tokens is positional."""

    num_tokens: int = field(kw_only=False)
    """V, the vocabulary size."""
    d_model: int = 768
    """E, the width."""
    nhead: int = 12
    """Attention heads."""
    dim_feedforward: int = 3072
    """FFN hidden size."""
    dropout: float = 0.0
    """Residual and FFN dropout."""
    positions: Literal["rope", "xpos", "relative"] | None = "rope"
    """Positions of the causal self-attention (see `LongNetLayerConfig.positions`; "relative"
    is unidirectional here)."""
    num_layers: int = 12
    """Decoder layers."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    embedding_std: float | None = None
    """Initial std of the token embedding; None: d_model^-0.5 (with the MAGNETO gain, the layers'
    outputs then start about 10x larger than the embeddings). For tasks that match tokens over
    distance, larger embeddings learn much faster: on associative recall at CPU scale (64 tokens,
    2 layers, 64 wide, 16 pairs, 32 values, untied), `embedding_std=4.0`, or 1.0 with
    `gamma_init=0.3`, learned the task in 500-750 steps on each of 3 seeds, where the defaults
    stayed at 0.13-0.16 accuracy after 6,000. Use it untied: tied, a large embedding makes large
    logits."""
    gamma_init: float | None = None
    """MAGNETO initialisation gain of the layers; None: the paper's sqrt(log(2 * num_layers))."""
    token_shift: int = 0
    """W: a causal `TokenShift` of width W on the token embeddings (each token adds a learned
    per-channel mix of itself and its W - 1 predecessors; starts as the identity); 0: none, the
    paper's model. Dilated attention pairs rows of one residue mod each branch's rate, so a
    token reaches a distant one in one layer only where their positions agree mod the rate; with
    W >= the largest rate + 1, every token's neighbourhood is in reach. Not with sequence
    sharding."""
    token_shift_window: float = 0.0
    """The share of the token shift's channels that hold the fixed sum of the W tokens up to each
    one, not learned (`TokenShift(window_share=)`); 0: every channel learned. A learned shift
    starts as the identity and, trained, keeps to the token just before: on associative recall
    at 16K tokens a dilated model then reached a pair only from queries of its value's residue
    mod the rates (0.443); with half the channels fixed to the window and no position encoding
    (`positions=None`) it reached pairs at every residue, 0.968 (one H200, README
    "Associative recall at 16K")."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_layers(num_tokens=self.num_tokens, num_layers=self.num_layers)
        if (
            isinstance(self.token_shift, bool)
            or not isinstance(self.token_shift, int)
            or self.token_shift < 0
        ):
            raise ValueError(f"token_shift must be an int >= 0 (0: none), got {self.token_shift!r}")
        window = self.token_shift_window
        if isinstance(window, bool) or not isinstance(window, int | float) or not 0 <= window <= 1:
            raise ValueError(f"token_shift_window must be a share in [0, 1], got {window!r}")
        if window and self.token_shift < 2:
            raise ValueError(
                f"token_shift_window={window} needs a token shift of width >= 2 (token_shift="
                f"{self.token_shift}): the window sums each token with the ones before it"
            )
        for name in ("embedding_std", "gamma_init"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            ):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")


class LongNetLM(Pretrained, nn.Module):
    """Decoder-only LongNet language model (the paper's LM; defaults = its base configuration).

    Args:
        config: a `LongNetLMConfig`; or, as a convenience, its fields (`LongNetLM(num_tokens,
            d_model=..., ...)`), which build it. `attention="dense"` is full causal attention, the
            baseline LongNet is compared with.

    forward(tokens (B, N) long, key_padding_mask (B, N) bool True = padding, *, kv_caches=None)
    -> logits (B, N, V). Incremental decoding: `caches = new_caches()`, then the prompt and each
    new token in turn with `kv_caches=caches` (what `generate` does).

    `save_pretrained(dir)` / `LongNetLM.from_pretrained(dir or hub id)`: config.json (`LongNetLMConfig`)
    and model.safetensors; `self.config` holds the config.
    """

    config_class = LongNetLMConfig

    def __init__(
        self,
        config: LongNetLMConfig | int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(config, LongNetLMConfig):
            config = LongNetLMConfig(**kwargs) if config is None else LongNetLMConfig(config, **kwargs)
        elif kwargs:
            raise TypeError(
                f"pass a LongNetLMConfig or its fields as keywords, not both; got {sorted(kwargs)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.num_tokens, self.d_model = config.num_tokens, config.d_model
        self.embedding = nn.Embedding(config.num_tokens, config.d_model, **factory)
        self.token_shift = (
            TokenShift(config.d_model, config.token_shift, window_share=config.token_shift_window, **factory)
            if config.token_shift
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = LongNetDecoder(
            config.num_layers, config, cross_attention=None, gamma_init=config.gamma_init, **factory
        )
        self.lm_head = nn.Linear(config.d_model, config.num_tokens, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding ~ N(0, embedding_std^2) (default 1 / d_model), output projection ~ N(0, 1 /
        d_model); the layers initialise themselves."""
        std = self.config.embedding_std
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5 if std is None else std)
        if self.lm_head.weight is not self.embedding.weight:
            nn.init.normal_(self.lm_head.weight, std=self.d_model**-0.5)
        if self.token_shift is not None:
            self.token_shift.reset_parameters()

    def new_caches(self) -> DecodingCaches:
        """What incremental decoding runs with (`forward(..., kv_caches=)`): one `DilatedKVCache`
        per layer, and the token shift's last inputs."""
        return DecodingCaches(self.decoder.new_caches())

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
        x = self.embedding(tokens)  # (B, N, E)
        if self.token_shift is not None:
            x = self._shift(x, key_padding_mask, kv_caches)
        x = self.decoder(self.dropout(x), key_padding_mask=key_padding_mask, kv_caches=kv_caches)  # (B, N, E)
        return self.lm_head(x)  # (B, N, V)

    def _shift(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        kv_caches: Sequence[DilatedKVCache] | None,
    ) -> torch.Tensor:
        """x (B, N, E) after the token shift; padding adds nothing to its neighbours, and with
        `kv_caches` (`new_caches()`) the shift continues from the previous call's last tokens."""
        if key_padding_mask is not None:
            x = x.masked_fill(key_padding_mask[..., None], 0.0)
        if kv_caches is None:
            return self.token_shift(x)
        if not isinstance(kv_caches, DecodingCaches):
            raise TypeError(
                "LongNetLM with token_shift decodes with LongNetLM.new_caches() (which also keep the "
                f"shift's last inputs), got {type(kv_caches).__name__}"
            )
        history = kv_caches.shift_history
        kv_caches.shift_history = self.token_shift.last_inputs(x, history)
        return self.token_shift(x, history)

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
        caches = self.new_caches() if use_cache else None
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


class DecodingCaches(list):
    """`LongNetLM.new_caches()`: a list of one `DilatedKVCache` per decoder layer, and the token
    shift's last W - 1 inputs (`shift_history`, (B, W - 1, E); None before the first call or
    without a shift)."""

    def __init__(self, caches: Sequence[DilatedKVCache]) -> None:
        super().__init__(caches)
        self.shift_history: torch.Tensor | None = None


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
