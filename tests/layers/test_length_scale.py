"""The scalable softmax (SSMax): its context lengths, its query scale, and the attention it gives."""

import math
from dataclasses import replace

import pytest
import torch

from mmlongnet.attention import MultiheadDilatedAttention, dilated_attention_reference
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.layers import LengthScale, context_lengths
from mmlongnet.models import MMLongNetConfig

E, H = 16, 4


def test_context_lengths_count_the_keys_each_query_sees():
    padding = torch.tensor([[False, False, True, False, True], [True, False, False, False, False]])
    assert context_lengths(5, None, False).tolist() == [[5.0]]
    assert context_lengths(5, padding, False).tolist() == [[3.0], [4.0]]
    assert context_lengths(4, None, True).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert context_lengths(2, None, True, cached=7).tolist() == [[8.0, 9.0]]  # after 7 cached positions
    assert context_lengths(5, padding, True).tolist() == [[1, 2, 2, 3, 3], [0, 1, 2, 3, 4]]


def test_the_scale_starts_at_one_at_the_reference_length_and_is_learned_per_head():
    scale = LengthScale(H, 32)
    assert scale.scale.shape == (H,) and scale.scale.requires_grad
    torch.testing.assert_close(scale.scale.detach(), torch.full((H,), 1 / math.log(32)))
    q = torch.randn(2, 32, H, 8)
    torch.testing.assert_close(scale(q, 32, None, False), q)  # n = n0: unchanged
    torch.testing.assert_close(scale(q[:, :8], 8, None, False), q[:, :8] * math.log(8) / math.log(32))
    with torch.no_grad():
        scale.scale.copy_(torch.tensor([1.0, 2.0, 0.0, -1.0]))
    out = scale(q[:, :3], 3, None, True)  # causal: n = 1, 2, 3
    log_n = torch.tensor([0.0, math.log(2), math.log(3)])
    expected = q[:, :3] * (log_n[:, None] * torch.tensor([1.0, 2.0, 0.0, -1.0]))[None, :, :, None]
    torch.testing.assert_close(out, expected)
    assert scale(q.bfloat16(), 32, None, False).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, None])
def test_a_reference_length_below_two_keys_is_refused(bad):
    with pytest.raises(ValueError, match="reference length must be an int >= 2"):
        LengthScale(H, bad)
    if bad is not None:  # None turns the option off in the configs
        with pytest.raises(ValueError, match="reference length"):
            LongNetLayerConfig(d_model=E, nhead=H, scalable_softmax=bad)


def ssmax_attention(q, k, v, scale, padding, is_causal):
    """Dense float64 SSMax attention written out: softmax(s_h log(n_i) q.k / sqrt(D)) per head."""
    batch, seq_len, heads, dim = q.shape
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim)  # (B, H, N, N)
    allowed = ~padding[:, None, None, :].expand(batch, heads, seq_len, seq_len)
    if is_causal:
        allowed = allowed & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    n = allowed[:, 0].sum(-1).double()  # (B, N): the keys each query sees
    factor = scale[None, :, None] * n.clamp(min=1).log()[:, None, :]  # (B, H, N)
    scores = (scores * factor[..., None]).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_with_the_scale_equals_ssmax_written_out_values_and_gradients(is_causal):
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(E, H, [32], [1], scalable_softmax=16, dtype=torch.float64)
    with torch.no_grad():
        mha.length_scale.scale.copy_(torch.tensor([0.3, 0.5, 0.9, 1.4]))
    x = torch.randn(2, 21, E, dtype=torch.float64)
    padding = torch.zeros(2, 21, dtype=torch.bool)
    padding[1, 13:] = True
    padding[0, 4] = True
    out, _ = mha(x, x, x, key_padding_mask=padding, is_causal=is_causal)
    heads = (2, 21, H, E // H)
    q, k, v = (proj(x).view(heads) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    attended = ssmax_attention(q, k, v, mha.length_scale.scale, padding, is_causal).reshape(2, 21, E)
    expected = mha.out_proj(mha.inner_norm(attended))
    keep = ~padding[..., None]  # padded queries: compared where they have a key
    torch.testing.assert_close(out * keep, expected * keep, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out) * keep
    learned = [mha.length_scale.scale, mha.q_proj.weight]
    grads = torch.autograd.grad((out * weights).sum(), learned)
    expected_grads = torch.autograd.grad((expected * weights).sum(), learned)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert grads[0].abs().min() > 0  # every head's scale learns


def test_dilated_schedule_takes_the_scaled_queries():
    torch.manual_seed(1)
    mha = MultiheadDilatedAttention(E, H, [4, 8], [1, 2], scalable_softmax=4, dtype=torch.float64)
    with torch.no_grad():
        mha.length_scale.scale.copy_(torch.tensor([0.2, 0.4, 0.6, 0.8]))
    x = torch.randn(2, 19, E, dtype=torch.float64)
    heads = (2, 19, H, E // H)
    q, k, v = (proj(x).view(heads) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    q = q * (mha.length_scale.scale * math.log(19))[None, None, :, None]  # n = 19 keys, every query
    attended = dilated_attention_reference(q, k, v, [4, 8], [1, 2]).reshape(2, 19, E)
    expected = mha.out_proj(mha.inner_norm(attended))
    torch.testing.assert_close(mha(x, x, x)[0], expected, rtol=1e-10, atol=1e-10)


def test_configs_reach_every_self_attention_and_not_the_cross_attention():
    layer = LongNetLayerConfig(
        d_model=E, nhead=H, segment_lengths=[8], dilation_rates=[1], scalable_softmax=64
    )
    own = MultiheadDilatedAttention.from_config(layer)
    assert own.length_scale.reference_length == 64 and "scalable_softmax=64" in repr(own)
    assert MultiheadDilatedAttention.from_config(layer, cross_attention="dense").length_scale is None
    assert MultiheadDilatedAttention.from_config(replace(layer, scalable_softmax=None)).length_scale is None
    config = MMLongNetConfig.tiny(scalable_softmax=128)
    assert config.layer_config(config.fusion_stack).scalable_softmax == 128
    with pytest.raises(ValueError, match="reference length"):
        MMLongNetConfig.tiny(scalable_softmax=1)
