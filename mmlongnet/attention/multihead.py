"""Multi-head dilated attention: a drop-in for `nn.MultiheadAttention(batch_first=True)`.

Legend: B batch, N query tokens, M key tokens, E embed dim, H heads, D = E / H head dim.

Projections q/k/v -> positions (RoPE, XPOS or a relative position bias) -> dilated attention
-> MAGNETO sub-LayerNorm -> output projection (Wang et al. 2022, "Foundation Transformers",
arXiv 2210.06423: the extra LayerNorm before the output projection, and the initialisation that
scales the value and output projections by gamma).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmlongnet.attention.cache import DilatedKVCache
from mmlongnet.attention.config import POSITIONS, LongNetLayerConfig, xpos_block_length
from mmlongnet.attention.dilated import BACKENDS, check_schedule
from mmlongnet.attention.global_queries import GlobalQueries
from mmlongnet.attention.kernels import aligned_bias, biased_attention
from mmlongnet.attention.modules import DilatedAttention
from mmlongnet.layers.length_scale import LengthScale
from mmlongnet.layers.multiway import (
    MultiwayRouting,
    expert_parameters,
    maybe_multiway,
    route,
    route_chain,
    route_parallel,
)
from mmlongnet.layers.relative_bias import RelativePositionBias
from mmlongnet.layers.rope import RotaryEmbedding, rotary_dims
from mmlongnet.layers.xpos import XPos

PositionsArg = Literal["rope", "xpos", "relative"] | RotaryEmbedding | XPos | RelativePositionBias | None


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Full softmax attention over all keys, through `F.scaled_dot_product_attention`; with a
    mask or bias on CUDA (and no dropout), through the memory-efficient kernel (`biased_attention`),
    which builds no execution plan per shape, so that eager calls of ever new lengths (inference on
    real batches, global rows) cost no more than repeated ones.

    q: (B, N, H, D); k, v: (B, M, H, D); key_padding_mask: (B, M) bool, True = padding;
    position_bias: (H, N, M) or (B, H, N, M). Returns (B, N, H, D); a sample whose keys are all
    padding outputs zeros (never NaN).
    """
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"is_causal needs keys of the query length, got N={q.shape[1]} and M={k.shape[1]}")
    mask, empty = position_bias, None
    if key_padding_mask is not None:
        empty = key_padding_mask.all(-1)  # (B,) samples without any key
        padding = key_padding_mask & ~empty[:, None]  # unmask them: their output is zeroed below
        bias = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill(padding, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, M)
        mask = bias if mask is None else mask.to(q.dtype) + bias
    if is_causal and mask is not None:  # SDPA takes one of attn_mask / is_causal: fold causality in
        n = q.shape[1]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        mask = mask.to(q.dtype).masked_fill(future, float("-inf"))
        is_causal = False
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N or M, D)
    if mask is not None and q.device.type == "cuda" and dropout_p == 0.0:
        scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
        out = biased_attention(qh, kh, vh, aligned_bias(mask, qh, kh), scale)
    else:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=softmax_scale
        )
    out = out.transpose(1, 2)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def attend_globally(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    queries: GlobalQueries,
    *,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    read_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out` (B, N, H, D), another attention's output, with the global rows' outputs replaced by
    dense attention of their queries over all of k, v (q, k, v (B, N, H, D); see
    `mmlongnet.attention.global_queries`). key_padding_mask (B, N) bool, True = padding;
    position_bias (H, N, N), if the attention has one. With `read_gate` (H,), the other rows also
    read the global rows: each adds read_gate[h] times its softmax attention over the global rows'
    keys alone (zero in a sample without global rows). Differentiable in every input."""
    index, valid = queries.rows()  # (B, G), (B, G)
    if index.shape[1] == 0:
        return out
    batch, _, heads, dim = q.shape
    rows = index[:, :, None, None].expand(batch, index.shape[1], heads, dim)  # (B, G, H, D)
    if read_gate is not None:
        bias = None  # (B, H, N, G): the bias of each row to each global row
        if position_bias is not None:
            bias = position_bias[:, :, index].permute(2, 0, 1, 3)
        read = dense_attention(
            q, k.gather(1, rows), v.gather(1, rows), key_padding_mask=~valid, position_bias=bias,
            softmax_scale=softmax_scale, dropout_p=dropout_p,
        )  # (B, N, H, D)  # fmt: skip
        out = out + (read * read_gate[:, None]).to(out.dtype)
    bias = None if position_bias is None else position_bias[:, index].transpose(0, 1)  # (B, H, G, N)
    dense = dense_attention(
        q.gather(1, rows), k, v, key_padding_mask=key_padding_mask, position_bias=bias,
        softmax_scale=softmax_scale, dropout_p=dropout_p,
    )  # (B, G, H, D)  # fmt: skip
    placed = torch.where(valid[..., None, None], dense.to(out.dtype), out.gather(1, rows))
    return out.scatter(1, rows, placed)


def _positions_module(positions: PositionsArg, head_dim: int, num_heads: int, segment_lengths: list[int]):
    if positions is None or isinstance(positions, RotaryEmbedding | XPos | RelativePositionBias):
        return positions
    if positions == "rope":
        return RotaryEmbedding(head_dim)
    if positions == "xpos":
        return XPos(head_dim, block_length=xpos_block_length(segment_lengths))
    if positions == "relative":
        return RelativePositionBias(num_heads)
    raise ValueError(f"positions must be one of {POSITIONS}, a position module or None, got {positions!r}")


def _check_role(num_ways: int, gamma_init: float) -> None:
    """ValueError for what a layer's place in a model sets: its number of experts and its MAGNETO gain."""
    if isinstance(num_ways, bool) or not isinstance(num_ways, int) or num_ways < 1:
        raise ValueError(f"num_ways must be a positive int, got {num_ways!r}")
    if not gamma_init > 0:
        raise ValueError(f"gamma_init must be positive, got {gamma_init}")


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention with MAGNETO sub-LayerNorm; `nn.MultiheadAttention`'s interface.

    Args:
        embed_dim: E, the model width; num_heads: H, with E divisible by H.
        segment_lengths, dilation_rates: the branch schedule of dilated attention.
        dropout: dropout on the attention probabilities (training mode only).
        bias: biases in the input and output projections.
        layer_norm: MAGNETO sub-LayerNorm before the output projection.
        layer_norm_eps: its epsilon.
        gamma_init: MAGNETO gain of the value and output projections (the models pass
            sqrt(log(2 * num_layers)) for a decoder-only stack, as the paper prescribes).
        kdim, vdim: feature sizes of key and value inputs (default E).
        batch_first: must be True (inputs are (B, N, E)).
        positions: "rope", "xpos" (relative to blocks of the largest segment length),
            "relative" (T5 bias, dense reference backend only), a position module, or None.
        attention: "dilated" (keys of the query length, paired by position) or "dense" (full
            attention over keys of any length M, e.g. cross-attention to an encoder's output).
        num_ways: > 1 makes the projections and the sub-LayerNorm multiway experts (one per
            modality, `MultiwayNetwork`), routed by `modality_ids` (B, N) (or a `MultiwayRouting`) in
            forward; the attention itself is shared (self-attention only).
        backend: the `dilated_attention` backend.
        scalable_softmax: None (plain softmax), or n0 >= 2: Scalable-Softmax (SSMax, arXiv
            2501.19399), each head's scores multiplied by s_h * log(n), n the keys of the query's
            context, s_h learned and starting at 1 / log(n0) (`mmlongnet.layers.length_scale`);
            the submodule `length_scale` (None without it). A relative position bias is added
            unscaled.
        global_read: with `global_queries` in forward, the other rows also read the global rows:
            each adds g_h times its softmax attention over the global rows' keys alone, g_h a
            learned per-head gate (`global_read_gate` (H,), None without it) that starts at 0, so
            the layer starts as without it (`attend_globally`).

    forward(query (B, N, E), key (B, M, kdim), value (B, M, vdim), key_padding_mask (B, M) bool
    True = padding, need_weights=False, attn_mask=None, is_causal=False, *, position_offset=0,
    kv_cache=None, modality_ids=None, global_queries=None) -> (out (B, N, E), None). `position_offset` is the
    position of the first token (a slice of a longer sequence); `kv_cache` a `DilatedKVCache` for
    token-by-token decoding; `global_queries` a `GlobalQueries`: the rows it marks attend to every
    key, densely (bidirectional dilated self-attention only; `mmlongnet.attention.global_queries`).
    With attention="dilated" the attention itself is the submodule `inner_attention`, a
    `DilatedAttention` (None for "dense"), which `mmlongnet.distributed.parallelize_sequence` swaps
    for its sharded twin.

    `MultiheadDilatedAttention.from_config(config)` builds the attention of a LongNet layer from a
    `LongNetLayerConfig` (the blocks of `mmlongnet.models` do).

    Weight mapping from `nn.MultiheadAttention` (see `from_multihead_attention`): `in_proj_weight`
    rows [0, E), [E, 2E), [2E, 3E) are `q_proj`, `k_proj`, `v_proj` (or its separate
    `q/k/v_proj_weight`), `in_proj_bias` likewise, `out_proj` is `out_proj`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        positions: PositionsArg = None,
        *,
        attention: Literal["dilated", "dense"] = "dilated",
        num_ways: int = 1,
        backend: str = "auto",
        scalable_softmax: int | None = None,
        global_read: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        if not batch_first:
            raise ValueError("batch_first must be True: inputs are (B, N, E)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if attention not in ("dilated", "dense"):
            raise ValueError(f"attention must be 'dilated' or 'dense', got {attention!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if global_read and attention != "dilated":
            raise ValueError("global_read serves dilated self-attention (attention='dilated')")
        _check_role(num_ways, gamma_init)
        segment_lengths, dilation_rates = check_schedule(segment_lengths, dilation_rates)
        self._build(
            embed_dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, bias=bias,
            layer_norm=layer_norm, layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, kdim=kdim, vdim=vdim,
            positions=positions, attention=attention, num_ways=num_ways, backend=backend,
            scalable_softmax=scalable_softmax, global_read=global_read,
            factory={"device": device, "dtype": dtype},
        )  # fmt: skip

    @classmethod
    def from_config(
        cls,
        config: LongNetLayerConfig,
        *,
        cross_attention: Literal["dilated", "dense"] | None = None,
        causal: bool = False,
        num_ways: int = 1,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MultiheadDilatedAttention:
        """The self-attention of a LongNet layer, or with `cross_attention` its cross-attention of
        that kind (no positions, no scalable softmax, no global read): width, heads, schedule,
        attention dropout, LayerNorm epsilon, positions (and the rotary fraction), attention kind,
        backend, scalable softmax and global read come from `config`, validated when it was made and
        not checked again. `causal`: a self-attention that only ever runs causally, whose
        positions="relative" bias then measures distances to past keys only. `num_ways` and
        `gamma_init` as in the constructor."""
        _check_role(num_ways, gamma_init)
        positions = config.positions if cross_attention is None else None
        scalable_softmax = config.scalable_softmax if cross_attention is None else None
        if positions == "relative" and causal:
            positions = RelativePositionBias(config.nhead, bidirectional=False, device=device, dtype=dtype)
        if positions == "rope" and config.rotary_fraction != 1.0:
            head_dim = config.d_model // config.nhead
            positions = RotaryEmbedding(head_dim, rotary_dim=rotary_dims(head_dim, config.rotary_fraction))
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._build(
            config.d_model, config.nhead, config.segment_lengths, config.dilation_rates,
            dropout=config.attention_dropout, bias=True, layer_norm=True,
            layer_norm_eps=config.layer_norm_eps, gamma_init=gamma_init, kdim=None, vdim=None,
            positions=positions, attention=cross_attention or config.attention, num_ways=num_ways,
            backend=config.backend, scalable_softmax=scalable_softmax,
            global_read=config.global_read and cross_attention is None,
            factory={"device": device, "dtype": dtype},
        )  # fmt: skip
        return module

    def _build(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: list[int],
        dilation_rates: list[int],
        *,
        dropout: float,
        bias: bool,
        layer_norm: bool,
        layer_norm_eps: float,
        gamma_init: float,
        kdim: int | None,
        vdim: int | None,
        positions: PositionsArg,
        attention: Literal["dilated", "dense"],
        num_ways: int,
        backend: str,
        scalable_softmax: int | None,
        global_read: bool,
        factory: dict,
    ) -> None:
        """Make the projections, norms and positions of arguments already checked (by the
        constructor, or by the `LongNetLayerConfig` of `from_config`)."""
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.dropout, self.gamma_init, self.attention, self.backend = dropout, gamma_init, attention, backend
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first = True
        self.num_ways = num_ways
        self.q_proj = maybe_multiway(nn.Linear(embed_dim, embed_dim, bias=bias, **factory), num_ways)
        self.k_proj = maybe_multiway(nn.Linear(self.kdim, embed_dim, bias=bias, **factory), num_ways)
        self.v_proj = maybe_multiway(nn.Linear(self.vdim, embed_dim, bias=bias, **factory), num_ways)
        self.inner_norm = None
        if layer_norm:
            self.inner_norm = maybe_multiway(nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory), num_ways)
        self.out_proj = maybe_multiway(nn.Linear(embed_dim, embed_dim, bias=bias, **factory), num_ways)
        self.positions = _positions_module(positions, self.head_dim, num_heads, self.segment_lengths)
        if isinstance(self.positions, RelativePositionBias):
            self.positions.to(**factory)
        self.length_scale = None
        if scalable_softmax is not None:
            self.length_scale = LengthScale(num_heads, scalable_softmax, **factory)
        self.global_read_gate = None
        if global_read:
            self.global_read_gate = nn.Parameter(torch.zeros(num_heads, **factory))
        self.inner_attention = None
        if attention == "dilated":
            self.inner_attention = DilatedAttention(
                segment_lengths, dilation_rates, attention_dropout=dropout, backend=backend
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAGNETO initialisation: Xavier-normal projections, value and output ones with gain gamma."""
        for projs, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                            (self.out_proj, self.gamma_init)):  # fmt: skip
            for proj in expert_parameters(projs):
                nn.init.xavier_normal_(proj["weight"], gain=gain)
                if proj.get("bias") is not None:
                    nn.init.zeros_(proj["bias"])
        if self.inner_norm is not None:
            for norm in expert_parameters(self.inner_norm):  # a LayerNorm's own reset
                nn.init.ones_(norm["weight"])
                if norm.get("bias") is not None:
                    nn.init.zeros_(norm["bias"])
        if isinstance(self.positions, RelativePositionBias):
            self.positions.reset_parameters()
        if self.length_scale is not None:
            self.length_scale.reset_parameters()
        if self.global_read_gate is not None:
            nn.init.zeros_(self.global_read_gate)

    @classmethod
    def from_multihead_attention(
        cls,
        module: nn.MultiheadAttention,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        **kwargs,
    ) -> MultiheadDilatedAttention:
        """A `MultiheadDilatedAttention` (no sub-LN) carrying the weights of an `nn.MultiheadAttention`.

        With one branch `segment_lengths=[W], dilation_rates=[1]`, W >= N, it computes the same
        function as `module` (batch-first inputs).
        """
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn of nn.MultiheadAttention have no counterpart")
        factory = {"device": module.out_proj.weight.device, "dtype": module.out_proj.weight.dtype}
        new = cls(
            module.embed_dim, module.num_heads, segment_lengths, dilation_rates, dropout=module.dropout,
            bias=module.in_proj_bias is not None, layer_norm=False, kdim=module.kdim, vdim=module.vdim,
            **factory, **kwargs,
        )  # fmt: skip
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.split(e)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.split(e) if module.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, weight, bias in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        return new

    def _check_global_queries(self, query, queries: GlobalQueries, is_causal: bool, kv_cache) -> None:
        if not isinstance(queries, GlobalQueries):
            raise TypeError(f"global_queries must be a GlobalQueries, got {type(queries).__name__}")
        if self.attention != "dilated" or is_causal or kv_cache is not None:
            raise ValueError(
                "global_queries serve bidirectional dilated self-attention (attention='dilated', not "
                "causal, no kv_cache): a dense or causal attention has no rows to make global"
            )
        if queries.mask.shape != query.shape[:2]:
            raise ValueError(
                f"global_queries.mask must be (B, N) = {tuple(query.shape[:2])}, "
                f"got {tuple(queries.mask.shape)}"
            )

    def _check_call(self, query, key, need_weights, attn_mask, is_causal, kv_cache) -> None:
        if need_weights:
            raise ValueError(
                "need_weights=True is not supported: dilated attention never forms the (N, M) weight "
                "matrix; call with need_weights=False"
            )
        if attn_mask is not None:
            raise ValueError(
                "an arbitrary attn_mask is not supported by dilated attention; use is_causal=True for "
                "a causal mask and key_padding_mask (B, M) for padding"
            )
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (B, N, E={self.embed_dim}), got {tuple(query.shape)}")
        if self.attention == "dilated" and key.shape[1] != query.shape[1]:
            raise ValueError(
                f"attention='dilated' pairs keys with queries by position and needs M == N, got "
                f"N={query.shape[1]}, M={key.shape[1]}; build the module with attention='dense' for "
                "keys of another length"
            )
        if self.positions is not None and key.shape[1] != query.shape[1]:
            raise ValueError(
                f"positions need keys of the query length, got N={query.shape[1]}, M={key.shape[1]}"
            )
        if self.num_ways > 1 and key.shape[1] != query.shape[1]:
            raise ValueError(
                "multiway projections (num_ways > 1) serve self-attention: keys of the query length"
            )
        if kv_cache is not None and (
            self.attention != "dilated" or not is_causal or (kv_cache.length and query.shape[1] != 1)
        ):
            raise ValueError(
                "kv_cache serves causal dilated self-attention: a prompt first (prefill), then one token "
                "per call, with is_causal=True"
            )

    def _check_key_value(self, query, key, value) -> None:
        """TypeError / ValueError naming the argument for inputs that are not (B, *, width) tensors of
        the query's batch, or keys and values of different lengths."""
        for name, x, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 3 or x.shape[-1] != width:
                raise ValueError(f"{name} must be (B, *, {width}), got {tuple(x.shape)}")
            if x.shape[0] != query.shape[0]:
                raise ValueError(
                    f"{name} must have the query's batch B={query.shape[0]}, got {tuple(x.shape)}"
                )
        if value.shape[1] != key.shape[1]:
            raise ValueError(
                f"key and value must have one length M, got {tuple(key.shape)}, {tuple(value.shape)}"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        position_offset: int = 0,
        kv_cache: DilatedKVCache | None = None,
        modality_ids: torch.Tensor | MultiwayRouting | None = None,
        global_queries: GlobalQueries | None = None,
    ) -> tuple[torch.Tensor, None]:
        self._check_key_value(query, key, value)
        self._check_call(query, key, need_weights, attn_mask, is_causal, kv_cache)
        if global_queries is not None:
            self._check_global_queries(query, global_queries, is_causal, kv_cache)
        batch, seq_len, _ = query.shape
        key_len = key.shape[1]
        ids = modality_ids
        if query is key and key is value:  # self-attention: the three projections share their routing
            q, k, v = route_parallel((self.q_proj, self.k_proj, self.v_proj), query, ids)  # 3 x (B, N, E)
        else:
            q, k, v = (
                route(p, x, ids) for p, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
            )
        q = q.view(batch, seq_len, self.num_heads, self.head_dim)  # (B, N, H, D)
        k = k.view(batch, key_len, self.num_heads, self.head_dim)  # (B, M, H, D)
        v = v.view(batch, key_len, self.num_heads, self.head_dim)  # (B, M, H, D)
        if kv_cache is not None:
            position_offset = kv_cache.length
        position_bias = None
        if isinstance(self.positions, RelativePositionBias):
            where = torch.arange(position_offset, position_offset + seq_len, device=query.device)
            position_bias = self.positions(where, where)  # (H, N, N)
        elif self.positions is not None:
            q, k = self.positions(q, k, offset=position_offset)
        if self.length_scale is not None:
            cached = kv_cache.length if kv_cache is not None else 0
            q = self.length_scale(q, key_len, key_padding_mask, is_causal, cached)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is not None and kv_cache.length:
            score_bias = None
            if isinstance(self.positions, RelativePositionBias):
                relative = self.positions

                def score_bias(t: int, keys: torch.Tensor) -> torch.Tensor:
                    return relative(torch.tensor([t], device=keys.device), keys)[:, 0]  # (H, n)

            out = kv_cache.step(q, k, v, score_bias=score_bias)
        elif self.attention == "dense":
            out = dense_attention(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask,
                position_bias=position_bias, dropout_p=dropout_p,
            )  # fmt: skip
        else:
            out = self.inner_attention(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, position_bias=position_bias
            )  # (B, N, H, D)
            if global_queries is not None:
                out = attend_globally(
                    out, q, k, v, global_queries, key_padding_mask=key_padding_mask,
                    position_bias=position_bias, softmax_scale=self.inner_attention.softmax_scale,
                    dropout_p=dropout_p, read_gate=self.global_read_gate,
                )  # fmt: skip
            if kv_cache is not None:
                kv_cache.prefill(k, v)
        out = out.reshape(batch, seq_len, self.embed_dim)  # (B, N, E)
        tail = (self.out_proj,) if self.inner_norm is None else (self.inner_norm, self.out_proj)
        return route_chain(tail, out, ids), None  # (B, N, E)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, attention={self.attention!r}, "
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"dropout={self.dropout}, num_ways={self.num_ways}, backend={self.backend!r}, "
            f"scalable_softmax={None if self.length_scale is None else self.length_scale.reference_length}, "
            f"global_read={self.global_read_gate is not None}"
        )
