"""Run the package's models on one shard of a sequence: `sequence_parallel(group)`.

Legend: B batch, N tokens of the full sequence, n = N / P tokens of one rank, P ranks, E embed dim.

    with sequence_parallel(group):
        hidden = encoder(local_x)          # local_x (B, n, E): this rank's slice [rank*n, (rank+1)*n)

Inside the block every dilated self-attention made by `DilatedAttention` and
`MultiheadDilatedAttention` (attention="dilated"), hence by the LongNet layers, stacks and LM, goes to
`sharded_dilated_attention` over `group`, and RoPE / XPOS rotate the slice at its global positions
(offset rank * n). Everything else in those models works token by token and shards trivially
(embeddings, FFN, norms, multiway routing by per-token modality ids). The model code itself does
not change and never imports torch.distributed: it reads the `SequenceShard` that this context
activates (`mmlongnet.attention.sharding`).

Refused with a ValueError inside the block: dense attention, the relative position bias, attention
dropout in training mode, and cached decoding. `MMLongNet` takes the whole (replicated) inputs
instead of a slice: it runs its encoders and modality stacks unsharded, packs the fused sequence, and
shards only the fusion stack (`shard.split`, then `shard.gather` before pooling).

Backward may run after the block has been left: the collective attention keeps its group, and
activation checkpointing (`checkpoint_activations=True`) recomputes under the shard of the forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmlongnet.attention.sharding import SequenceShard, use_shard
from mmlongnet.distributed.collectives import Group, group_rank, group_size
from mmlongnet.distributed.groups import gather_sequence
from mmlongnet.distributed.sharded import sharded_dilated_attention


def sequence_shard(group: Group = None, *, validate: bool = True) -> SequenceShard:
    """The `SequenceShard` of this rank in `group` (None: the default group), whose attention is
    `sharded_dilated_attention(..., group=group, validate=validate)` and whose gather is
    `gather_sequence(x, group, dim)`."""

    def attention(q, k, v, segment_lengths, dilation_rates, *, is_causal=False, key_padding_mask=None,
                  softmax_scale=None):  # fmt: skip
        return sharded_dilated_attention(
            q, k, v, segment_lengths, dilation_rates, group=group, is_causal=is_causal,
            key_padding_mask=key_padding_mask, softmax_scale=softmax_scale, validate=validate,
        )  # fmt: skip

    def gather(x, dim=1):
        return gather_sequence(x, group, dim)

    return SequenceShard(
        attention=attention, index=group_rank(group), num_shards=group_size(group), gather=gather
    )


@contextmanager
def sequence_parallel(group: Group = None, *, validate: bool = True) -> Iterator[SequenceShard]:
    """Within the block, the package's modules treat their inputs as this rank's slice of a sequence
    split evenly over `group` (see the module docstring). Yields the active `SequenceShard`.

    validate: each attention call checks with one small all_gather that the ranks agree on shapes
    and options (set False to save that round trip once the setup is known to be right).
    """
    with use_shard(sequence_shard(group, validate=validate)) as shard:
        yield shard
