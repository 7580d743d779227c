"""Vocabulary-sharded embeddings and target attention over distinct tokens.

Single process: the shard layout, and unique vs full target attention (float64, forward and
gradients). On 2 and 4 gloo ranks: `ShardedEmbedding` (dedup and naive) against one `nn.Embedding`
over the assembled table, outputs and gradients shard by shard, and the errors raised on every rank.
On 2 gloo ranks: `TokenizedAttention` and a vocabulary-sharded `TextEncoder` against the same modules
over one `nn.Embedding` of the assembled table.
"""

# B batch, L length, V vocabulary, E embedding dim, D key dim, P ranks

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks
from torch import nn

from mmlongnet.distributed import (
    ShardedEmbedding,
    TargetAttention,
    TokenizedAttention,
    full_target_attention,
    parallelize_vocabulary,
    shard_offsets,
    unique_target_attention,
)
from mmlongnet.modalities.text import TextEncoder, TextEncoderConfig

E = 5


def test_parallelize_vocabulary_needs_a_vocab_sharded_text_encoder():
    with pytest.raises(ValueError, match="holds no TextEncoder with embedding='vocab_sharded'"):
        parallelize_vocabulary(TextEncoder(TextEncoderConfig(embed_dim=4)))  # before any process group


def test_shard_offsets_give_the_first_ranks_one_more_row():
    assert shard_offsets(10, 4) == [0, 3, 6, 8, 10]
    assert shard_offsets(8, 2) == [0, 4, 8]
    assert shard_offsets(2, 4) == [0, 1, 2, 2, 2]  # the last two ranks own nothing
    with pytest.raises(ValueError, match="num_embeddings"):
        shard_offsets(0, 2)


def _history(generator: torch.Generator, B: int, L: int, V: int, lengths: list[int]):
    """(B, L) ids from a small range (many repeats), padding set to -1; lengths (B,)."""
    history = torch.randint(0, V, (B, L), generator=generator)
    lengths = torch.tensor(lengths)
    history[torch.arange(L) >= lengths[:, None]] = -1
    return history, lengths


def test_unique_target_attention_equals_full_attention_forward_and_gradients():
    g = torch.Generator().manual_seed(0)
    V, D, B, L = 6, 4, 4, 9
    history, lengths = _history(g, B, L, V, [0, 9, 5, 1])
    table = torch.randn(V, E, generator=g, dtype=torch.float64)
    wk = torch.randn(E, D, generator=g, dtype=torch.float64)
    wv = torch.randn(E, 3, generator=g, dtype=torch.float64)
    query = torch.randn(B, D, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, 3, generator=g, dtype=torch.float64)
    results = []
    for attend in (unique_target_attention, full_target_attention):
        leaves = [t.clone().requires_grad_() for t in (query, table, wk, wv)]
        q, tab, k, v = leaves
        out = attend(
            q, history, lengths, lambda ids, t=tab, w=k: t[ids] @ w, lambda ids, t=tab, w=v: t[ids] @ w
        )
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for unique, full in zip(*results, strict=True):
        torch.testing.assert_close(unique, full, rtol=1e-12, atol=1e-12)
    assert results[0][0][0].abs().max() == 0  # length 0: zeros, not NaN
    assert torch.isfinite(results[0][1]).all() and results[0][1][0].abs().max() == 0
    # a history of one repeated id attends to that id alone, whatever the query
    same = torch.full((1, 4), 2)
    out = unique_target_attention(
        query[:1], same, torch.tensor([4]), lambda i: table[i] @ wk, lambda i: table[i] @ wv
    )
    torch.testing.assert_close(out, (table[2] @ wv)[None], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 10"):
        unique_target_attention(query, history, torch.tensor([0, 10, 1, 1]), lambda i: i, lambda i: i)


def _embedding_on_ranks(rank: int, world: int, V: int) -> None:
    dtype = torch.float64
    B, L = 4, 6
    torch.manual_seed(100 + rank)  # different shard initialisations and mini-batches on every rank
    dedup = ShardedEmbedding(V, E, dtype=dtype)
    naive = ShardedEmbedding(V, E, dedup=False, dtype=dtype)
    with torch.no_grad():
        naive.weight.copy_(dedup.weight)
    offsets = shard_offsets(V, world)
    assert (dedup.start, dedup.end) == (offsets[rank], offsets[rank + 1])
    table = dedup.gather_weight()  # (V, E), the same on every rank
    assert table.shape == (V, E)
    torch.testing.assert_close(table[dedup.start : dedup.end], dedup.weight, rtol=0, atol=0)
    reference = nn.Embedding(V, E, dtype=dtype)
    g = torch.Generator().manual_seed(rank)
    cases = [
        [0, L, 3, L],  # lengths 0 and L; ids from the whole vocabulary
        [0, 0, 0, 0] if rank == world - 1 else [L, 2, L, 1],  # one rank without any valid token
    ]
    for lengths_list in cases:
        tokens, lengths = _history(g, B, L, V, lengths_list)
        tokens[0, 0] = V - 1  # an id repeated within and across ranks (where valid)
        tokens[1, :2] = V - 1
        grad_out = torch.randn(B, L, E, generator=g, dtype=dtype)
        outs, grads, stats = [], [], []
        for module in (dedup, naive):
            module.weight.grad = None
            out = module(tokens, lengths)  # (B, L, E)
            out.backward(grad_out)
            outs.append(out.detach())
            grads.append(module.weight.grad.clone())
            stats.append(module.last_stats)
        valid = torch.arange(L) < lengths[:, None]  # (B, L)
        ref_weight = table.clone().requires_grad_()
        reference.weight = nn.Parameter(ref_weight)
        expected = reference(tokens.clamp_min(0)) * valid[..., None]  # (B, L, E), padding zero
        expected.backward(grad_out)
        full_grad = reference.weight.grad.clone()  # (V, E), this rank's contribution
        dist.all_reduce(full_grad)  # summed over ranks: the single-process gradient of the whole batch
        torch.testing.assert_close(outs[0], expected.detach(), rtol=0, atol=0)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[0], full_grad[dedup.start : dedup.end], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-13, atol=1e-13)
        assert stats[0].valid_tokens == stats[1].valid_tokens == int(valid.sum())
        assert sum(stats[0].send_counts) == len(set(tokens[valid].tolist()))  # distinct ids only
        assert sum(stats[1].send_counts) == int(valid.sum())
        sent = torch.tensor([[s.forward_elements, s.backward_elements] for s in stats])  # (2, 2) dedup, naive
        dist.all_reduce(sent)
        assert (sent[0] < sent[1]).all(), sent  # dedup communicates less over the group

    # an id out of range at a valid position: the same error, naming the row, on every rank
    tokens = torch.zeros(B, L, dtype=torch.long)
    tokens[3, L - 1] = -5  # padding: never read, never checked
    lengths = torch.tensor([L, L, L, 2])
    if rank == 1:
        tokens[2, 4] = V
    with pytest.raises(ValueError, match=rf"token id {V} at tokens\[2, 4\] \(batch row 2\) on rank 1"):
        dedup(tokens, lengths)
    bad_lengths = torch.tensor([L, L + 1 if rank == 0 else L, 0, 0])
    with pytest.raises(ValueError, match=rf"lengths\[1\] = {L + 1} on rank 0"):
        dedup(torch.zeros(B, L, dtype=torch.long), bad_lengths)
    with pytest.raises(ValueError, match="lengths must be a|on rank 0 of the group have a wrong shape"):
        dedup(torch.zeros(B, L, dtype=torch.long), lengths[:2] if rank == 0 else lengths)
    out = dedup(tokens.clamp(0, V - 1), lengths)  # the group still works afterwards
    assert out[3, L - 1].abs().max() == 0

    # target attention over distinct ids, keys and values from the sharded table, equals full
    # attention over an nn.Embedding of the whole table, in the output and every gradient
    attention = TargetAttention(E, key_dim=3, dtype=dtype)
    history, hist_lengths = _history(g, B, L, V, [L, 0, 4, 1])
    query = torch.randn(B, 3, generator=g, dtype=dtype)
    grad_out = torch.randn(B, E, generator=g, dtype=dtype)
    dedup.weight.grad = None
    q1 = query.clone().requires_grad_()
    out1 = attention(q1, history, hist_lengths, dedup.lookup)  # (B, E)
    out1.backward(grad_out)
    sharded_grads = [
        out1.detach(),
        q1.grad,
        dedup.weight.grad,
        attention.key.weight.grad,
        attention.value.weight.grad,
    ]
    attention.zero_grad()
    attention.unique = False
    reference = nn.Embedding.from_pretrained(table, freeze=False)
    q2 = query.clone().requires_grad_()
    out2 = attention(q2, history, hist_lengths, reference)  # (B, E)
    out2.backward(grad_out)
    assert out2[1].abs().max() == 0  # length 0
    table_grad = reference.weight.grad.clone()
    dist.all_reduce(table_grad)
    full_grads = [
        out2.detach(),
        q2.grad,
        table_grad[dedup.start : dedup.end],
        attention.key.weight.grad,
        attention.value.weight.grad,
    ]
    for got, want in zip(sharded_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_tokenized_attention_single_process_checks():
    table = nn.Embedding(6, E, dtype=torch.float64)
    module = TokenizedAttention(2, 3, 1, table, dtype=torch.float64)  # no process group: P = 1
    tokens, lengths = torch.tensor([[1, 1, 4], [5, 0, 0]]), torch.tensor([3, 1])
    embedded, pad = module(tokens, lengths)  # (2, 3, E), (2, 3)
    assert pad.tolist() == [[False, False, False], [False, True, True]]
    torch.testing.assert_close(embedded[0], table(tokens[0]), rtol=0, atol=0)
    assert embedded[1, 1:].abs().max() == 0
    with pytest.raises(ValueError, match="nranks=2 does not match the process group, which has 1 ranks"):
        TokenizedAttention(2, 3, 2, table)
    with pytest.raises(ValueError, match="embed_dim must be given"):
        TokenizedAttention(2, 3, 1, lambda ids: table(ids))
    with pytest.raises(ValueError, match="sequence_length must be a positive int"):
        TokenizedAttention(2, 0, 1, table)


def _tokenized_on_ranks(rank: int, world: int, directory: str) -> None:
    dtype = torch.float64
    V, B, L = 9, 3, 5
    torch.manual_seed(200 + rank)
    sharded = ShardedEmbedding(V, E, dtype=dtype)
    table = sharded.gather_weight()  # (V, E)
    g = torch.Generator().manual_seed(rank)
    history, lengths = _history(g, B, L, V, [L, 0, 3] if rank == 0 else [2, L, L])
    query = torch.randn(B, 4, generator=g, dtype=dtype)
    grad_out = torch.randn(B, E, generator=g, dtype=dtype)

    # with a query: distinct-id attention over the sharded table == full attention over one table
    results = []
    for embedding_fn, unique in ((sharded, True), (nn.Embedding.from_pretrained(table, freeze=False), False)):
        torch.manual_seed(0)  # the same projections on both modules
        module = TokenizedAttention(B, L, world, embedding_fn, key_dim=4, unique=unique, dtype=dtype)
        q = query.clone().requires_grad_()
        out = module(history, lengths, q)  # (B, E)
        out.backward(grad_out)
        table_grad = module.embedding.weight.grad.clone()
        if not unique:
            dist.all_reduce(table_grad)  # (V, E) summed over ranks
            table_grad = table_grad[sharded.start : sharded.end]
        attention = module.attention
        results.append(
            [out.detach(), q.grad, table_grad, attention.key.weight.grad, attention.value.weight.grad]
        )
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    if rank == 0:
        assert results[0][0][1].abs().max() == 0  # a history of length 0
    assert sharded.last_stats.valid_tokens == int(lengths.sum())

    # without a query: the routed embeddings (zero at padding) and the padding mask
    module = TokenizedAttention(B, L, world, sharded.lookup)
    assert module.embedding is sharded
    embedded, pad = module(history, lengths)  # (B, L, E), (B, L)
    valid = torch.arange(L) < lengths[:, None]
    assert torch.equal(pad, ~valid)
    torch.testing.assert_close(embedded, table[history.clamp_min(0)] * valid[..., None], rtol=0, atol=0)

    # errors: a wrong world size, a wrong shape (before any collective), an id outside the vocabulary
    with pytest.raises(ValueError, match=rf"nranks=3 does not match the process group, which has {world}"):
        TokenizedAttention(B, L, 3, sharded)
    with pytest.raises(ValueError, match=rf"tokens must be a \({B}, {L}\) long tensor"):
        module(history[:, :-1], lengths)
    bad = history.clamp_min(0)
    if rank == 1:
        bad[0, 1] = V
    with pytest.raises(ValueError, match=rf"token id {V} at tokens\[0, 1\] \(batch row 0\) on rank 1"):
        module(bad, lengths, query)

    # a vocabulary-sharded TextEncoder == a local one over the assembled table (pad id 2, read by no one)
    config = TextEncoderConfig(embed_dim=E, vocab_size=V, padding_id=2)
    local = TextEncoder(config, dtype=dtype)
    encoder = parallelize_vocabulary(
        TextEncoder(
            TextEncoderConfig(embed_dim=E, vocab_size=V, padding_id=2, embedding="vocab_sharded"), dtype=dtype
        )
    )
    assert isinstance(encoder.embedding, ShardedEmbedding) and encoder.embedding.weight.dtype == dtype
    with pytest.raises(ValueError, match="sharded already"):
        parallelize_vocabulary(encoder)
    full = encoder.embedding.gather_weight()
    with torch.no_grad():
        local.embedding.weight.copy_(full)
        local.embedding.weight[2].zero_()
    tokens = history.clamp_min(0)
    tokens[0, 0] = 2  # the pad id at a valid position: zero output, no gradient
    grad_tokens = torch.randn(B, L, E, generator=g, dtype=dtype)
    outs, grads = [], []
    for enc in (encoder, local):
        out, pad = enc(tokens, lengths)  # (B, L, E), (B, L)
        out.backward(grad_tokens)
        outs.append((out.detach(), pad))
        grads.append(enc.embedding.weight.grad.clone())
    dist.all_reduce(grads[1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(
        grads[0], grads[1][encoder.embedding.start : encoder.embedding.end], rtol=1e-13, atol=1e-13
    )
    assert grads[1][2].abs().max() == 0
    if encoder.embedding.start <= 2 < encoder.embedding.end:
        assert grads[0][2 - encoder.embedding.start].abs().max() == 0

    # each rank saves and loads back its own rows
    encoder.save_pretrained(f"{directory}/rank{rank}")
    loaded = TextEncoder.from_pretrained(f"{directory}/rank{rank}", parallelize=parallelize_vocabulary)
    torch.testing.assert_close(loaded.embedding.weight, encoder.embedding.weight.float(), rtol=0, atol=0)


def _on_ranks(rank: int, world: int, V: int, directory: str) -> None:
    _embedding_on_ranks(rank, world, V)
    if world == 2:  # in the same processes: a spawn costs more than the checks
        _tokenized_on_ranks(rank, world, directory)


@pytest.mark.parametrize("world, V", [(2, 7), (4, 10)])
def test_sharded_embedding_and_tokenized_modules_equal_one_table_on_gloo_ranks(world, V, tmp_path):
    run_ranks(_on_ranks, world, V, str(tmp_path), timeout=60.0)
