"""The dispatch point through which sequence sharding reaches the attention modules.

Legend: B batch, n tokens of this shard, H heads, D head dim.

Model code stays single-device code: `DilatedAttention` and `MultiheadDilatedAttention` (with
attention="dilated") ask `current_shard()` whether their input is one slice of a longer sequence.
When a `SequenceShard` is active they (a) send their dilated self-attention to its `attention`
function instead of `dilated_attention`, and (b) add `shard.position_offset(n)` to the positions of
RoPE / XPOS / the relative bias, so that every shard is rotated at its global positions.

Models that run only part of their layers sharded (`MMLongNet`'s fusion stack) cut the sequence with
`shard.split` and put it back together with `shard.gather`.

Nothing here knows about processes: `mmlongnet.distributed.sequence_parallel` builds the shard
(with the collective attention and gather) and activates it with `use_shard`. The active shard is one
process-wide setting (a module global rather than a `ContextVar`, which `torch.compile` cannot
trace): activate it around the forward pass of the thread that runs the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ShardedAttention = Callable[..., torch.Tensor]
SequenceGather = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SequenceShard:
    """This process holds tokens [index * n, (index + 1) * n) of a sequence of num_shards * n tokens.

    Attributes:
        attention: replaces `dilated_attention` for self-attention over the shard; called as
            attention(q, k, v, segment_lengths, dilation_rates, *, is_causal, key_padding_mask,
            softmax_scale) with q, k, v (B, n, H, D) and key_padding_mask (B, n) or None, and
            returns this shard's output (B, n, H, D).
        index: the shard's index (its rank in the sequence-parallel group).
        num_shards: the number of shards (the group's size).
        gather: gather(x, dim) -> the full sequence from every shard's slice x along `dim`,
            (B, n, *) -> (B, N, *), differentiably (the gradient reaching x is the sum over shards of
            the gradients of this shard's rows); None where the shard cannot gather.
    """

    attention: ShardedAttention
    index: int
    num_shards: int
    gather: SequenceGather | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {self.num_shards!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.num_shards:
            raise ValueError(f"index must be an int in [0, num_shards={self.num_shards}), got {self.index!r}")

    def position_offset(self, local_len: int) -> int:
        """Global position of this shard's first token when every shard holds `local_len` tokens."""
        return self.index * local_len

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This shard's slice of a full sequence: (B, N, *) -> (B, n, *) along `dim`, a view.

        Raises ValueError when N is not a positive multiple of num_shards.
        """
        length = x.shape[dim]
        if length <= 0 or length % self.num_shards:
            raise ValueError(
                f"a sequence of N={length} tokens cannot be split evenly over {self.num_shards} shards; "
                f"N must be a positive multiple of {self.num_shards}"
            )
        n = length // self.num_shards
        return x.narrow(dim, self.index * n, n)


_current: SequenceShard | None = None


def current_shard() -> SequenceShard | None:
    """The active `SequenceShard`, or None when the modules see whole sequences (the default)."""
    return _current


@contextmanager
def use_shard(shard: SequenceShard | None) -> Iterator[SequenceShard | None]:
    """Activate `shard` (None: whole sequences) for the calls made inside the block."""
    if shard is not None and not isinstance(shard, SequenceShard):
        raise TypeError(f"shard must be a SequenceShard or None, got {type(shard).__name__}")
    global _current
    previous, _current = _current, shard
    try:
        yield shard
    finally:
        _current = previous


def unsupported_under_shard(what: str) -> ValueError:
    """The error for a feature that cannot run on one shard of a sequence."""
    return ValueError(
        f"{what} is not supported while the sequence is sharded (mmlongnet.distributed.sequence_parallel); "
        "run it outside the sequence-parallel block"
    )
