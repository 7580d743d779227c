"""Position embeddings (RoPE, XPOS, T5 relative bias) against slow float64 twins."""

import math

import pytest
import torch

from mmlongnet.layers.relative_bias import RelativePositionBias, relative_position_bucket
from mmlongnet.layers.rope import RotaryEmbedding, apply_rotary, rotary_cos_sin, rotary_dims
from mmlongnet.layers.xpos import XPos

FAR = 2**20  # a position where a float32 angle product is off by ~0.06 rad


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def inv_freq64(head_dim, base=10000.0):
    return torch.tensor([base ** (-2.0 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64)


def slow_rotary(x, positions, base=10000.0):
    """Complex rotation in float64: z_i = x_i + 1j x_{i + D/2}, times exp(1j p inv_freq_i)."""
    x = x.to(torch.float64)
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])  # (B, N, H, P)
    angle = positions.to(torch.float64).unsqueeze(-1) * inv_freq64(x.shape[-1], base)  # (N, P) / (B, N, P)
    z = z * torch.polar(torch.ones_like(angle), angle).unsqueeze(-2)
    return torch.cat((z.real, z.imag), dim=-1)


def scores(q, k):
    """(B, N, H, D) x2 -> (B, H, N, N), accumulated in float64."""
    return torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double())


# ---------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rotary_matches_complex_rotation(base):
    q, k = randn(2, 11, 3, 16, dtype=torch.float64), randn(2, 11, 3, 16, dtype=torch.float64, seed=1)
    positions = torch.arange(11) * 7 + 3
    rope = RotaryEmbedding(16, base=base)
    q_rot, k_rot = rope(q, k, positions)
    torch.testing.assert_close(q_rot, slow_rotary(q, positions, base), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_rot, slow_rotary(k, positions, base), rtol=1e-12, atol=1e-12)
    q32, _ = rope(q.float(), k.float(), positions)  # float32 path: float32 cos/sin
    torch.testing.assert_close(q32.double(), slow_rotary(q, positions, base), rtol=0, atol=2e-6)


def test_cos_sin_shapes_and_head_dim_check():
    cos, sin = rotary_cos_sin(torch.arange(5), 8)
    assert cos.shape == sin.shape == (5, 4) and cos.dtype == torch.float32
    cos, sin = rotary_cos_sin(torch.arange(10).view(2, 5), 8)
    assert cos.shape == (2, 5, 4)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones(2, 5, 4))
    with pytest.raises(ValueError, match="head_dim"):
        rotary_cos_sin(torch.arange(5), 7)
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(6 + 1)
    with pytest.raises(ValueError, match="positions"):
        rotary_cos_sin(torch.arange(5.0), 8)


def naive_float32_rotary(x, positions, base=10000.0):
    """The usual float32 angle: positions.float() * inv_freq, no reduction."""
    inv_freq = base ** -(torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1])
    angle = positions.float().unsqueeze(-1) * inv_freq  # (N, P), float32 product
    return apply_rotary(x, angle.cos(), angle.sin())


def test_relative_position_property_far_away_needs_float64_angles():
    n, head_dim, delta = 64, 64, 3 * FAR + 12345
    q, k = randn(1, n, 2, head_dim), randn(1, n, 2, head_dim, seed=1)
    near = torch.arange(n) + 17
    far = near + FAR + 777
    exact = scores(slow_rotary(q, near), slow_rotary(k, near))  # depends on m - n only
    scale = exact.abs().max()
    rope = RotaryEmbedding(head_dim)

    def error(rotate, positions):
        return ((scores(*rotate(positions)) - exact).abs().max() / scale).item()

    ours = max(error(lambda p: rope(q, k, p), p) for p in (far, far + delta))
    naive = max(
        error(lambda p: (naive_float32_rotary(q, p), naive_float32_rotary(k, p)), p)
        for p in (far, far + delta)
    )
    assert ours < 1e-5, ours
    assert naive > 100 * ours, (naive, ours)
    # And the shifted pairs agree with each other, not just with the truth.
    shifted = scores(*rope(q, k, far)) - scores(*rope(q, k, far + delta))
    assert (shifted.abs().max() / scale).item() < 1e-5


def test_offset_slice_equals_slice_of_full_sequence():
    q, k = randn(2, 40, 3, 8), randn(2, 40, 3, 8, seed=1)
    rope = RotaryEmbedding(8)
    full_q, full_k = rope(q, k, offset=FAR)
    part_q, part_k = rope(q[:, 13:29], k[:, 13:29], offset=FAR + 13)
    torch.testing.assert_close(part_q, full_q[:, 13:29], rtol=0, atol=0)
    torch.testing.assert_close(part_k, full_k[:, 13:29], rtol=0, atol=0)
    explicit = rope(q, k, torch.arange(FAR, FAR + 40))
    torch.testing.assert_close(explicit[0], full_q, rtol=0, atol=0)


def test_batched_positions():
    q, k = randn(2, 9, 2, 8, dtype=torch.float64), randn(2, 9, 2, 8, dtype=torch.float64, seed=1)
    positions = torch.stack([torch.arange(9), torch.arange(9) * 3 + 100])  # (B, N)
    q_rot, k_rot = RotaryEmbedding(8)(q, k, positions)
    for b in range(2):
        for got, x in ((q_rot, q), (k_rot, k)):
            expected = slow_rotary(x[b : b + 1], positions[b])[0]
            torch.testing.assert_close(got[b], expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positions"):
        RotaryEmbedding(8)(q, k, torch.arange(8))
    with pytest.raises(ValueError, match="offset"):
        RotaryEmbedding(8)(q, k, torch.arange(9), offset=3)


def test_partial_rotary_rotates_the_first_channels_and_passes_the_rest():
    q, k = randn(2, 21, 3, 12, dtype=torch.float64), randn(2, 21, 3, 12, dtype=torch.float64, seed=1)
    positions = torch.arange(FAR, FAR + 21)
    rope = RotaryEmbedding(12, rotary_dim=4)
    q_rot, k_rot = rope(q, k, offset=FAR)
    for got, x in ((q_rot, q), (k_rot, k)):
        torch.testing.assert_close(got[..., :4], slow_rotary(x[..., :4], positions), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[..., 4:], x[..., 4:], rtol=0, atol=0)
    # the position-free channels score the same at every distance; the rotated ones by distance only
    shifted = rope(q, k, offset=FAR + 1000)
    torch.testing.assert_close(scores(*shifted), scores(q_rot, k_rot), rtol=1e-9, atol=1e-9)
    assert "rotary_dim=4" in repr(rope) and "rotary_dim" not in repr(RotaryEmbedding(12))


@pytest.mark.parametrize("rotary_dim", [0, 3, 14, 4.0, True])
def test_bad_rotary_dim_is_refused(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(12, rotary_dim=rotary_dim)


def test_rotary_dims_rounds_to_whole_pairs():
    assert [rotary_dims(64, f) for f in (1.0, 0.5, 0.25, 0.01)] == [64, 32, 16, 2]
    assert rotary_dims(8, 0.3) == 2  # 1.2 pairs -> 1
    for bad in (0.0, 1.5, -0.5, True):
        with pytest.raises(ValueError, match="rotary_fraction"):
            rotary_dims(64, bad)


def test_table_ops_pass_opcheck():
    for positions in (torch.arange(FAR, FAR + 7), torch.arange(12).view(2, 6) * 5):
        for dtype in (torch.float32, torch.float64):
            torch.library.opcheck(torch.ops.mmlongnet.rotary_cos_sin, (positions, 8, 10000.0, dtype))
            for block_length in (None, 16):
                args = (positions, 8, 64.0, block_length, dtype)
                torch.library.opcheck(torch.ops.mmlongnet.xpos_factors, args)


@pytest.mark.parametrize("module", [RotaryEmbedding(8), XPos(8, scale_base=64.0, block_length=16)])
def test_compiled_positions_compute_their_tables_once_and_match_eager(module):
    """Under torch.compile the (N, D/2) tables are one call of each op, not float64 arithmetic
    folded into every element of q and k; the rotated values equal the eager ones."""
    from torch._inductor.utils import run_and_get_code

    q, k = randn(2, 33, 3, 8), randn(2, 33, 3, 8, seed=1)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    (got_q, got_k), code = run_and_get_code(compiled, q, k, None, FAR)
    expected_q, expected_k = module(q, k, offset=FAR)
    torch.testing.assert_close(got_q, expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-6, atol=1e-6)
    source = "\n".join(code)
    assert source.count("torch.ops.mmlongnet.rotary_cos_sin.default(") == 1  # one table for q and k
    assert source.count("torch.ops.mmlongnet.xpos_factors.default(") == isinstance(module, XPos)
    for per_element in ("remainder", "fmod", ".log()", "std::log"):  # no angles or logs per element
        assert per_element not in source, per_element


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module", [RotaryEmbedding(32), XPos(32, scale_base=64.0, block_length=256)])
def test_low_precision_is_the_rounded_float32_result(dtype, module):
    """The rotation runs in float32, so the only error is the final rounding: <= eps/2 relative."""
    q, k = randn(2, 50, 2, 32).to(dtype), randn(2, 50, 2, 32, seed=1).to(dtype)
    out = module(q, k, offset=FAR + 5)
    ref = module(q.float(), k.float(), offset=FAR + 5)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == dtype
        assert ((a.float() - b).abs() <= eps / 2 * b.abs() + tiny).all()


# ------------------------------------------------------------------------------------ xpos


def zeta(head_dim, gamma=0.4):
    values = [(2 * i / head_dim + gamma) / (1 + gamma) for i in range(head_dim // 2)]
    return torch.tensor(values, dtype=torch.float64)


def slow_xpos_scores(q, k, positions, scale_base):
    """score[b, h, m, n] = sum_i zeta_i^(d / scale_base) * Re(zq_i conj(zk_i) e^{1j d w_i}), d = p_m - p_n."""
    q, k = q.double(), k.double()
    half = q.shape[-1] // 2
    zq = torch.complex(q[..., :half], q[..., half:])  # (B, N, H, P)
    zk = torch.complex(k[..., :half], k[..., half:])
    pos = positions.double()
    dist = pos[:, None] - pos[None, :]  # (N, N)
    w, z = inv_freq64(q.shape[-1]), zeta(q.shape[-1])
    decay = z ** (dist[..., None] / scale_base)  # (N, N, P)
    phase = torch.polar(torch.ones_like(decay), dist[..., None] * w)  # (N, N, P)
    pair = torch.einsum("bmhi,bnhi->bhmni", zq, zk.conj())  # (B, H, N, N, P)
    return (pair * phase * decay).real.sum(-1)


def test_xpos_within_block_matches_slow_twin():
    head_dim, block, scale_base = 16, 64, 8.0
    q = randn(2, 40, 3, head_dim, dtype=torch.float64)
    k = randn(2, 40, 3, head_dim, dtype=torch.float64, seed=1)
    positions = torch.arange(40) + 2 * block + 10  # all inside block 2
    xpos = XPos(head_dim, scale_base=scale_base, block_length=block)
    expected = slow_xpos_scores(q, k, positions, scale_base)
    torch.testing.assert_close(scores(*xpos(q, k, positions)), expected, rtol=1e-10, atol=1e-10)
    plain = XPos(head_dim, scale_base=scale_base)  # block_length=None: exact for any pair
    torch.testing.assert_close(scores(*plain(q, k, positions)), expected, rtol=1e-10, atol=1e-10)
    # The decay is real: without it the scores differ by far more than the tolerance.
    rotary = scores(*RotaryEmbedding(head_dim)(q, k, positions))
    assert (rotary - expected).abs().max() > 1.0


def test_xpos_scores_depend_only_on_distance_within_block_far_away():
    head_dim, block = 32, 256
    q, k = randn(1, block, 2, head_dim), randn(1, block, 2, head_dim, seed=1)
    xpos = XPos(head_dim, scale_base=128.0, block_length=block)
    near = scores(*xpos(q, k, torch.arange(block)))
    scale = near.abs().max()
    for first in (FAR, 7 * FAR + 3 * block):  # aligned blocks far away
        far = scores(*xpos(q, k, torch.arange(first, first + block)))
        assert ((far - near).abs().max() / scale).item() < 1e-5
    exact = slow_xpos_scores(q, k, torch.arange(block), 128.0)
    assert ((near - exact).abs().max() / exact.abs().max()).item() < 1e-5


@pytest.mark.parametrize("block_length", [4096, None])
def test_xpos_finite_in_float16_far_away(block_length):
    q, k = randn(1, 64, 2, 32).half(), randn(1, 64, 2, 32, seed=1).half()
    xpos = XPos(32, block_length=block_length)
    for positions in (torch.arange(FAR, FAR + 64), torch.arange(64) * 4096 + 100 * FAR):
        q_out, k_out = xpos(q, k, positions)
        assert q_out.dtype == k_out.dtype == torch.float16
        assert torch.isfinite(q_out).all() and torch.isfinite(k_out).all()
        if block_length is not None:  # factors <= zeta^-4 ~ 150: exactly the rounded float32 result
            ref_q, ref_k = xpos(q.float(), k.float(), positions)
            assert torch.equal(q_out, ref_q.half()) and torch.equal(k_out, ref_k.half())
    if block_length is None:  # plain XPOS at 2^20: keys saturate at the float16 maximum
        assert k_out.abs().max() == torch.finfo(torch.float16).max


def test_xpos_offset_and_checks():
    q, k = randn(2, 30, 2, 8), randn(2, 30, 2, 8, seed=1)
    xpos = XPos(8, scale_base=16.0, block_length=32)
    full = xpos(q, k, offset=FAR)
    part = xpos(q[:, 10:], k[:, 10:], offset=FAR + 10)
    torch.testing.assert_close(part[0], full[0][:, 10:], rtol=0, atol=0)
    torch.testing.assert_close(part[1], full[1][:, 10:], rtol=0, atol=0)
    for kwargs, field in [
        (dict(head_dim=7), "head_dim"),
        (dict(head_dim=8, scale_base=0.0), "scale_base"),
        (dict(head_dim=8, block_length=0), "block_length"),
    ]:
        with pytest.raises(ValueError, match=field):
            XPos(**kwargs)


# -------------------------------------------------------------------------- relative bias


def slow_bucket(rel, bidirectional, num_buckets, max_distance):
    """T5's bucketing, one Python int at a time."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = num_buckets if rel > 0 else 0
        distance = abs(rel)
    else:
        distance = max(-rel, 0)
    exact = num_buckets // 2
    if distance < exact:
        return offset + distance
    large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return offset + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20), (64, 1000)])
def test_bucket_matches_slow_twin(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-1500, 1500)
    got = relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    expected = [slow_bucket(r, bidirectional, num_buckets, max_distance) for r in rel.tolist()]
    assert got.tolist() == expected
    assert got.dtype == torch.int64 and int(got.min()) == 0 and int(got.max()) == num_buckets - 1


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_bias_values_and_gradient(bidirectional):
    module = RelativePositionBias(4, num_buckets=16, max_distance=40, bidirectional=bidirectional)
    query_positions, key_positions = torch.arange(5, 25), torch.arange(0, 35, 2)
    bias = module(query_positions, key_positions)
    assert bias.shape == (4, 20, 18) and bias.dtype == module.weight.dtype
    bucket = relative_position_bucket(
        key_positions[None, :] - query_positions[:, None],
        bidirectional=bidirectional,
        num_buckets=16,
        max_distance=40,
    )
    torch.testing.assert_close(bias, module.weight[bucket].permute(2, 0, 1), rtol=0, atol=0)
    bias.sum().backward()
    counts = torch.bincount(bucket.flatten(), minlength=16).to(module.weight.dtype)
    torch.testing.assert_close(module.weight.grad, counts[:, None].expand(16, 4), rtol=0, atol=0)
    assert 0 < int((counts > 0).sum()) < 16  # some buckets used, some not: the check is selective


def test_relative_bias_dtype_and_reset():
    module = RelativePositionBias(2, dtype=torch.bfloat16)
    assert module.weight.shape == (32, 2) and module(torch.arange(3), torch.arange(4)).dtype == torch.bfloat16
    module.weight.data.zero_()
    module.reset_parameters()
    assert module.weight.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(num_heads=0), "num_heads"),
        (dict(num_heads=2, num_buckets=7), "num_buckets"),
        (dict(num_heads=2, num_buckets=2), "num_buckets"),
        (dict(num_heads=2, num_buckets=1, bidirectional=False), "num_buckets"),
        (dict(num_heads=2, num_buckets=32, max_distance=8), "max_distance"),
    ],
)
def test_relative_bias_bad_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RelativePositionBias(**kwargs)
