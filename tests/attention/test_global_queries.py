"""Global queries: dense rows beside dilated attention, against the two attentions computed apart."""

import warnings

import pytest
import torch
from torch import nn

from mmlongnet.attention import DilatedKVCache, GlobalQueries, MultiheadDilatedAttention, attend_globally
from mmlongnet.attention.config import LongNetLayerConfig

E, H = 16, 4
SEGMENTS, RATES = [4, 8, 16], [1, 2, 4]


def test_rows_put_each_samples_global_rows_first_and_mark_the_fill():
    mask = torch.tensor([[False, True, False, True, False], [False] * 5, [True, False, False, False, False]])
    index, valid = GlobalQueries(mask, 2).rows()
    assert index[0].tolist() == [1, 3] and valid[0].tolist() == [True, True]
    assert not valid[1].any() and len(set(index[1].tolist())) == 2
    assert index[2, 0] == 0 and valid[2].tolist() == [True, False]
    assert GlobalQueries(mask, 9).rows()[0].shape == (3, 5)  # no more than N rows
    assert GlobalQueries.from_mask(mask).count == 2


@pytest.mark.parametrize(
    ("mask", "count", "match"),
    [
        (torch.ones(2, 3), 1, "bool tensor"),
        (torch.ones(3, dtype=torch.bool), 1, "bool tensor"),
        (torch.ones(2, 3, dtype=torch.bool), -1, "int >= 0"),
        (torch.ones(2, 3, dtype=torch.bool), True, "int >= 0"),
        (torch.ones(2, 3, dtype=torch.bool), 2, "3 global rows, more than count = 2"),
    ],
)
def test_bad_global_queries_are_refused(mask, count, match):
    with pytest.raises(ValueError, match=match):
        GlobalQueries(mask, count)


def pair(positions):
    """A dilated module and a dense one with the same weights (float64)."""
    torch.manual_seed(3)
    dilated = MultiheadDilatedAttention(E, H, SEGMENTS, RATES, positions=positions, dtype=torch.float64)
    dense = MultiheadDilatedAttention(
        E, H, SEGMENTS, RATES, positions=positions, attention="dense", dtype=torch.float64
    )
    dense.load_state_dict(dilated.state_dict())
    return dilated, dense


@pytest.mark.parametrize("positions", ["rope", None, "relative"])
@pytest.mark.parametrize("padded", [False, True])
def test_global_rows_take_dense_attention_and_the_rest_dilated_values_and_gradients(positions, padded):
    dilated, dense = pair(positions)
    if positions == "relative":
        nn.init.normal_(dilated.positions.weight)
        dense.load_state_dict(dilated.state_dict())
    x = torch.randn(3, 21, E, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(21)[None, :] >= torch.tensor([21, 13, 6])[:, None] if padded else None
    mask = torch.zeros(3, 21, dtype=torch.bool)
    mask[0, [0, 1, 17]] = True
    mask[1, [5, 12]] = True  # sample 2: none
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*position_bias")  # the relative bias runs the reference backend
        out, _ = dilated(x, x, x, key_padding_mask=padding, global_queries=GlobalQueries(mask, 3))
        plain = dilated(x, x, x, key_padding_mask=padding)[0]
        apart = torch.where(mask[..., None], dense(x, x, x, key_padding_mask=padding)[0], plain)
    torch.testing.assert_close(out, apart)
    assert (out[0, [0, 1, 17]] - plain[0, [0, 1, 17]]).abs().max() > 1e-3  # the global rows did change
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *dilated.parameters()])
    params = list(dilated.parameters())
    expected = torch.autograd.grad(
        (apart * weights).sum(), [x, *params, *dense.parameters()], allow_unused=True
    )  # the dense module's parameters are the dilated one's, copied: their gradients add up
    torch.testing.assert_close(grads[0], expected[0])
    for got, from_dilated, from_dense in zip(
        grads[1:], expected[1 : 1 + len(params)], expected[1 + len(params) :], strict=True
    ):
        torch.testing.assert_close(got, sum(g for g in (from_dilated, from_dense) if g is not None))


def test_attend_globally_without_rows_returns_the_output_unchanged():
    q = k = v = torch.randn(2, 5, H, 4)
    out = torch.randn(2, 5, H, 4)
    assert attend_globally(out, q, k, v, GlobalQueries(torch.zeros(2, 5, dtype=torch.bool), 0)) is out


def cache():
    return DilatedKVCache(SEGMENTS, RATES)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x, g: m(x, x, x, is_causal=True, global_queries=g), "bidirectional"),
        (lambda m, x, g: m(x, x, x, kv_cache=cache(), is_causal=True, global_queries=g), "bidirectional"),
        (lambda m, x, g: m(x, x, x, global_queries=GlobalQueries(g.mask[:, :3], 1)), r"must be \(B, N\)"),
        (lambda m, x, g: m(x, x, x, global_queries=g.mask), "must be a GlobalQueries"),
    ],
)  # fmt: skip
def test_unsupported_global_queries_are_refused(call, match):
    dilated, dense = pair("rope")
    x = torch.randn(2, 9, E, dtype=torch.float64)
    queries = GlobalQueries(torch.eye(9, dtype=torch.bool)[:2], 1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(dilated, x, queries)
    with pytest.raises(ValueError, match="bidirectional"):
        dense(x, x, x, global_queries=queries)


def naive_global(out, q, k, v, mask, padding, bias, gate):
    """attend_globally spelled out row by row in float64: global rows softmax over every valid key;
    with `gate`, every other row adds gate[h] * softmax over the valid global keys."""
    batch, seq_len, heads, dim = q.shape
    rows = []
    for b in range(batch):
        keys = ~padding[b] if padding is not None else torch.ones(seq_len, dtype=torch.bool)
        globals_ = mask[b]
        per_row = []
        for n in range(seq_len):
            scores = torch.einsum("hd,mhd->hm", q[b, n], k[b]) / dim**0.5  # (H, N)
            if bias is not None:
                scores = scores + bias[:, n]
            if globals_[n]:
                weights = scores.masked_fill(~keys, float("-inf")).softmax(-1)
                per_row.append(torch.einsum("hm,mhd->hd", weights, v[b]))
            elif gate is not None and globals_.any():
                weights = scores.masked_fill(~globals_, float("-inf")).softmax(-1)
                per_row.append(out[b, n] + gate[:, None] * torch.einsum("hm,mhd->hd", weights, v[b]))
            else:
                per_row.append(out[b, n])
        rows.append(torch.stack(per_row))
    return torch.stack(rows)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("read", [False, True])
def test_attend_globally_matches_the_rows_spelled_out_values_and_gradients(with_bias, read):
    torch.manual_seed(5)
    batch, seq_len, dim = 3, 11, 4
    q, k, v, out = (
        torch.randn(batch, seq_len, H, dim, dtype=torch.float64, requires_grad=True) for _ in "qkvo"
    )
    padding = torch.arange(seq_len)[None, :] >= torch.tensor([11, 8, 5])[:, None]
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[0, [2, 9]] = True
    mask[1, [0]] = True  # sample 2: no global row, so nothing to read
    bias = torch.randn(H, seq_len, seq_len, dtype=torch.float64, requires_grad=True) if with_bias else None
    gate = torch.randn(H, dtype=torch.float64, requires_grad=True) if read else None
    got = attend_globally(
        out, q, k, v, GlobalQueries(mask, 2), key_padding_mask=padding, position_bias=bias, read_gate=gate
    )
    expected = naive_global(out, q, k, v, mask, padding, bias, gate)
    torch.testing.assert_close(got, expected)
    inputs = [t for t in (q, k, v, out, bias, gate) if t is not None]
    weights = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), inputs),
        torch.autograd.grad((expected * weights).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    if read:
        assert (got[0, 0] - out[0, 0]).abs().max() > 1e-3  # a plain row did read the global rows
        torch.testing.assert_close(got[2], out[2])  # no global rows: unchanged


def test_global_read_starts_closed_and_its_gate_learns():
    torch.manual_seed(3)
    plain = MultiheadDilatedAttention(E, H, SEGMENTS, RATES, positions="rope", dtype=torch.float64)
    reading = MultiheadDilatedAttention(
        E, H, SEGMENTS, RATES, positions="rope", global_read=True, dtype=torch.float64
    )
    missing = reading.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["global_read_gate"] and reading.global_read_gate.shape == (H,)
    assert "global_read=True" in repr(reading) and "global_read=False" in repr(plain)
    x = torch.randn(2, 19, E, dtype=torch.float64)
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[:, :3] = True
    queries = GlobalQueries(mask, 3)
    out = reading(x, x, x, global_queries=queries)[0]
    torch.testing.assert_close(out, plain(x, x, x, global_queries=queries)[0])  # the gate starts at 0
    (grad,) = torch.autograd.grad(out.square().sum(), [reading.global_read_gate])
    assert grad.abs().min() > 0  # every head's gate learns from the first step
    with torch.no_grad():
        reading.global_read_gate.fill_(0.5)
    opened = reading(x, x, x, global_queries=queries)[0]
    assert (opened[:, 3:] - out[:, 3:]).abs().max() > 1e-3
    torch.testing.assert_close(reading(x, x, x)[0], plain(x, x, x)[0])  # no global rows: nothing to read


def test_global_read_needs_dilated_attention():
    with pytest.raises(ValueError, match="global_read serves dilated"):
        MultiheadDilatedAttention(E, H, SEGMENTS, RATES, attention="dense", global_read=True)
    with pytest.raises(ValueError, match="global_read serves dilated"):
        LongNetLayerConfig(d_model=E, nhead=H, attention="dense", global_read=True)
    config = LongNetLayerConfig(
        d_model=E, nhead=H, segment_lengths=SEGMENTS, dilation_rates=RATES, global_read=True
    )
    assert MultiheadDilatedAttention.from_config(config).global_read_gate is not None
    assert MultiheadDilatedAttention.from_config(config, cross_attention="dense").global_read_gate is None
