"""The one-pass merge kernels (`fused_merge`) against their PyTorch twins in `merge`: on a GPU, and
on the CPU in Triton's interpreter (a subprocess with TRITON_INTERPRET=1 runs this file's kernel
tests there)."""

import pytest
import torch

from mmlongnet.attention import dilated_attention, fused_merge, merge
from mmlongnet.attention.merge import add_parts, merge_weighted, part_weight
from tests.triton_kernels import kernel_device, kernel_test, run_interpreted

cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or fused_merge.triton is None, reason="needs a CUDA GPU and Triton"
)
DEVICE = kernel_device(fused_merge)  # where the kernels run in this process
kernels = kernel_test(fused_merge)


def test_leading_dims_merge_where_every_tensor_holds_them_as_one_run():
    base = torch.empty(2, 8, 6, 4, 5)  # (B, S, C, H, D)
    view = base[:, :, :2, 1:3]  # (2, 8, 2, 2, 5): the first two rows of each segment, two heads
    sizes, strides = fused_merge._coalesced([view, view.contiguous()])
    # B and S merge in both (one run of 16 segments); C and H do not in the view
    assert sizes == [1, 16, 2, 2]
    assert strides == [[0, 120, 20, 5], [0, 20, 10, 5]]
    # every R-th row of a segment: the segments and their rows are one run of rows
    assert fused_merge._coalesced([base[:, :, ::2, 1:3]]) == ([1, 1, 48, 2], [[0, 0, 40, 5]])
    # size-1 dims drop out; a contiguous tensor is one run
    assert fused_merge._coalesced([torch.empty(1, 7, 1, 3)]) == ([1, 1, 1, 7], [[0, 0, 0, 3]])
    # more leading dims than the kernel indexes: no layout (the caller runs the twin)
    scattered = torch.empty(2, 3, 4, 5, 6, 7)[:, ::2, ::2, ::2, ::2]
    assert fused_merge._coalesced([scattered]) is None


def test_the_kernels_decline_cpu_tensors_and_the_twins_compute_the_merge():
    torch.manual_seed(0)
    out, part = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 4, 8, dtype=torch.float64)
    lse_part, lse = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64) + 1
    assert not fused_merge.merge_rows([out], [part], lse_part, lse, accumulate=True)
    expected = out + part * torch.exp(lse_part - lse)[..., None]
    torch.testing.assert_close(
        merge_weighted(out.clone(), part, lse_part, lse), expected, rtol=1e-14, atol=1e-14
    )
    written = merge_weighted(torch.empty_like(out), part, lse_part, lse, first=True)
    torch.testing.assert_close(written, part * torch.exp(lse_part - lse)[..., None], rtol=1e-14, atol=1e-14)
    scaled = merge_weighted(out.clone(), None, lse_part, lse, first=True)
    torch.testing.assert_close(scaled, out * torch.exp(lse_part - lse)[..., None], rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="must be the first one"):
        merge_weighted(out, None, lse_part, lse)
    grads = [out.clone(), out.clone() * 2]
    add_parts(grads, [part, part * 3])
    torch.testing.assert_close(grads[0], out + part, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grads[1], out * 2 + part * 3, rtol=1e-14, atol=1e-14)


def _views(dtype, head_dim, device=DEVICE):
    """A target view as the op's calls address the output (every R-th row of some heads of each
    segment), parts laid out as a kernel writes them, and log-sum-exps, with keyless rows."""
    torch.manual_seed(1)
    batch, segments, rows, rate, heads = 2, 3, 40, 3, 6
    out = torch.randn(batch, segments * rows * rate, heads, head_dim, dtype=dtype, device=device)
    target = out.view(batch, segments, rows, rate, heads, head_dim)[:, :, :, 1, 2:5]  # (B, S, C, Ho, D)
    part = torch.randn(batch * segments, rows, 3, head_dim, dtype=dtype, device=device)
    part = part.view(batch, segments, rows, 3, head_dim)
    lse_part = torch.randn(batch, segments, rows, 3, device=device)
    lse_part[0, 0, :5] = float("-inf")  # rows the part gives no key
    lse = torch.logaddexp(lse_part, torch.randn_like(lse_part))
    lse[0, 0, :3] = float("inf")  # rows with no key at all (silenced): weight 0
    return out, target, part, lse_part, lse


def _both(monkeypatch, run):
    """run() with the kernels (at any size) and with the twins; the two results."""
    monkeypatch.setattr(merge, "FUSED_MIN_ELEMENTS", 0)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(merge, "FUSED_MERGE", fused)
        results.append(run())
    return results


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("mode", ["add", "first", "in place"])
def test_weighted_merge_kernel_matches_its_twin(monkeypatch, dtype, head_dim, mode):
    out, target, part, lse_part, lse = _views(dtype, head_dim)
    assert fused_merge.merge_rows([target.clone()], [part], lse_part, lse, accumulate=True)  # takes it

    def run():
        whole = out.clone()
        view = whole.view(out.shape[0], 3, 40, 3, 6, head_dim)[:, :, :, 1, 2:5]  # as `target`
        if mode == "in place":
            view.copy_(part)
        source = None if mode == "in place" else part
        merge_weighted(view, source, lse_part, lse, first=mode != "add")
        return whole

    fused, twin = _both(monkeypatch, run)
    # both compute in float32 and round once: at most one unit in the last place apart
    torch.testing.assert_close(fused.float(), twin.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
    untouched = torch.ones(out.shape[:3], dtype=torch.bool, device=DEVICE)
    untouched.view(out.shape[0], 3, 40, 3, 6)[:, :, :, 1, 2:5] = False
    assert torch.equal(fused[untouched], out[untouched])  # rows outside the view stay as they were
    assert not torch.equal(fused, out)


@kernels
@pytest.mark.parametrize("pairs", [1, 2, 3])
@pytest.mark.parametrize("first", [False, True])
def test_unweighted_merge_kernel_adds_up_to_three_gradients_as_the_twin(monkeypatch, pairs, first):
    grads = [_views(torch.bfloat16, 64)[0] * (i + 1) for i in range(pairs)]
    parts = [_views(torch.bfloat16, 64)[2] * (i + 2) for i in range(pairs)]

    def run():
        wholes = [g.clone() for g in grads]
        add_parts([w.view(2, 3, 40, 3, 6, 64)[:, :, :, 1, 2:5] for w in wholes], parts, first=first)
        return wholes

    views = [g.clone().view(2, 3, 40, 3, 6, 64)[:, :, :, 1, 2:5] for g in grads]
    assert fused_merge.merge_rows(views, parts, accumulate=True)  # the kernel takes the layout

    fused, twin = _both(monkeypatch, run)
    for a, b in zip(fused, twin, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-6)


@kernels
def test_a_weighted_merge_gives_rows_without_keys_weight_zero(monkeypatch):
    monkeypatch.setattr(merge, "FUSED_MIN_ELEMENTS", 0)
    out, target, part, lse_part, lse = _views(torch.float32, 64)
    before = target.clone()
    merge_weighted(target, part, lse_part, lse)
    expected = before + part * part_weight(lse_part, lse)[..., None]
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target[0, 0, :5], before[0, 0, :5], rtol=0, atol=0)  # weight exp(-inf) or 0


@kernels
def test_a_recording_runs_only_kernel_variants_compiled_before(monkeypatch):
    monkeypatch.setattr(fused_merge, "_compiled", set())
    out, target, part, lse_part, lse = _views(torch.bfloat16, 64)

    def merge(variants):
        return fused_merge.merge_rows([target], [part], lse_part, lse, accumulate=True, variants=variants)

    assert not merge("compiled")  # never compiled: declined (the twin runs)
    assert merge("new")  # compiles it
    assert not merge("new")  # compiled now: an eager call below the size threshold runs the twin
    assert merge("compiled") and merge("any")


@pytest.mark.cuda
@cuda
def test_the_op_recorded_in_a_cuda_graph_merges_with_the_kernels(monkeypatch):
    from mmlongnet.attention import dilated as dilated_module
    from mmlongnet.attention import dilated_attention

    monkeypatch.setattr(dilated_module, "DENSE_SMALL_INPUTS", False)
    seen = []
    real = fused_merge.merge_rows

    def counted(*args, **kwargs):
        ran = real(*args, **kwargs)
        seen.append((kwargs["variants"], ran))
        return ran

    monkeypatch.setattr(fused_merge, "merge_rows", counted)
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        q.grad = k.grad = v.grad = None
        out = dilated_attention(q, k, v, [64, 128], [1, 2], is_causal=True, backend="sdpa")
        out.backward(grad)
        return out, q.grad, k.grad, v.grad

    stream = torch.cuda.Stream()  # every step on a side stream, as a recording wants
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        eager = [t.clone() for t in step()]  # below the size threshold: the twins (new variants compile)
        step()
        seen.clear()
        with torch.cuda.graph(graph, stream=stream):
            recorded = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert seen and all(variants == "compiled" and ran for variants, ran in seen)
    for a, b in zip(recorded, eager, strict=True):  # one rounding each: a unit in the last place apart
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)


@kernels
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_the_op_merges_with_the_kernels_as_with_their_twins(monkeypatch, call_layout, is_causal, masked):
    """The whole op, float32, every merge through the kernels against every merge through the
    twins: the same outputs and gradients to float32's rounding."""
    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(2, 96, 6, 16, device=DEVICE) for _ in range(4))
    mask = torch.zeros(2, 96, dtype=torch.bool, device=DEVICE)
    mask[1, 70:] = True
    results = []
    for fused in (True, False):
        monkeypatch.setattr(merge, "FUSED_MERGE", fused)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = dilated_attention(
            *inputs, [16, 32, 96], [1, 2, 3], is_causal=is_causal, key_padding_mask=mask if masked else None,
            backend="sdpa",
        )  # fmt: skip
        results.append([out, *torch.autograd.grad(out, inputs, grad)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_kernels_match_their_twins_in_triton_s_interpreter():
    """This file's kernel tests, run on the CPU by Triton's interpreter in a subprocess."""
    selection = "merge_kernel or rows_without_keys or compiled_before or op_merges_with_the_kernels"
    run_interpreted(fused_merge, __file__, selection)
