"""Models under `sequence_parallel` on 2 gloo ranks equal the unsharded models, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from mmlongnet.attention import MultiheadDilatedAttention
from mmlongnet.attention.sharding import SequenceShard, current_shard, use_shard
from mmlongnet.distributed import sequence_parallel, shard_sequence
from mmlongnet.models import LongNetEncoderLayer, LongNetLM

TOL = 1e-10


def _param_grads(model: torch.nn.Module, reduce: bool) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        if reduce:
            dist.all_reduce(g)  # the sum over ranks of every rank's partial gradient
        grads[name] = g
    return grads


def _compare(model, run, inputs, grad, reduce_dim=1):
    """run(model, inputs) unsharded and sharded (backward outside the block); compare outputs and grads."""
    model.zero_grad()
    expected = run(model, inputs)
    (expected * grad).sum().backward()
    expected_grads = _param_grads(model, reduce=False)
    model.zero_grad()
    local_inputs = [None if t is None else shard_sequence(t) for t in inputs]
    with sequence_parallel() as shard:
        assert current_shard() is shard
        out = run(model, local_inputs)
    assert current_shard() is None
    (out * shard_sequence(grad)).sum().backward()  # backward after leaving the block
    torch.testing.assert_close(out, shard_sequence(expected.detach()), rtol=0, atol=TOL)
    for name, g in _param_grads(model, reduce=True).items():
        torch.testing.assert_close(g, expected_grads[name], rtol=0, atol=TOL, msg=f"grad of {name}")
    assert any(g.abs().max() > 0 for g in expected_grads.values())


def _models(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    # encoder layer, n = 12: W=4 local, W=8 and 24 exchanged; RoPE at global positions; padding;
    # once with activation checkpointing (recomputed in backward, after the block is left)
    for checkpointing in (False, True):
        torch.manual_seed(1)
        layer = LongNetEncoderLayer(
            16, 4, 32, segment_lengths=[4, 8, 24], dilation_rates=[1, 2, 4], dropout=0.0, positions="rope",
            checkpoint_activations=checkpointing, dtype=torch.float64,
        )  # fmt: skip
        x = torch.randn(2, 24, 16, generator=g, dtype=torch.float64)  # (B, N, E)
        mask = torch.zeros(2, 24, dtype=torch.bool)
        mask[1, 20:] = True
        grad = torch.randn(2, 24, 16, generator=g, dtype=torch.float64)
        _compare(layer, lambda m, t: m(t[0], t[1], is_causal=False), [x, mask], grad)

    # decoder-only LM with XPOS (block-relative positions) and causal attention, 2 layers
    torch.manual_seed(2)
    lm = LongNetLM(11, d_model=16, nhead=4, num_layers=2, dim_feedforward=32, segment_lengths=[4, 8, 16],
                   dilation_rates=[1, 2, 4], positions="xpos", dtype=torch.float64)  # fmt: skip
    tokens = torch.randint(0, 11, (2, 24), generator=g)
    grad = torch.randn(2, 24, 11, generator=g, dtype=torch.float64)
    _compare(lm, lambda m, t: m(t[0]), [tokens], grad)

    # what cannot run on a shard is refused with a clear error
    dense = MultiheadDilatedAttention(16, 4, [4], [1], attention="dense", dtype=torch.float64)
    h = torch.randn(2, 12, 16, dtype=torch.float64)
    with sequence_parallel(), pytest.raises(ValueError, match="attention='dense'.*not supported while"):
        dense(h, h, h)


def test_models_under_sequence_parallel_match_unsharded():
    run_ranks(_models, 2)


def test_shard_offsets_positions_and_restores_on_exit():
    calls = []

    def fake_attention(q, k, v, segment_lengths, dilation_rates, **kwargs):
        calls.append((q.shape, kwargs["is_causal"]))
        return v

    attn = MultiheadDilatedAttention(8, 2, [4], [1], positions="rope", layer_norm=False, dtype=torch.float64)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with use_shard(SequenceShard(fake_attention, index=2, num_shards=3)):
        out, _ = attn(x, x, x, is_causal=True)
    assert calls == [(torch.Size([1, 4, 2, 4]), True)]
    assert current_shard() is None
    # with attention = identity on v, the output does not depend on positions: compare the q/k
    # rotation instead, at positions 8..11 = index 2 * n 4
    q = torch.randn(1, 4, 2, 4, dtype=torch.float64)
    rotated, _ = attn.positions(q, q, offset=8)
    with use_shard(SequenceShard(lambda q, k, v, *a, **kw: q, index=2, num_shards=3)):
        attn.q_proj.weight.data = torch.eye(8, dtype=torch.float64)
        attn.v_proj.weight.data = torch.eye(8, dtype=torch.float64)
        attn.out_proj.weight.data = torch.eye(8, dtype=torch.float64)
        out, _ = attn(q.reshape(1, 4, 8), q.reshape(1, 4, 8), q.reshape(1, 4, 8))
    torch.testing.assert_close(out, rotated.reshape(1, 4, 8), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="index must be"):
        SequenceShard(fake_attention, index=3, num_shards=3)
