"""Sequence sharding: LongNet's distributed dilated attention and what runs models on it.

A sequence of N tokens on the P ranks of a group: rank p holds [p*N/P, (p+1)*N/P). See
`sharded_dilated_attention` (the collective op), `parallelize_sequence` (swaps a built model's
modules for their sharded twins), the autograd collectives and the split helpers.
"""

from mmlongnet.distributed.collectives import all_gather, all_gather_no_grad, reduce_scatter
from mmlongnet.distributed.groups import (
    check_split,
    gather_sequence,
    new_sequence_parallel_groups,
    shard_sequence,
    split_sequence,
)
from mmlongnet.distributed.parallelize import ShardedDilatedAttention, parallelize_sequence
from mmlongnet.distributed.sharded import sharded_dilated_attention

__all__ = [
    "ShardedDilatedAttention",
    "all_gather",
    "all_gather_no_grad",
    "check_split",
    "gather_sequence",
    "new_sequence_parallel_groups",
    "parallelize_sequence",
    "reduce_scatter",
    "shard_sequence",
    "sharded_dilated_attention",
    "split_sequence",
]

# Vocabulary-sharded embeddings with routed, deduplicated lookups, and target attention over
# distinct tokens ("Distributed Tokenized Attention").
from mmlongnet.distributed.routing import (  # noqa: E402
    RoutingStats,
    ShardedEmbedding,
    parallelize_vocabulary,
    shard_offsets,
)
from mmlongnet.distributed.tokenized import (  # noqa: E402
    TargetAttention,
    TokenizedAttention,
    full_target_attention,
    unique_target_attention,
)

__all__ += [
    "RoutingStats",
    "ShardedEmbedding",
    "TargetAttention",
    "TokenizedAttention",
    "full_target_attention",
    "parallelize_vocabulary",
    "shard_offsets",
    "unique_target_attention",
]
