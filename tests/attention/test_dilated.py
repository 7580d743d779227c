"""The fused dilated-attention op against the dense reference: values, gradients, semantics."""

import pytest
import torch
import torch.nn.functional as F
from devices import DEVICES

from mmlongnet.attention import DilatedAttention, dilated_attention, geometry
from mmlongnet.attention import dilated as dilated_module
from mmlongnet.attention.geometry import BranchCall, PackedBlock, branch_calls
from mmlongnet.attention.kernels import KernelSelector

# (N, segment_lengths, dilation_rates, H): N not a multiple of any segment, N shorter than every
# segment, H < r, H not a multiple of r, non-power-of-two segments and rates, w % r != 0,
# one branch and five branches.
GRID = [
    pytest.param(37, [8, 16], [1, 2], 4, id="N-not-multiple"),
    pytest.param(20, [32, 64], [1, 4], 4, id="N-shorter-than-all-segments"),
    pytest.param(45, [12, 24], [3, 6], 2, id="H-below-r"),
    pytest.param(61, [10, 20], [2, 4], 6, id="H-not-multiple-of-r"),
    pytest.param(50, [7, 15, 33], [1, 3, 5], 3, id="odd-segments-and-rates"),
    pytest.param(40, [16], [1], 2, id="single-branch"),
    pytest.param(130, [8, 16, 32, 64, 128], [1, 2, 4, 6, 12], 12, id="five-branches-lm-rates"),
]


def make_inputs(seq_len, num_heads, dtype, batch=2, head_dim=8, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, seq_len, num_heads, head_dim, generator=generator, dtype=dtype)
        .to(device)
        .requires_grad_()
        for _ in range(3)
    ]


def padding_mask(batch, seq_len, device="cpu"):
    """Sample 0 pads its tail, sample 1 pads a block at the start: some rows see no key."""
    mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    mask[0, seq_len * 2 // 3 :] = True
    mask[1, : seq_len // 3] = True
    return mask


def run(q, k, v, segs, rates, backend, grad, **kwargs):
    out = dilated_attention(q, k, v, segs, rates, backend=backend, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("seq_len", "segs", "rates", "num_heads"), GRID)
def test_sdpa_matches_reference(seq_len, segs, rates, num_heads, is_causal, masked, dtype, tol, call_layout):
    q, k, v = make_inputs(seq_len, num_heads, dtype)
    mask = padding_mask(2, seq_len) if masked else None
    grad = torch.randn(q.shape, dtype=dtype)
    kwargs = dict(is_causal=is_causal, key_padding_mask=mask)
    fast = run(q, k, v, segs, rates, "sdpa", grad, **kwargs)
    slow = run(q, k, v, segs, rates, "reference", grad, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, slow, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_packing_groups_the_offsets_of_a_block_into_one_call():
    calls = branch_calls(61, 6, 20, 4, pack=True)  # 3 full segments + a last one of 1 row
    assert [type(c) for c in calls] == [PackedBlock, BranchCall]
    assert all(type(c) is BranchCall for c in branch_calls(61, 6, 20, 2, pack=True))  # 2 offsets
    assert len(branch_calls(61, 6, 20, 4)) == 5  # 4 offsets of the full block, 1 of the short one


def test_a_block_that_packing_would_pad_runs_as_diagonal_calls():
    # 8192 % 6 = 2: rows not a multiple of the rate, so a packed block of rate 6 would be padded
    calls = branch_calls(8192, 12, 8192, 6, pack=True, diagonal=True)
    assert len(calls) == 4 and all(
        type(c) is BranchCall and c.diagonal for c in calls
    )  # 2 groups x 2 row counts
    assert type(branch_calls(8192, 12, 8192, 6, pack=True)[0]) is PackedBlock  # no diagonal calls: packed
    (packed,) = branch_calls(8192, 12, 8192, 4, pack=True, diagonal=True)  # unpadded, 3 diagonal calls
    assert type(packed) is PackedBlock and not packed.is_padded
    calls = branch_calls(60, 16, 20, 3, pack=True, diagonal=True)  # heads 16 % 3: padded, 3 offsets
    assert [type(c) for c in calls] == [BranchCall] * 3 and not any(c.diagonal for c in calls)


@pytest.mark.parametrize(("length", "heads", "rate"), [(12, 6, 3), (11, 7, 4), (9, 5, 6)])
def test_packed_rows_are_the_per_offset_rows_and_place_inverts_them(length, heads, rate):
    x = torch.randn(2, 2 * length, heads, 3)  # two segments of `length` rows
    (packed,) = branch_calls(2 * length, heads, length, rate, pack=True)
    rows = packed.kernel_rows(x, fill=float("nan")).unflatten(0, (2, 2, packed.offsets))  # (B, S, O, C, G, D)
    for call in branch_calls(2 * length, heads, length, rate):
        expected = call.target(x)  # (B, S, C_o, Ho, D)
        got = rows[:, :, call.offset, : call.rows, : call.heads]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert rows[:, :, call.offset, call.rows :].isnan().all()  # padding rows
        assert rows[:, :, call.offset, :, call.heads :].isnan().all()  # padding heads
    placed = torch.zeros_like(x)
    packed.target(placed).copy_(packed.place(rows.flatten(0, 2), fill=0.0))  # laid out alike
    assert packed.is_padded == (length % rate != 0 or heads % rate != 0)
    selected = torch.arange(length)[:, None] % rate == torch.arange(heads)[None, :] % rate  # (L, H)
    torch.testing.assert_close(placed, x * selected.repeat(2, 1)[..., None], rtol=0, atol=0)


def _selected(calls, seq_len, heads):
    """{(row, head): times selected} over the calls, with each kernel head's rows checked: one
    offset (row within its segment mod R == head mod R), consecutive rows R apart."""
    x = torch.arange(seq_len * heads).reshape(1, seq_len, heads, 1)  # x[0, t, h] = t * heads + h
    seen = {}
    for call in calls:
        view = call.target(x)[0, ..., 0]  # (S, C, Ho)
        rows, head = view // heads, view % heads
        starts = call.start + call.segment_stride * torch.arange(view.shape[0])[:, None, None]
        assert (((rows - starts) % call.dilation) == (head % call.dilation)).all()
        assert (head == head[:, :1, :]).all()  # a kernel head reads one head in every row
        assert (rows.diff(dim=1) == call.dilation).all()
        for row, h in zip(rows.flatten().tolist(), head.flatten().tolist(), strict=True):
            seen[row, h] = seen.get((row, h), 0) + 1
    return seen


@pytest.mark.parametrize(
    ("seq_len", "heads", "length", "rate"),
    [(64, 12, 32, 12), (70, 12, 32, 12), (61, 6, 20, 4), (45, 2, 12, 6), (50, 5, 7, 3), (40, 16, 40, 16)],
)
def test_diagonal_calls_select_each_offsets_rows_and_heads_once(seq_len, heads, length, rate):
    per_offset = branch_calls(seq_len, heads, length, rate)
    diagonal = branch_calls(seq_len, heads, length, rate, diagonal=True)
    assert any(c.diagonal for c in diagonal) == (len(diagonal) < len(per_offset))
    expected = _selected(per_offset, seq_len, heads)
    assert set(expected.values()) == {1}
    assert _selected(diagonal, seq_len, heads) == expected
    forced = geometry._diagonal_calls(0, seq_len // length, length, length, heads, rate)
    full = {key: n for key, n in expected.items() if key[0] < seq_len // length * length}
    assert _selected(forced, seq_len, heads) == full  # the full block's offsets, diagonal or not


def test_diagonal_calls_replace_many_offsets_and_mask_each_head_by_its_rows():
    calls = branch_calls(64, 12, 32, 12, diagonal=True)  # 32 % 12 = 8: offsets 0-7 and 8-11
    assert [(c.diagonal, c.offset, c.heads, c.rows) for c in calls] == [(True, 0, 8, 3), (True, 8, 4, 2)]
    assert len(branch_calls(64, 12, 32, 12)) == 12
    assert not any(c.diagonal for c in branch_calls(64, 16, 32, 4, diagonal=True))  # 4 groups, 4 offsets
    q = torch.zeros(2, 64, 12, 8)
    mask = torch.rand(2, 64) < 0.5
    rows = torch.arange(64).expand(2, 64)  # each key's position
    for call in calls:
        padding = call.key_padding(mask, q)  # (B*S, C, Ho): kernel head e's keys
        positions = call.kernel_rows(rows[:, :, None, None].expand(2, 64, 12, 1))[..., 0]  # (B*S, C, Ho)
        expected = torch.gather(mask, 1, positions.flatten(0, 1).reshape(2, -1)).reshape(positions.shape)
        assert torch.equal(padding, expected)


def test_rows_without_keys_output_zero_and_pass_no_gradient(call_layout):
    q, k, v = make_inputs(24, 2, torch.float64)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[0] = True  # every key of sample 0 is padding
    mask[1, :8] = True  # causal rows 0..7 of sample 1 see only padding
    out = dilated_attention(q, k, v, [8, 24], [1, 2], is_causal=True, key_padding_mask=mask, backend="sdpa")
    assert out[0].abs().max().item() == 0.0
    assert out[1, :8].abs().max().item() == 0.0
    assert out[1, 8:].abs().min().item() > 0.0
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert dq[0].abs().max().item() == 0.0 and dk[0].abs().max().item() == 0.0
    assert dk[1, :8].abs().max().item() == 0.0  # padding keys receive no gradient


def test_padding_keys_receive_no_weight(call_layout):
    q, k, v = make_inputs(30, 3, torch.float64)
    mask = padding_mask(2, 30)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], key_padding_mask=mask, backend="sdpa")
    v2 = v.detach().clone()
    v2[mask] = 1e6  # change what padding keys hold
    k2 = k.detach().clone()
    k2[mask] = -3.0
    out2 = dilated_attention(q, k2, v2, [8, 16], [1, 2], key_padding_mask=mask, backend="sdpa")
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_causal_future_perturbation_leaves_past_bit_identical(backend, call_layout):
    q, k, v = (t.detach() for t in make_inputs(70, 4, torch.float32))
    t = 41
    out = dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], is_causal=True, backend=backend)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, t:] = torch.randn_like(x[:, t:]) * 5
    out2 = dilated_attention(q2, k2, v2, [8, 16, 32], [1, 2, 4], is_causal=True, backend=backend)
    assert torch.equal(out[:, :t], out2[:, :t])
    assert not torch.equal(out[:, t:], out2[:, t:])


@pytest.mark.parametrize("is_causal", [False, True])
def test_one_segment_of_full_length_is_sdpa(is_causal):
    q, k, v = make_inputs(33, 4, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64)
    ours = run(q, k, v, [33], [1], "sdpa", grad, is_causal=is_causal)
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal)
    out = out.transpose(1, 2)
    theirs = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64(call_layout):
    q, k, v = make_inputs(11, 3, torch.float64, batch=1, head_dim=4)
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[0, 9:] = True

    def fn(q, k, v):
        return dilated_attention(
            q, k, v, [4, 8], [1, 2], is_causal=True, key_padding_mask=mask, backend="sdpa"
        )

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_mixing_weights_carry_gradient(call_layout):
    """Detaching the mixture weights (as public implementations do) changes dq noticeably."""
    q, k, v = make_inputs(32, 2, torch.float64)
    segs, rates = [8, 32], [1, 4]
    dq = torch.autograd.grad(dilated_attention(q, k, v, segs, rates, backend="sdpa").square().sum(), q)[0]
    dq_ref = torch.autograd.grad(
        dilated_attention(q, k, v, segs, rates, backend="reference").square().sum(), q
    )[0]
    torch.testing.assert_close(dq, dq_ref, rtol=1e-9, atol=1e-9)


def test_module_dropout_only_in_training():
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in make_inputs(24, 2, torch.float64))
    module = DilatedAttention([8, 16], [1, 2], attention_dropout=0.5)
    plain = dilated_attention(q, k, v, [8, 16], [1, 2], backend="sdpa")
    module.eval()
    torch.testing.assert_close(module(q, k, v), plain, rtol=1e-12, atol=1e-12)
    module.train()
    with pytest.warns(UserWarning, match="dropout"):
        dropped = module(q, k, v)
    assert (dropped - plain).abs().max() > 1e-3


def test_torch_compile_of_a_module_using_the_op(call_layout):
    module = DilatedAttention([8, 16], [1, 2], backend="sdpa")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    q, k, v = make_inputs(40, 2, torch.float32)
    out = compiled(q, k, v, is_causal=True)
    out.sum().backward()
    dq = q.grad.clone()
    q.grad = None
    eager = module(q, k, v, is_causal=True)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(dq, q.grad)


def count_attention_calls(fn) -> int:
    """How many fused attention ops (forward or backward) run in fn()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += "scaled_dot_product" in str(func)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_small_inputs_run_as_one_dense_call():
    """The bundled AV model's fusion schedule at 16 digits (~300 tokens): one kernel call forward,
    one backward, instead of a call per branch block and offset."""
    segs, rates = [256, 1024, 4096, 16384], [1, 2, 4, 8]
    q, k, v = make_inputs(300, 8, torch.float32, batch=4)
    mask = padding_mask(4, 300)
    assert dilated_module.runs_dense(q, segs, rates)
    out = dilated_attention(q, k, v, segs, rates, key_padding_mask=mask, backend="sdpa")
    assert count_attention_calls(lambda: out.sum().backward()) == 1
    forward = count_attention_calls(
        lambda: dilated_attention(q, k, v, segs, rates, key_padding_mask=mask, backend="sdpa")
    )
    assert forward == 1
    selector = KernelSelector()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dilated_module, "DENSE_SMALL_INPUTS", False)
        patch.setattr(dilated_module, "SELECTOR", selector)
        dilated_attention(q, k, v, segs, rates, backend="sdpa")
    assert sum(selector.calls.values()) >= len(segs)  # at least one kernel call per branch


@pytest.mark.parametrize(
    ("shape", "segs", "rates", "dense"),
    [
        ((64, 300, 8, 32), [256, 1024, 4096, 16384], [1, 2, 4, 8], True),  # AV fusion, 16 digits
        ((8, 4600, 8, 32), [256, 1024, 4096, 16384], [1, 2, 4, 8], False),  # 256 digits: scores too many
        ((1, 8192, 12, 64), [2048, 4096, 8192], [1, 2, 4], False),  # LM at 8K
        ((2, 37, 4, 8), [8, 16], [1, 2], False),  # N far beyond the segments: dense is 2.3x the work
        ((2, 32, 4, 8), [8, 16], [1, 2], True),
    ],
)
def test_dense_calls_take_small_inputs_whose_keys_cover_half_the_sequence(shape, segs, rates, dense):
    assert dilated_module.runs_dense(torch.empty(shape, device="meta"), segs, rates) is dense


def test_a_dense_bias_built_under_inference_mode_serves_training():
    q, k, v = make_inputs(24, 2, torch.float64)
    with torch.inference_mode():
        dilated_attention(q.detach(), k.detach(), v.detach(), [8, 24], [1, 2], backend="sdpa")
    out = dilated_attention(q, k, v, [8, 24], [1, 2], backend="sdpa")  # the same schedule, cached
    dq = torch.autograd.grad(out.sum(), q)[0]
    dq_ref = torch.autograd.grad(dilated_attention(q, k, v, [8, 24], [1, 2], backend="reference").sum(), q)[0]
    torch.testing.assert_close(dq, dq_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_a_dense_call_under_autocast_runs_in_the_inputs_dtype(device, masked):
    """Autocast computes log in float32 and casts attention inputs: neither may reach the kernel."""
    q, k, v = (
        t.detach().to(device, torch.bfloat16).requires_grad_() for t in make_inputs(40, 4, torch.float32)
    )
    mask = padding_mask(2, 40, device) if masked else None
    with torch.autocast(device, torch.bfloat16):
        out = dilated_attention(q, k, v, [16, 64], [1, 2], key_padding_mask=mask, backend="sdpa")
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    reference = dilated_attention(*(t.double() for t in (q, k, v)), [16, 64], [1, 2], key_padding_mask=mask)
    torch.testing.assert_close(out.double(), reference, rtol=0.05, atol=0.05)


def test_op_passes_torch_library_opcheck():
    q, k, v = (t.detach() for t in make_inputs(20, 2, torch.float32))
    args = (q, k, v, None, [8, 16], [1, 2], True, 0.35, "sdpa")
    torch.library.opcheck(torch.ops.mmlongnet.dilated_attention_forward.default, args)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(segment_lengths=[], dilation_rates=[]), ValueError, "non-empty"),
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), ValueError, "equal length"),
        (dict(segment_lengths=[8, 0], dilation_rates=[1, 1]), ValueError, "segment_lengths"),
        (dict(segment_lengths=[8], dilation_rates=[-2]), ValueError, "dilation_rates"),
        (dict(segment_lengths=[4], dilation_rates=[8]), ValueError, "exceed"),
        (dict(backend="triton"), ValueError, r"unknown backend 'triton'; choose one of \['auto'"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"\(B, N\)"),
        (dict(key_padding_mask=torch.zeros(2, 16)), TypeError, "bool"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
        (dict(dropout_p=0.1, backend="sdpa"), ValueError, "reference"),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs, error, match):
    q, k, v = (torch.randn(2, 16, 2, 4) for _ in range(3))
    call = dict(segment_lengths=[8], dilation_rates=[1]) | kwargs
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, **call)


def test_bad_tensors_name_what_is_wrong():
    q = torch.randn(2, 16, 2, 4)
    with pytest.raises(ValueError, match="same shape"):
        dilated_attention(q, q[:, :8], q, [8], [1])
    with pytest.raises(TypeError, match="same dtype"):
        dilated_attention(q, q.double(), q, [8], [1])
    with pytest.raises(ValueError, match=r"\(B, N, H, D\)"):
        dilated_attention(q[0], q[0], q[0], [8], [1])
    with pytest.raises(TypeError, match="floating point"):
        dilated_attention(*(torch.ones(2, 16, 2, 4, dtype=torch.long),) * 3, [8], [1])


def test_sdpa_rejects_dtypes_its_kernels_lack():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU dtype list")
    q = torch.randn(1, 16, 2, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError):
        dilated_attention(q, q, q, [8], [1], backend="sdpa")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["plan-free", "promoted"])
def kernel_choice(request, monkeypatch):
    """Run every shape on the plan-free kernels (as a new shape), or promoted from its first call
    (on cuDNN where the chain has it, as a shape that recurs)."""
    promote_after = 1 if request.param == "promoted" else 10**9
    monkeypatch.setattr(dilated_module, "SELECTOR", KernelSelector(promote_after=promote_after))
    return request.param


def assert_low_precision_close(seq_len, segs, rates, num_heads, backend, dtype, device, head_dim, **kwargs):
    """The backend's error vs the float64 reference <= 2x the low-precision reference's own error
    (+ rounding), for the output and the three gradients. Errors are relative Frobenius norms,
    ||x - truth|| / ||truth||."""
    exact = make_inputs(seq_len, num_heads, torch.float64, head_dim=head_dim, device=device)
    low = [t.detach().to(dtype).requires_grad_() for t in exact]
    grad = torch.randn(exact[0].shape, dtype=torch.float64, device=device)
    truth = run(*exact, segs, rates, "reference", grad, **kwargs)
    ref_low = run(*low, segs, rates, "reference", grad.to(dtype), **kwargs)
    fast = run(*low, segs, rates, backend, grad.to(dtype), **kwargs)
    for name, t, r, f in zip(("out", "dq", "dk", "dv"), truth, ref_low, fast, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        err = ((f.double() - t).norm() / t.norm()).item()
        ref_err = ((r.double() - t).norm() / t.norm()).item()
        assert err <= 2 * ref_err + 1e-4, (
            f"{name}: {backend} error {err:.3g}, {dtype} reference error {ref_err:.3g}"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("seq_len", "segs", "rates", "num_heads"), GRID[::2])
def test_cpu_16_bit_forward_and_backward(seq_len, segs, rates, num_heads, is_causal, masked, dtype):
    """bf16/fp16 on the CPU kernels (`precision: bf16-mixed` on a CPU): the backward takes the
    float32 log-sum-exp the forward gave."""
    mask = padding_mask(2, seq_len) if masked else None
    assert_low_precision_close(
        seq_len, segs, rates, num_heads, "sdpa", dtype, "cpu", 16, is_causal=is_causal, key_padding_mask=mask
    )


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("seq_len", "segs", "rates", "num_heads"), GRID)
def test_cuda_bf16_error_within_twice_reference_bf16_error(
    seq_len, segs, rates, num_heads, is_causal, masked, call_layout, kernel_choice
):
    seq_len, segs = seq_len * 8, [w * 8 for w in segs]  # kernel-sized problems
    mask = padding_mask(2, seq_len, device="cuda") if masked else None
    assert_low_precision_close(
        seq_len, segs, rates, num_heads, "sdpa", torch.bfloat16, "cuda", 64, is_causal=is_causal,
        key_padding_mask=mask,
    )  # fmt: skip
