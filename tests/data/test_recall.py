"""The associative-recall generator: layout, answers, distances, determinism and validation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmlongnet.data import AssociativeRecall, RecallConfig
from mmlongnet.data.recall import IGNORE_INDEX, recall_example

CONFIG = RecallConfig(
    length=300, num_pairs=20, num_queries=8, num_keys=40, num_values=10, num_fillers=5, seed=3
)


def test_every_query_answers_with_the_value_after_its_key_in_the_context():
    cfg = CONFIG
    for index in range(20):
        sample = AssociativeRecall(cfg, 20)[index]
        tokens, targets, distances = sample["tokens"], sample["targets"], sample["distances"]
        assert tokens.shape == targets.shape == distances.shape == (cfg.length,)
        context = tokens[: cfg.context_length]
        assert tokens[cfg.context_length] == cfg.separator_id
        queries = torch.nonzero(targets != IGNORE_INDEX).flatten()
        assert queries.tolist() == list(range(cfg.context_length + 1, cfg.length, 2))
        assert torch.equal(queries, torch.nonzero(distances >= 0).flatten())
        is_key = (context >= cfg.num_values) & (context < cfg.num_values + cfg.num_keys)
        assert int(is_key.sum()) == cfg.num_pairs  # fillers never look like keys
        assert len(set(context[is_key].tolist())) == cfg.num_pairs  # distinct keys
        for position in queries.tolist():
            key, value, distance = tokens[position], targets[position], int(distances[position])
            pair = position - distance
            assert 0 <= pair < cfg.context_length and tokens[pair] == key and tokens[pair + 1] == value
            assert tokens[position + 1] == value  # the answer follows the query (teacher forcing)
            assert torch.nonzero(context == key).flatten().tolist() == [pair]  # the only pair of that key
        assert int(tokens.max()) < cfg.vocab_size and int(tokens.min()) >= 0


def test_examples_are_a_function_of_seed_and_index():
    first, again = AssociativeRecall(CONFIG, 5)[3], AssociativeRecall(CONFIG, 5)[3]
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = AssociativeRecall(RecallConfig(**{**vars(CONFIG), "seed": 4}), 5)[3]
    assert not torch.equal(first["tokens"], other["tokens"])
    direct = recall_example(CONFIG, np.random.default_rng([CONFIG.seed, 3]))
    assert torch.equal(direct["tokens"], first["tokens"])


def test_distances_spread_over_the_context():
    cfg = RecallConfig(length=4096, num_pairs=64, num_queries=32)
    distances = torch.cat([s["distances"][s["distances"] >= 0] for s in AssociativeRecall(cfg, 20)])
    assert distances.min() >= 2 and distances.max() < cfg.length
    assert (distances < 1024).any() and (distances > 3072).any()


def test_pairs_stand_at_both_parities_and_anywhere_in_the_context():
    """Dilated attention pairs rows of one residue mod its rate: the pairs must not all share one
    parity (that would leave every value out of one-hop reach of the queries' keys)."""
    cfg = RecallConfig(length=64, num_pairs=16, num_queries=8, num_keys=32, num_values=32, num_fillers=4)
    starts = []
    for sample in AssociativeRecall(cfg, 300):
        context = sample["tokens"][: cfg.context_length]
        is_key = (context >= cfg.num_values) & (context < cfg.num_values + cfg.num_keys)
        starts.append(torch.nonzero(is_key).flatten())
    starts = torch.cat(starts)
    assert 0.4 < (starts % 2).float().mean() < 0.6
    assert starts.min() == 0 and starts.max() == cfg.context_length - 2
    counts = torch.bincount(starts, minlength=cfg.context_length - 1).float()  # (C - 1,)
    assert counts.min() > 0.3 * counts.mean()  # every start occurs, none far rarer than the rest


def test_default_collate_stacks_a_batch():
    batch = next(iter(DataLoader(AssociativeRecall(CONFIG, 6), batch_size=3)))
    assert batch["tokens"].shape == batch["targets"].shape == (3, CONFIG.length)
    assert batch["tokens"].dtype == torch.long


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"length": 0}, "length"),
        ({"num_queries": 30, "num_pairs": 20}, "num_queries"),
        ({"num_pairs": 50, "num_keys": 40}, "num_pairs"),
        ({"length": 40, "num_pairs": 20, "num_queries": 4}, "num_pairs"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        RecallConfig(**{**vars(CONFIG), **overrides})
    with pytest.raises(ValueError, match="num_examples"):
        AssociativeRecall(CONFIG, -1)
