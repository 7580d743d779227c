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
positions, `TargetAttention` the module (projections of embeddings of the ids), and
`TokenizedAttention` the API of the "Distributed Tokenized Attention" RFC: fixed-shape mini-batches
of ids on every rank, embedded through a vocabulary-sharded table, attended to by one query per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mmlongnet.distributed.collectives import Group, group_size
from mmlongnet.distributed.routing import ShardedEmbedding

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


def _embedding_dim(embedding_fn: object) -> int | None:
    """E of an `nn.Embedding`, a `ShardedEmbedding` or a bound method of one (e.g. its `lookup`)."""
    for owner in (embedding_fn, getattr(embedding_fn, "__self__", None)):
        dim = getattr(owner, "embedding_dim", None)
        if isinstance(dim, int):
            return dim
    return None


class TokenizedAttention(nn.Module):
    """Target attention over token histories embedded through a vocabulary-sharded table (the RFC's API).

    Every rank of `group` holds its own mini-batch of `batch_size` histories of `sequence_length` ids
    and calls `forward` (a collective when the table is a `ShardedEmbedding`): the valid ids are
    deduplicated, routed to the ranks owning their rows, and the rows routed back (`ShardedEmbedding`).

    Args:
        batch_size: B, histories per rank. sequence_length: L, id slots per history.
        nranks: P, the size of `group` (checked).
        embedding_fn: a `ShardedEmbedding` (its `lookup` is used), or any callable ids (T,) long ->
            rows (T, E): a `ShardedEmbedding.lookup`, an `nn.Embedding` (single table, for reference).
            A module, or the module of a bound method, is registered as the submodule `embedding`.
        group: the process group (None: the default group; without an initialised process group,
            P = 1).
        embed_dim: E, needed only when `embedding_fn` does not expose an `embedding_dim`.
        key_dim: D, width of the query and the keys (default E). value_dim: E_v (default E).
        unique: attend over distinct ids with log-count scores (exact, cheaper) or over all positions.
        device, dtype: of the key and value projections.

    forward(tokens (B, L) long, lengths (B,) long, query (B, D) or None):
    - with a query: target attention of query[b] over the ids of history b, keys and values linear
      projections of the ids' rows -> (B, E_v); zero for a history of length 0. Exactly the attention
      over all valid positions, in the output and all gradients.
    - without: the embedded histories and their padding -> (embeddings (B, L, E), zero at padding;
      padding_mask (B, L) bool, True at padding), the input of a self-attention stack.
    Shapes are checked on each rank before any collective; with a `ShardedEmbedding` and
    `validate=True` (its default) lengths and ids are then checked on every rank at once (one small
    all_reduce), so that a bad batch raises the same ValueError on every rank.
    """

    def __init__(
        self,
        batch_size: int,
        sequence_length: int,
        nranks: int,
        embedding_fn: IdFn,
        *,
        group: Group = None,
        embed_dim: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        unique: bool = True,
        validate: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        sizes = {"batch_size": batch_size, "sequence_length": sequence_length, "nranks": nranks}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if getattr(embedding_fn, "__func__", None) is ShardedEmbedding.lookup:
            embedding_fn = embedding_fn.__self__  # the table's own lookup: use (and register) the table
        if not callable(embedding_fn):
            kind = type(embedding_fn).__name__
            raise ValueError(f"embedding_fn must be callable ids (T,) -> (T, E), got {kind}")
        world = group_size(group) if dist.is_initialized() else 1
        if nranks != world:
            raise ValueError(f"nranks={nranks} does not match the process group, which has {world} ranks")
        if isinstance(embedding_fn, ShardedEmbedding) and embedding_fn.world_size != nranks:
            raise ValueError(
                f"nranks={nranks} does not match the ShardedEmbedding's {embedding_fn.world_size} shards"
            )
        dim = _embedding_dim(embedding_fn) if embed_dim is None else embed_dim
        if dim is None:
            raise ValueError("embed_dim must be given when embedding_fn has no `embedding_dim` attribute")
        self.batch_size, self.sequence_length, self.nranks = batch_size, sequence_length, nranks
        self.embed_dim, self.validate = dim, validate
        owner = getattr(embedding_fn, "__self__", embedding_fn)  # a module, or the module of a method
        self.embedding = owner if isinstance(owner, nn.Module) else None
        self._embedding_fn = None if isinstance(embedding_fn, nn.Module) else embedding_fn
        self.attention = TargetAttention(
            dim, key_dim=key_dim, value_dim=value_dim, unique=unique, device=device, dtype=dtype
        )

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}, sequence_length={self.sequence_length}, nranks={self.nranks}"

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) long -> rows (T, E)."""
        if self._embedding_fn is not None:
            return self._embedding_fn(ids)
        if isinstance(self.embedding, ShardedEmbedding):
            return self.embedding.lookup(ids)
        return self.embedding(ids)

    def _check(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        B, L = self.batch_size, self.sequence_length
        if tokens.shape != (B, L) or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a ({B}, {L}) long tensor (batch_size, sequence_length), got "
                f"{tuple(tokens.shape)} {tokens.dtype}"
            )
        if lengths.shape != (B,) or lengths.dtype != torch.long:
            got = f"{tuple(lengths.shape)} {lengths.dtype}"
            raise ValueError(f"lengths must be a ({B},) long tensor, got {got}")
        if self.validate and self._embedding_fn is None and isinstance(self.embedding, ShardedEmbedding):
            self.embedding._check(tokens, lengths, None)  # the same ValueError on every rank

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor, query: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check(tokens, lengths)
        if query is not None:
            return self.attention(query, tokens, lengths, self._lookup)  # (B, E_v)
        valid = _valid(tokens, lengths)  # (B, L)
        rows = self._lookup(tokens[valid])  # (T, E)
        out = rows.new_zeros(*tokens.shape, rows.shape[-1]).index_put((valid,), rows)  # (B, L, E)
        return out, ~valid
