"""A vocabulary-sharded embedding table with routed, deduplicated lookups.

Legend: P ranks of the group, r this rank, V vocabulary (rows of the full table), E embedding dim,
B batch of one rank, L sequence length, T valid tokens of one rank, U distinct ids of one rank,
S ids this rank sends (U with dedup, T without), R ids this rank receives (the sum over ranks of
what they send here), V_r rows this rank owns.

Sharding: rank r owns rows [start_r, end_r) of the table. V need not divide by P: the first
`V % P` ranks own `V // P + 1` rows, the others `V // P` (so with V < P the last ranks own none).

One lookup (the steps of the "Distributed Tokenized Attention" RFC, with deduplication):
1. every rank reads its own mini-batch and keeps only valid positions (pos < lengths[b]); padding
   costs neither compute nor communication, and its outputs are zero;
2. it deduplicates its ids locally (`torch.unique` with the inverse), so that a frequent id costs
   one row, not one per occurrence;
3. it sends each distinct id to its owner with one `all_to_all_single` (the split sizes are
   exchanged first, with a second, P-element all-to-all);
4. the owner looks every received id up in its shard and sends the rows back with the inverse
   all-to-all; ids received from several ranks are looked up once per sender;
5. each rank scatters the rows to its positions with the inverse index.
Communication is proportional to the distinct ids of each rank, not to its tokens. The backward is
the reverse: gradient rows go back to the owners with one all-to-all and are summed into the owner's
rows with `index_add_` (duplicates within a rank are summed by the inverse index's backward, those
across ranks by `index_add_`).

`dedup=False` routes every valid token instead (the naive variant, for comparisons); the results and
gradients are identical.

Every rank of the group must call `forward` (and, when the table needs gradients, `backward` of a
loss that uses the output) the same number of times, as with any collective; the mini-batch shapes
may differ between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mmlongnet.distributed.collectives import Group, group_rank, group_size
from mmlongnet.modalities.text import TextEncoder


def shard_offsets(num_embeddings: int, num_shards: int) -> list[int]:
    """Row offsets [start_0, ..., start_{P-1}, V] of the shards: rank r owns [start_r, start_{r+1}).

    The first V % P shards own V // P + 1 rows, the others V // P.
    """
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    if num_shards < 1:
        raise ValueError(f"the number of shards must be a positive int, got {num_shards!r}")
    base, extra = divmod(num_embeddings, num_shards)
    return [r * base + min(r, extra) for r in range(num_shards + 1)]


@dataclass(frozen=True)
class RoutingStats:
    """What one rank routed in its last lookup (counts of elements, not bytes).

    send_counts[p]: ids this rank sent to rank p; recv_counts[p]: ids it received from rank p (so
    it returned recv_counts[p] rows of E elements to p). Entries for this rank itself travel
    through the all-to-all but never leave the process; the `*_elements` totals leave them out.
    """

    rank: int
    embedding_dim: int
    valid_tokens: int
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]

    @property
    def ids_sent(self) -> int:
        """Ids sent to other ranks."""
        return sum(c for p, c in enumerate(self.send_counts) if p != self.rank)

    @property
    def rows_returned(self) -> int:
        """Embedding rows this rank, as an owner, sent back to other ranks."""
        return sum(c for p, c in enumerate(self.recv_counts) if p != self.rank)

    @property
    def forward_elements(self) -> int:
        """Elements this rank sent to other ranks in the forward: split sizes, ids, embedding rows."""
        return len(self.send_counts) - 1 + self.ids_sent + self.rows_returned * self.embedding_dim

    @property
    def backward_elements(self) -> int:
        """Elements this rank sends to other ranks in the backward: one gradient row per id sent."""
        return self.ids_sent * self.embedding_dim


def _all_to_all(
    x: torch.Tensor, recv_counts: list[int], send_counts: list[int], group: Group
) -> torch.Tensor:
    """(sum(send_counts), *) -> (sum(recv_counts), *): rows [.., send_counts[p]) go to rank p."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_counts, send_counts, group=group)
    return out


class _RoutedLookup(torch.autograd.Function):
    """Rows of the owners' shards for the ids this rank sends, grouped by owner.

    Forward: weight (V_r, E), local_ids (R,) rows of this shard asked for by the other ranks
    (already received) -> (S, E), the rows for this rank's ids in send order.
    Backward: the (S, E) gradient goes back to the owners, which sum it into their rows.
    """

    @staticmethod
    def forward(ctx, weight, local_ids, send_counts: list[int], recv_counts: list[int], group: Group):
        rows = weight.index_select(0, local_ids)  # (R, E)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(local_ids)
        ctx.counts, ctx.group, ctx.num_rows = (send_counts, recv_counts), group, weight.shape[0]
        return _all_to_all(rows, send_counts, recv_counts, group)  # (S, E)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (local_ids,) = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        grad_rows = _all_to_all(grad, recv_counts, send_counts, ctx.group)  # (R, E)
        grad_weight = grad_rows.new_zeros((ctx.num_rows, grad_rows.shape[1]))  # (V_r, E)
        grad_weight.index_add_(0, local_ids, grad_rows)
        return grad_weight, None, None, None, None


class ShardedEmbedding(nn.Module):
    """An embedding table of V rows split by rows over the ranks of a group (see the module doc).

    Args:
        num_embeddings: V, rows of the full table.
        embedding_dim: E.
        group: the process group (None: the default group).
        dedup: deduplicate ids on each rank before routing them (True); False routes every valid
            token (the naive variant, same results, more communication).
        device, dtype: of this rank's shard.

    Attributes:
        weight: (V_r, E) this rank's rows [start, end) of the table, initialised ~ N(0, 1) like
            `nn.Embedding`.
        last_stats: a `RoutingStats` of the last lookup (None before the first).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group: Group = None,
        dedup: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        self.num_embeddings, self.embedding_dim, self.group, self.dedup = (
            num_embeddings, embedding_dim, group, dedup,
        )  # fmt: skip
        self.rank, self.world_size = group_rank(group), group_size(group)
        self.offsets = shard_offsets(num_embeddings, self.world_size)  # P + 1 ints
        self.start, self.end = self.offsets[self.rank], self.offsets[self.rank + 1]
        self.weight = nn.Parameter(
            torch.empty(self.end - self.start, embedding_dim, device=device, dtype=dtype)
        )
        self.last_stats: RoutingStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows=[{self.start}, {self.end}), "
            f"world_size={self.world_size}, dedup={self.dedup}"
        )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the full table for ids (T,) long, all in [0, V) (not checked): returns (T, E).

        A collective: every rank of the group calls it (T may differ, and may be 0).
        """
        ids = ids.reshape(-1)
        if self.dedup:
            distinct, inverse = torch.unique(ids, sorted=True, return_inverse=True)  # (U,), (T,)
        else:
            distinct, inverse = ids, None
        offsets = torch.tensor(self.offsets, device=ids.device)  # (P + 1,)
        owner = torch.searchsorted(offsets, distinct, right=True) - 1  # (S,) in [0, P)
        order = None
        if not self.dedup:  # sorted distinct ids are grouped by owner already
            order = torch.argsort(owner, stable=True)  # (S,)
            distinct, owner = distinct[order], owner[order]
        send = torch.bincount(owner, minlength=self.world_size)  # (P,)
        recv = _all_to_all(send, [1] * self.world_size, [1] * self.world_size, self.group)  # (P,)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        received = _all_to_all(distinct, recv_counts, send_counts, self.group)  # (R,)
        rows = _RoutedLookup.apply(
            self.weight, received - self.start, send_counts, recv_counts, self.group
        )  # (S, E), in send order
        self.last_stats = RoutingStats(
            self.rank, self.embedding_dim, ids.numel(), tuple(send_counts), tuple(recv_counts)
        )
        if inverse is not None:
            return rows[inverse]  # (T, E)
        unsorted = torch.empty_like(rows)
        return unsorted.index_copy(0, order, rows)  # (T, E), rows[i] to position order[i]

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, validate: bool = True
    ) -> torch.Tensor:
        """Embed this rank's mini-batch.

        tokens: (B, L) long ids; positions at or beyond lengths[b] are padding (any value).
        lengths: (B,) long in [0, L], or None (every position valid).
        validate: check shapes, lengths and the ids at valid positions; a problem on any rank raises a
            ValueError on every rank (one small all_reduce), so no rank is left waiting in a
            collective. Without it, out-of-range ids fail or hang inside the routing.
        Returns (B, L, E); padding positions are zero.
        """
        problem = self._shape_problem(tokens, lengths)
        if problem is not None and not validate:
            raise ValueError(problem)
        if validate:  # before any routing, so that every rank raises or none does
            self._check(tokens, lengths, problem)
        B, L = tokens.shape
        if lengths is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=tokens.device)  # (B, L)
        else:
            valid = torch.arange(L, device=tokens.device) < lengths[:, None]  # (B, L)
        rows = self.lookup(tokens[valid])  # (T, E)
        out = rows.new_zeros(B, L, self.embedding_dim)  # (B, L, E)
        return out.index_put((valid,), rows)  # (B, L, E)

    @staticmethod
    def _shape_problem(tokens: torch.Tensor, lengths: torch.Tensor | None) -> str | None:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            return f"tokens must be a (B, L) long tensor, got {tuple(tokens.shape)} {tokens.dtype}"
        if lengths is not None and (lengths.shape != tokens.shape[:1] or lengths.dtype != torch.long):
            return (
                f"lengths must be a ({tokens.shape[0]},) long tensor matching tokens' batch, got "
                f"{tuple(lengths.shape)} {lengths.dtype}"
            )
        return None

    def _check(self, tokens: torch.Tensor, lengths: torch.Tensor | None, problem: str | None) -> None:
        """Raise ValueError on every rank if any rank has bad shapes, a length outside [0, L] or a
        valid id outside [0, V); the first such rank's problem is reported (one all_reduce)."""
        # one row per rank: kind (0 fine, 1 shapes, 2 length, 3 id), batch row, column, value
        report = torch.zeros(self.world_size, 4, dtype=torch.long, device=tokens.device)  # (P, 4)
        L = tokens.shape[-1]
        if problem is not None:
            report[self.rank, 0] = 1
        elif lengths is not None and ((lengths < 0) | (lengths > L)).any():
            row = int(((lengths < 0) | (lengths > L)).nonzero()[0, 0])
            report[self.rank] = torch.tensor([2, row, 0, int(lengths[row])])
        else:
            valid = None if lengths is None else torch.arange(L, device=tokens.device) < lengths[:, None]
            bad = (tokens < 0) | (tokens >= self.num_embeddings)  # (B, L)
            bad = bad if valid is None else bad & valid
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                report[self.rank] = torch.tensor([3, row, col, int(tokens[row, col])])
        dist.all_reduce(report, group=self.group)
        for rank, (kind, row, col, value) in enumerate(report.tolist()):
            if kind == 1:
                raise ValueError(
                    problem
                    if rank == self.rank
                    else f"tokens or lengths on rank {rank} of the group have a wrong shape or dtype"
                )
            if kind == 2:
                raise ValueError(
                    f"lengths[{row}] = {value} on rank {rank} of the group is outside [0, L={L}]"
                )
            if kind == 3:
                raise ValueError(
                    f"token id {value} at tokens[{row}, {col}] (batch row {row}) on rank {rank} of the group "
                    f"is outside the vocabulary [0, {self.num_embeddings})"
                )

    @torch.no_grad()
    def gather_weight(self) -> torch.Tensor:
        """The full table (V, E) on every rank, assembled from the shards (no gradient; a collective)."""
        most = math.ceil(self.num_embeddings / self.world_size)
        padded = self.weight.new_zeros(most, self.embedding_dim)  # (ceil(V / P), E)
        padded[: self.weight.shape[0]] = self.weight
        gathered = padded.new_empty(self.world_size * most, self.embedding_dim)  # (P * ceil(V / P), E)
        dist.all_gather_into_tensor(gathered, padded, group=self.group)
        sizes = [self.offsets[p + 1] - self.offsets[p] for p in range(self.world_size)]
        return torch.cat([gathered[p * most : p * most + n] for p, n in enumerate(sizes)])  # (V, E)


def parallelize_vocabulary(model: nn.Module, group: Group = None, *, dedup: bool = True) -> nn.Module:
    """Give every `TextEncoder` of `model` (the model itself, or e.g. `MMLongNet`'s text encoder)
    built with `embedding="vocab_sharded"` its table: a `ShardedEmbedding(V, E, group=group,
    dedup=dedup)` holding this rank's rows, on the encoder's device and dtype, initialised as the
    encoder initialises its table. Changes `model` in place and returns it.

        model = parallelize_vocabulary(MMLongNet(config), group)   # config.text.embedding == "vocab_sharded"

    Call it once, on every rank of `group`, after `torch.distributed.init_process_group`; then
    every rank runs the encoder the same number of times (each lookup is a collective). Raises
    ValueError when `model` holds no such encoder, or its table is sharded already.
    """
    encoders = [
        module for module in model.modules()
        if isinstance(module, TextEncoder) and module.config.embedding == "vocab_sharded"
    ]  # fmt: skip
    if not encoders:
        raise ValueError(
            f"{type(model).__name__} holds no TextEncoder with embedding='vocab_sharded': nothing to shard"
        )
    for encoder in encoders:
        if isinstance(encoder.embedding, ShardedEmbedding):
            raise ValueError("the text encoder's table is vocabulary-sharded already: shard a model once")
        config, placeholder = encoder.config, encoder.embedding.weight
        encoder.embedding = ShardedEmbedding(
            config.vocab_size, config.embed_dim, group=group, dedup=dedup, device=placeholder.device,
            dtype=placeholder.dtype,
        )  # fmt: skip
        encoder.reset_parameters()
    return model
