"""Models after `parallelize_sequence` on 2 gloo ranks equal the unsharded models, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_ranks

from mmlongnet.attention import DilatedAttention, DilatedKVCache, GlobalQueries, MultiheadDilatedAttention
from mmlongnet.distributed import ShardedDilatedAttention, parallelize_sequence, shard_sequence
from mmlongnet.distributed.parallelize import LocalSlice
from mmlongnet.models import LongNetEncoderLayer, LongNetLM, MMLongNet, MMLongNetConfig

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
    """run(model, inputs) unsharded, then parallelized (in place) on local inputs; compare outputs and
    grads."""
    model.zero_grad()
    expected = run(model, inputs)
    (expected * grad).sum().backward()
    expected_grads = _param_grads(model, reduce=False)
    model.zero_grad()
    local_inputs = [None if t is None else shard_sequence(t) for t in inputs]
    names = [name for name, _ in model.named_parameters()]
    sharded = parallelize_sequence(model)
    assert sharded is model and [name for name, _ in model.named_parameters()] == names
    assert not any(isinstance(m, DilatedAttention) for m in model.modules())
    assert any(isinstance(m, ShardedDilatedAttention) for m in model.modules())
    out = run(model, local_inputs)
    (out * shard_sequence(grad)).sum().backward()
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
    with pytest.raises(ValueError, match="attention='dense'.*not supported when the sequence is sharded"):
        parallelize_sequence(dense)
    assert dense(h, h, h)[0].shape == h.shape  # refused before any change: still the unsharded module


def test_models_under_sequence_parallel_match_unsharded():
    run_ranks(_models, 2)


def _fake_sharded(attn: MultiheadDilatedAttention, attention, index: int, num_shards: int) -> None:
    """What `parallelize_sequence` does over a group, with `attention` as the sharded attention."""

    class Fake(ShardedDilatedAttention):
        def forward(self, q, k, v, is_causal=False, key_padding_mask=None, position_bias=None):
            return attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal)

    attn.inner_attention = Fake(attn.segment_lengths, attn.dilation_rates)
    attn.__class__ = type("SequenceParallelMultiheadDilatedAttention", (LocalSlice, type(attn)), {})
    attn.sequence_group, attn.sequence_shard = None, (index, num_shards)


def test_sharded_module_offsets_positions():
    calls = []

    def fake_attention(q, k, v, segment_lengths, dilation_rates, **kwargs):
        calls.append((q.shape, kwargs["is_causal"]))
        return v

    attn = MultiheadDilatedAttention(8, 2, [4], [1], positions="rope", layer_norm=False, dtype=torch.float64)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    _fake_sharded(attn, fake_attention, index=2, num_shards=3)
    out, _ = attn(x, x, x, is_causal=True)
    assert calls == [(torch.Size([1, 4, 2, 4]), True)]
    # with attention = identity on v, the output does not depend on positions: compare the q/k
    # rotation instead, at positions 8..11 = index 2 * n 4
    q = torch.randn(1, 4, 2, 4, dtype=torch.float64)
    rotated, _ = attn.positions(q, q, offset=8)
    attn = MultiheadDilatedAttention(8, 2, [4], [1], positions="rope", layer_norm=False, dtype=torch.float64)
    _fake_sharded(attn, lambda q, k, v, *a, **kw: q, index=2, num_shards=3)
    attn.q_proj.weight.data = torch.eye(8, dtype=torch.float64)
    attn.v_proj.weight.data = torch.eye(8, dtype=torch.float64)
    attn.out_proj.weight.data = torch.eye(8, dtype=torch.float64)
    out, _ = attn(q.reshape(1, 4, 8), q.reshape(1, 4, 8), q.reshape(1, 4, 8))
    torch.testing.assert_close(out, rotated.reshape(1, 4, 8), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"global_queries": GlobalQueries(torch.ones(1, 4, dtype=torch.bool), 4)}, "global queries"),
        ({"kv_cache": DilatedKVCache([4], [1]), "is_causal": True}, "cached decoding"),
    ],
)
def test_call_options_that_need_the_whole_sequence_are_refused_on_a_slice(options, match):
    attn = MultiheadDilatedAttention(8, 2, [4], [1], dtype=torch.float64)
    _fake_sharded(attn, lambda q, k, v, *a, **kw: v, index=0, num_shards=2)
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"{match}.*not supported when the sequence is sharded"):
        attn(x, x, x, **options)


SHIFTED_LM = dict(
    d_model=8,
    nhead=2,
    num_layers=1,
    dim_feedforward=16,
    segment_lengths=[4],
    dilation_rates=[1],
    token_shift=2,
)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MultiheadDilatedAttention(8, 2, [4], [1], attention="dense"), "attention='dense'"),
        (lambda: MultiheadDilatedAttention(8, 2, [4], [1], positions="relative"), "positions='relative'"),
        (lambda: MultiheadDilatedAttention(8, 2, [4], [1], dropout=0.1), "attention dropout"),
        (lambda: MultiheadDilatedAttention(8, 2, [4], [1], scalable_softmax=64), "scalable_softmax"),
        (lambda: DilatedAttention([4], [1], attention_dropout=0.1), "attention dropout"),
        (lambda: torch.nn.Linear(2, 2), "holds no DilatedAttention"),
        (lambda: LongNetLM(16, **SHIFTED_LM), "token_shift=2"),
        (
            lambda: MMLongNet(MMLongNetConfig.tiny(global_modalities=["text"])),
            r"global_modalities=\['text'\]",
        ),
    ],
)
def test_what_cannot_run_on_a_slice_is_refused_when_wrapping(build, match):
    with pytest.raises(ValueError, match=match):
        parallelize_sequence(build())  # refused before any process group is asked
