"""MultiheadDilatedAttention: the nn.MultiheadAttention drop-in, positions, cross-attention, errors."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlongnet.attention import (
    DilatedKVCache,
    MultiheadDilatedAttention,
    dense_attention,
    dilated_attention,
    dilated_attention_reference,
)
from mmlongnet.attention import dilated as dilated_module
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.attention.kernels import aligned_bias
from mmlongnet.layers import RelativePositionBias, RotaryEmbedding
from tests.devices import DEVICES

E, H = 16, 4


def test_one_full_branch_without_sub_ln_equals_nn_multihead_attention():
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    ours = MultiheadDilatedAttention.from_multihead_attention(torch_mha, [32], [1])
    x = torch.randn(3, 21, E, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 21, dtype=torch.bool)
    padding[1, 15:] = True
    expected, _ = torch_mha(x, x, x, key_padding_mask=padding, need_weights=False)
    out, weights = ours(x, x, x, key_padding_mask=padding)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    (grad_ours,) = torch.autograd.grad(out.square().sum(), x)
    (grad_torch,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_ours, grad_torch, rtol=1e-10, atol=1e-10)


def test_weight_mapping_with_separate_kdim_vdim_and_causal():
    torch.manual_seed(1)
    torch_mha = nn.MultiheadAttention(E, H, kdim=6, vdim=10, batch_first=True, dtype=torch.float64)
    ours = MultiheadDilatedAttention.from_multihead_attention(torch_mha, [64], [1])
    q = torch.randn(2, 12, E, dtype=torch.float64)
    k = torch.randn(2, 12, 6, dtype=torch.float64)
    v = torch.randn(2, 12, 10, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(12, dtype=torch.float64)
    expected, _ = torch_mha(q, k, v, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(q, k, v, is_causal=True)[0], expected, rtol=1e-10, atol=1e-10)


def test_forward_equals_projections_around_dilated_attention():
    torch.manual_seed(2)
    mha = MultiheadDilatedAttention(E, H, [4, 8], [1, 2], dtype=torch.float64)
    x = torch.randn(2, 19, E, dtype=torch.float64)
    heads = (2, 19, H, E // H)
    q, k, v = (proj(x).view(heads) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    attended = dilated_attention_reference(q, k, v, [4, 8], [1, 2], is_causal=True).reshape(2, 19, E)
    expected = mha.out_proj(mha.inner_norm(attended))
    torch.testing.assert_close(mha(x, x, x, is_causal=True)[0], expected, rtol=1e-10, atol=1e-10)


def test_magneto_initialisation_scales_value_and_output_projections():
    torch.manual_seed(3)
    gamma = 2.5
    mha = MultiheadDilatedAttention(256, 4, [8], [1], gamma_init=gamma)
    xavier = math.sqrt(2.0 / (256 + 256))
    for name, gain in (("q_proj", 1.0), ("k_proj", 1.0), ("v_proj", gamma), ("out_proj", gamma)):
        std = getattr(mha, name).weight.std().item()
        assert abs(std / (gain * xavier) - 1) < 0.03, name
        assert getattr(mha, name).bias.abs().max() == 0


def test_dense_cross_attention_to_memory_of_another_length():
    torch.manual_seed(4)
    torch_mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    ours = MultiheadDilatedAttention.from_multihead_attention(torch_mha, [8], [1], attention="dense")
    query = torch.randn(2, 7, E, dtype=torch.float64)
    memory = torch.randn(2, 13, E, dtype=torch.float64)
    padding = torch.zeros(2, 13, dtype=torch.bool)
    padding[0, 9:] = True
    expected, _ = torch_mha(query, memory, memory, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(ours(query, memory, memory, key_padding_mask=padding)[0], expected)


def test_dense_attention_gives_zeros_and_finite_gradients_without_keys():
    q, k, v = (torch.randn(2, 5, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1] = True
    out = dense_attention(q, k, v, key_padding_mask=padding)
    assert out[1].abs().max() == 0
    expected = dilated_attention_reference(q[:1], k[:1], v[:1], [5], [1])
    torch.testing.assert_close(out[:1], expected)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("keys", "causal", "biased"), [(13, False, False), (16, False, True), (11, True, True)]
)
def test_dense_attention_with_padding_and_bias_matches_the_reference(device, keys, causal, biased):
    """Values and gradients against the float64 reference; on CUDA in bf16 (the plan-free
    memory-efficient kernel), within twice the error of the reference run in bf16 itself."""
    torch.manual_seed(keys)
    q, k, v = (torch.randn(3, keys, H, 16, dtype=torch.float64) for _ in range(3))
    padding = torch.zeros(3, keys, dtype=torch.bool)
    padding[0, keys - 4 :] = True
    padding[2] = True  # a sample without keys: zeros
    bias = torch.randn(H, keys, keys, dtype=torch.float64) if biased else None
    grad = torch.randn(3, keys, H, 16, dtype=torch.float64)
    grad[2] = 0  # the reference gives NaN there

    def run(fn, dtype, dev, **kwargs):
        inputs = [t.to(dev, dtype).detach().requires_grad_() for t in (q, k, v)]
        extra = {} if bias is None else {"position_bias": bias.to(dev, dtype)}
        out = fn(*inputs, key_padding_mask=padding.to(dev), is_causal=causal, **extra, **kwargs)
        (out.float() * grad.to(dev, torch.float32)).sum().backward()
        return [t.double().cpu() for t in (out, *(x.grad for x in inputs))]

    def reference(*inputs, **kwargs):
        return dilated_attention_reference(*inputs, [keys], [1], **kwargs).nan_to_num(0.0)

    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    got = run(dense_attention, dtype, device)
    assert got[0][2].abs().max() == 0 and all(torch.isfinite(t).all() for t in got)
    expected = run(reference, torch.float64, "cpu")
    if device == "cpu":
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)
        return
    rounded = run(reference, torch.bfloat16, device)
    for a, b, r in zip(got, expected, rounded, strict=True):
        assert (a - b).abs().max() <= 2 * (r - b).abs().max() + 1e-3


def test_aligned_bias_broadcasts_and_aligns_rows_without_changing_values():
    q, k = torch.zeros(2, H, 5, 8), torch.zeros(2, H, 13, 8)
    key_bias = torch.randn(2, 1, 1, 13, dtype=torch.float64)
    out = aligned_bias(key_bias, q, k)
    assert out.shape == (2, H, 5, 13) and out.dtype == torch.float32 and out.stride()[1:3] == (0, 0)
    assert out.stride(0) % 8 == 0 and out.stride(-1) == 1
    torch.testing.assert_close(out, key_bias.float().expand(2, H, 5, 13))
    aligned = torch.randn(H, 5, 16)[..., :13]  # rows already 8-element aligned: no copy
    assert aligned_bias(aligned, q, k).data_ptr() == aligned.data_ptr()


def test_dense_causal_with_position_bias_folds_the_causal_mask():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 6, 2, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 6, 6, dtype=torch.float64)
    out = dense_attention(q, k, v, is_causal=True, position_bias=bias)
    expected = dilated_attention_reference(q, k, v, [6], [1], is_causal=True, position_bias=bias)
    torch.testing.assert_close(out, expected)


def test_rotary_positions_use_the_offset_of_a_slice():
    torch.manual_seed(6)
    mha = MultiheadDilatedAttention(E, H, [4], [1], positions="rope", dtype=torch.float64)
    x = torch.randn(1, 16, E, dtype=torch.float64)
    full, _ = mha(x, x, x)
    # the second segment [4, 8) alone, at its true positions: its rows only see themselves
    part, _ = mha(x[:, 4:8], x[:, 4:8], x[:, 4:8], position_offset=4)
    torch.testing.assert_close(part, full[:, 4:8])
    shifted, _ = mha(x[:, 4:8], x[:, 4:8], x[:, 4:8])
    # rotary scores depend only on distance, so within one segment any offset gives the same output
    torch.testing.assert_close(shifted, part)
    assert isinstance(mha.positions, RotaryEmbedding)


def test_relative_position_bias_matches_the_reference_with_an_explicit_bias(monkeypatch):
    monkeypatch.setattr(dilated_module, "_warned_reference", set())  # the warning is once per process
    torch.manual_seed(7)
    mha = MultiheadDilatedAttention(E, H, [4, 8], [1, 2], positions="relative", dtype=torch.float64)
    nn.init.normal_(mha.positions.weight)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    where = torch.arange(11)
    bias = mha.positions(where, where)
    heads = (2, 11, H, E // H)
    q, k, v = (proj(x).view(heads) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    attended = dilated_attention_reference(q, k, v, [4, 8], [1, 2], position_bias=bias).reshape(2, 11, E)
    with pytest.warns(UserWarning, match="position_bias"):
        out, _ = mha(x, x, x)
    torch.testing.assert_close(out, mha.out_proj(mha.inner_norm(attended)))
    out.sum().backward()
    assert mha.positions.weight.grad.abs().sum() > 0


def test_position_bias_of_dilated_attention_equals_sdpa_with_the_bias_as_mask():
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 9, 3, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, 9, 9, dtype=torch.float64)
    out = dilated_attention(q, k, v, [9], [1], position_bias=bias, backend="reference")
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="backend='reference'"):
        dilated_attention(q, k, v, [9], [1], position_bias=bias, backend="sdpa")
    with pytest.raises(ValueError, match="position_bias must have shape"):
        dilated_attention(q, k, v, [9], [1], position_bias=bias[:, :4], backend="reference")


@pytest.mark.parametrize("scalable_softmax", [None, 8])
def test_kv_cache_through_the_module_equals_the_full_causal_forward(scalable_softmax):
    torch.manual_seed(9)
    mha = MultiheadDilatedAttention(
        E, H, [3, 8], [1, 2], positions="rope", scalable_softmax=scalable_softmax, dtype=torch.float64
    )
    if scalable_softmax is not None:  # a learned scale per head: n = every position seen, and the query's own
        with torch.no_grad():
            mha.length_scale.scale.copy_(torch.tensor([0.3, 0.6, 0.9, 1.2]))
    x = torch.randn(2, 20, E, dtype=torch.float64)
    full, _ = mha(x, x, x, is_causal=True)
    cache = DilatedKVCache([3, 8], [1, 2])
    prompt, _ = mha(x[:, :5], x[:, :5], x[:, :5], is_causal=True, kv_cache=cache)
    steps = [mha(x[:, t : t + 1], x[:, t : t + 1], x[:, t : t + 1], is_causal=True, kv_cache=cache)[0]
             for t in range(5, 20)]  # fmt: skip
    torch.testing.assert_close(torch.cat([prompt, *steps], dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (dict(need_weights=True), "need_weights"),
        (dict(attn_mask=torch.zeros(6, 6)), "attn_mask"),
        (dict(key=torch.randn(1, 4, E)), "attention='dense'"),
    ],
)
def test_unsupported_calls_raise_clear_errors(call, match):
    mha = MultiheadDilatedAttention(E, H, [4], [1])
    x = torch.randn(1, 6, E)
    kwargs = dict(query=x, key=x, value=x) | call
    if call.get("key") is not None:
        kwargs["value"] = call["key"]
    with pytest.raises(ValueError, match=match):
        mha(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(embed_dim=10, num_heads=4), "embed_dim must be a positive multiple of num_heads"),
        (dict(batch_first=False), "batch_first"),
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), "equal length"),
        (dict(positions="alibi"), "positions must be one of"),
        (dict(positions="xpos", segment_lengths=[4, 6], dilation_rates=[1, 2]), "divide the largest"),
        (dict(attention="sparse"), "attention must be"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, match):
    args = dict(embed_dim=E, num_heads=H, segment_lengths=[4], dilation_rates=[1]) | kwargs
    with pytest.raises(ValueError, match=match):
        MultiheadDilatedAttention(**args)


def test_module_instances_are_accepted_as_positions():
    bias = RelativePositionBias(H, bidirectional=False)
    mha = MultiheadDilatedAttention(E, H, [4], [1], positions=bias)
    assert mha.positions is bias


def test_rotary_fraction_of_a_config_rotates_that_share_of_each_head():
    config = LongNetLayerConfig(d_model=32, nhead=2, segment_lengths=[4], dilation_rates=[1],
                                positions="rope", rotary_fraction=0.25)  # fmt: skip
    mha = MultiheadDilatedAttention.from_config(config)
    assert isinstance(mha.positions, RotaryEmbedding) and mha.positions.rotary_dim == 4
    full = MultiheadDilatedAttention.from_config(replace(config, rotary_fraction=1.0))
    assert full.positions.rotary_dim == 16
    for kwargs, match in (
        (dict(rotary_fraction=0.0), "rotary_fraction must be in"),
        (dict(rotary_fraction=0.5, positions="xpos"), "positions='rope' only"),
        (dict(rotary_fraction=0.5, positions=None), "positions='rope' only"),
    ):
        with pytest.raises(ValueError, match=match):
            replace(config, **kwargs)
