"""Associative recall at length, generated on the fly (nothing is stored or downloaded).

A sequence of N token ids holds P key-value pairs spread over a long context of filler tokens;
after a separator come Q queries, each a key of the context followed by its value. A causal
model reads the sequence left to right and, at every query key, must predict the value that
followed that key in the context: only the pair, at any distance back, tells it. The task
measures whether a model uses long context, and how far back it reaches (Ba et al. 2016,
"Using Fast Weights to Attend to the Recent Past", arXiv 1610.06258; the multi-query form of
Arora et al. 2023, "Zoology", arXiv 2312.04927).

Layout of one sequence (N = context + 1 + 2Q):

    [ f f k_1 v_1 f f f ... f k_P v_P f f | SEP | q_1 a_1  q_2 a_2 ... q_Q a_Q ]
      `------------- context -------------'       `------- queries ---------'

- the context: filler ids drawn uniformly, with P pairs (a key id immediately followed by its
  value id) at uniformly drawn, non-overlapping positions of either parity; the P keys of a
  sequence are distinct, the values drawn uniformly (they may repeat). Either parity matters to
  dilated attention: a branch of rate r pairs a query row only with key rows of its own residue
  mod r, so pairs placed on even positions only, with the queries' keys on positions of the
  other parity, would put every value out of one-hop reach of every dilated branch;
- the queries: Q distinct pairs of the context in random order, each as its key followed by
  its value; the target at a query key's position is the value (the next token), every other
  target is `IGNORE_INDEX`;
- the distance of a query: its key's position minus the position of the same key in the context
  (between 2 and N - 2; pairs are uniform over the context, so distances spread over all of it).

Ids: values [0, V), keys [V, V + num_keys), fillers [V + num_keys, V + num_keys + num_fillers),
the separator last; `RecallConfig.vocab_size` ids in all. Chance accuracy is 1 / V.

Determinism: example i is a function of (config, i) only, through
`numpy.random.default_rng([seed, i])`.

Legend: N tokens of a sequence, P pairs, Q queries, V values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["IGNORE_INDEX", "AssociativeRecall", "RecallConfig", "recall_example"]

IGNORE_INDEX = -100
"""The target of positions without a query (`F.cross_entropy`'s default ignore_index)."""


@dataclass
class RecallConfig:
    """How associative-recall sequences are drawn (see the module docstring)."""

    length: int = 4096
    """N, tokens per sequence: the context, the separator and 2 * num_queries query tokens."""
    num_pairs: int = 64
    """P, key-value pairs in the context (at most num_keys, and fitting in the context)."""
    num_queries: int = 32
    """Q, queries after the separator (at most num_pairs). Keep it well below num_pairs: asked
    about every pair, a model can answer the last queries by elimination (the context's values
    not yet answered) without matching keys, and settles there (a small model reached 0.93 on
    the last of 8 queries of 8 pairs and 0.30 on the first)."""
    num_keys: int = 512
    """Key ids to draw the P distinct keys of a sequence from."""
    num_values: int = 64
    """V, value ids (the answers); chance accuracy is 1 / V."""
    num_fillers: int = 64
    """Filler ids of the context."""
    seed: int = 0
    """Example i comes from default_rng([seed, i])."""

    def __post_init__(self) -> None:
        for name in ("length", "num_pairs", "num_queries", "num_keys", "num_values", "num_fillers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries must be <= num_pairs={self.num_pairs}, got {self.num_queries}")
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"num_pairs must be <= num_keys={self.num_keys} (keys are distinct), got {self.num_pairs}"
            )
        if self.num_pairs > self.context_length // 2:
            raise ValueError(
                f"num_pairs={self.num_pairs} pairs do not fit in a context of {self.context_length} "
                f"tokens (length={self.length} minus the separator and 2 * num_queries): raise length "
                "or lower num_pairs"
            )

    @property
    def context_length(self) -> int:
        """Tokens before the separator: N - 1 - 2Q."""
        return self.length - 1 - 2 * self.num_queries

    @property
    def separator_id(self) -> int:
        return self.num_values + self.num_keys + self.num_fillers

    @property
    def vocab_size(self) -> int:
        """Ids in all: values, keys, fillers and the separator."""
        return self.separator_id + 1


def recall_example(config: RecallConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One sequence drawn with `rng`.

    Returns:
        tokens: (N,) long, the ids the model reads.
        targets: (N,) long, the value at each query key's position, else IGNORE_INDEX.
        distances: (N,) long, at each query key's position its distance to the pair's key, else -1.
    """
    cfg = config
    V, P, Q, C = cfg.num_values, cfg.num_pairs, cfg.num_queries, cfg.context_length
    tokens = np.empty(cfg.length, dtype=np.int64)
    tokens[:C] = rng.integers(0, cfg.num_fillers, C) + V + cfg.num_keys  # (C,) fillers
    keys = rng.choice(cfg.num_keys, size=P, replace=False) + V  # (P,) distinct key ids
    values = rng.integers(0, V, P)  # (P,)
    # (P,) sorted starts, uniform over the placements of P non-overlapping two-token pairs in C tokens
    positions = np.sort(rng.choice(C - P, size=P, replace=False)) + np.arange(P)
    tokens[positions], tokens[positions + 1] = keys, values
    tokens[C] = cfg.separator_id

    asked = rng.choice(P, size=Q, replace=False)  # (Q,) which pairs, in query order
    query_positions = C + 1 + 2 * np.arange(Q)  # (Q,) positions of the query keys
    tokens[query_positions], tokens[query_positions + 1] = keys[asked], values[asked]
    targets = np.full(cfg.length, IGNORE_INDEX, dtype=np.int64)
    targets[query_positions] = values[asked]
    distances = np.full(cfg.length, -1, dtype=np.int64)
    distances[query_positions] = query_positions - positions[asked]
    return {
        "tokens": torch.from_numpy(tokens),
        "targets": torch.from_numpy(targets),
        "distances": torch.from_numpy(distances),
    }


class AssociativeRecall(Dataset):
    """`num_examples` associative-recall sequences (see the module docstring).

    `__getitem__(i)` -> {"tokens": (N,) long, "targets": (N,) long, "distances": (N,) long}
    (see `recall_example`); torch's default collate stacks them into (B, N).
    """

    def __init__(self, config: RecallConfig | None = None, num_examples: int = 1000) -> None:
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
        self.config = config if config is not None else RecallConfig()
        self.num_examples = num_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        index %= self.num_examples
        return recall_example(self.config, np.random.default_rng([self.config.seed, index]))
