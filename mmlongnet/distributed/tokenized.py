"""Target attention over the distinct tokens of a history: exact, and cheaper on repetitive data.

Legend: B batch, L history length, D key dim (= query dim), E_v value dim, E embedding dim,
T valid history tokens in the batch, U distinct (sample, id) pairs in the batch.

Target attention (as in recommender models) lets one query per sample, q_b, attend to the tokens of
its history h_b = (x_1, ..., x_{len_b}):

    out_b = sum_j softmax_j(q_b . k(x_j) / sqrt(D)) v(x_j)

When keys and values depend only on the token id (no positional term), every occurrence of an id
contributes the same score and value, so with c_u the number of occurrences of the distinct id u:

    out_b = sum_u softmax_u(q_b . k(u) / sqrt(D) + log c_u) v(u)

exactly, in the forward and in the gradients. The distinct form computes keys and values for U rows
instead of T (and, with a `ShardedEmbedding`'s `lookup` as the embedding, communicates U rows); a
history of length 0 gives a zero output.

`unique_target_attention` is the distinct form, `full_target_attention` the reference over all
positions, `TargetAttention` the module (projections of embeddings of the ids).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

IdFn = Callable[[torch.Tensor], torch.Tensor]


def _valid(history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at positions < lengths[b]; ValueError on bad shapes or lengths."""
    if history.dim() != 2 or history.dtype != torch.long:
        raise ValueError(f"history must be a (B, L) long tensor, got {tuple(history.shape)} {history.dtype}")
    B, L = history.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},) like history's batch, got {tuple(lengths.shape)}")
    bad = (lengths < 0) | (lengths > L)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths[{row}] = {int(lengths[row])} is outside [0, L={L}]")
    return torch.arange(L, device=history.device) < lengths[:, None]  # (B, L)


def _check_query(query: torch.Tensor, batch: int) -> None:
    if query.dim() != 2 or query.shape[0] != batch:
        raise ValueError(f"query must be a ({batch}, D) tensor, got {tuple(query.shape)}")


def unique_target_attention(
    query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, key_fn: IdFn, value_fn: IdFn
) -> torch.Tensor:
    """Target attention computed over the distinct ids of each history, each score + log(count).

    query: (B, D). history: (B, L) long ids; positions at or beyond lengths[b] are padding.
    lengths: (B,) long in [0, L]. key_fn: ids (U,) -> keys (U, D); value_fn: ids (U,) -> (U, E_v);
    each is called once, on the distinct ids of all samples (an id in two samples appears twice).
    Returns (B, E_v); zero for samples of length 0. Equals `full_target_attention`.
    """
    valid = _valid(history, lengths)  # (B, L)
    B = history.shape[0]
    _check_query(query, B)
    sample = torch.arange(B, device=history.device)[:, None].expand_as(history)[valid]  # (T,)
    ids = history[valid]  # (T,)
    span = int(ids.max()) + 1 if ids.numel() else 1
    pairs, counts = torch.unique(sample * span + ids, sorted=True, return_counts=True)  # (U,), (U,)
    owner, distinct = pairs // span, pairs % span  # (U,) sample and id of each distinct pair
    keys, values = key_fn(distinct), value_fn(distinct)  # (U, D), (U, E_v)
    scores = (query[owner] * keys).sum(-1) / math.sqrt(query.shape[-1])  # (U,)
    scores = scores + counts.to(scores.dtype).log()  # (U,)
    top = scores.new_full((B,), float("-inf")).scatter_reduce(0, owner, scores.detach(), "amax")  # (B,)
    weights = (scores - top[owner]).exp()  # (U,), at most 1
    total = weights.new_zeros(B).index_add(0, owner, weights)  # (B,), >= 1 for non-empty samples
    out = values.new_zeros(B, values.shape[-1]).index_add(0, owner, weights[:, None] * values)  # (B, E_v)
    return out / total.clamp_min(1.0)[:, None]  # empty samples: 0 / 1


def full_target_attention(
    query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, key_fn: IdFn, value_fn: IdFn
) -> torch.Tensor:
    """The reference: target attention over every valid position (shapes as `unique_target_attention`).

    key_fn and value_fn are called once, on the ids of all B * L positions (padding reads id 0).
    Returns (B, E_v); zero for samples of length 0.
    """
    valid = _valid(history, lengths)  # (B, L)
    B, L = history.shape
    _check_query(query, B)
    ids = history.masked_fill(~valid, 0).reshape(-1)  # (B * L,)
    keys = key_fn(ids).view(B, L, -1)  # (B, L, D)
    values = value_fn(ids).view(B, L, -1)  # (B, L, E_v)
    scores = torch.einsum("bd,bld->bl", query, keys) / math.sqrt(query.shape[-1])  # (B, L)
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, L), rows of length 0: 0 instead of NaN
    probs = probs.masked_fill(~valid, 0.0)
    return torch.einsum("bl,ble->be", probs, values)  # (B, E_v)


class TargetAttention(nn.Module):
    """Target attention of a query per sample over the ids of its history.

    Keys and values are linear projections of the ids' embeddings (E -> D and E -> E_v), given by
    `embed`: ids (N,) -> (N, E), e.g. an `nn.Embedding` or a `ShardedEmbedding`'s `lookup`.

    Args:
        embed_dim: E. key_dim: D (default E). value_dim: E_v (default E).
        unique: attend over distinct ids with log-count scores (exact, cheaper) or over all positions.
        device, dtype: of the projections.

    forward(query (B, D), history (B, L) long, lengths (B,) long, embed) -> (B, E_v).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        key_dim: int | None = None,
        value_dim: int | None = None,
        unique: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.unique = unique
        self.key = nn.Linear(embed_dim, key_dim or embed_dim, bias=False, **factory)
        self.value = nn.Linear(embed_dim, value_dim or embed_dim, bias=False, **factory)

    def forward(
        self, query: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, embed: IdFn
    ) -> torch.Tensor:
        cache: dict[str, torch.Tensor] = {}

        def embedded(ids: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, E), one lookup for keys and values
            if "rows" not in cache:
                cache["rows"] = embed(ids)
            return cache["rows"]

        attend = unique_target_attention if self.unique else full_target_attention
        return attend(
            query,
            history,
            lengths,
            lambda ids: self.key(embedded(ids)),
            lambda ids: self.value(embedded(ids)),
        )
