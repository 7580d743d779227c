"""The dispatch point through which a vocabulary-sharded embedding reaches the text encoder.

Legend: V vocabulary (rows of the full table), E embedding dim, T ids looked up.

Model code stays single-device code: `TextEncoder` with `TextEncoderConfig.embedding="vocab_sharded"`
asks `vocab_sharded_embedding_factory()` for the function that builds its table. Nothing here knows
about processes: `mmlongnet.distributed.use_vocab_sharded_embeddings(group)` registers a factory
that builds a `ShardedEmbedding` over `group`. Like the active sequence shard
(`mmlongnet.attention.sharding`), the factory is one process-wide setting; it is read when the
encoder is built, not when it runs.

A factory is called as `factory(num_embeddings, embedding_dim, device=..., dtype=...)` and returns an
`nn.Module` with
- `weight`: this rank's rows of the table (any shape), the parameter to initialise;
- `lookup(ids)`: ids (T,) long in [0, V) -> rows (T, E), a collective that every rank of the group
  calls the same number of times (T may differ between ranks, and may be 0).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

EmbeddingFactory = Callable[..., nn.Module]

_factory: EmbeddingFactory | None = None


def set_vocab_sharded_embedding_factory(factory: EmbeddingFactory | None) -> EmbeddingFactory | None:
    """Register `factory` (None: unregister) for encoders built from now on; returns the previous one."""
    if factory is not None and not callable(factory):
        raise TypeError(f"factory must be callable or None, got {type(factory).__name__}")
    global _factory
    previous, _factory = _factory, factory
    return previous


def vocab_sharded_embedding_factory() -> EmbeddingFactory:
    """The registered factory; a ValueError saying how to register one when there is none."""
    if _factory is None:
        raise ValueError(
            "embedding='vocab_sharded' needs a vocabulary-sharded embedding factory: build the model "
            "inside `with mmlongnet.distributed.use_vocab_sharded_embeddings(group):` (after "
            "torch.distributed.init_process_group), or use embedding='local'"
        )
    return _factory
