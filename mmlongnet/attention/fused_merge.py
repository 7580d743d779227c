"""One-pass merge kernels (Triton, CUDA) behind `mmlongnet.attention.merge`, which holds their twins.

Legend: D head dim; a row is the last dim of a (..., D) tensor, "..." any strided leading dims.

The dilated-attention op merges each kernel call's result into the op's output and gradients
through strided views (a call selects every R-th row of some heads of some segments). In plain
PyTorch a weighted merge is three passes (weight = exp(lse_part - lse), then `addcmul_`) and runs
PyTorch's generic strided elementwise kernels, with a cast per element; on an H200 those took
~30% of the op's GPU time at 64K-128K tokens. Here one kernel reads each row of the part (and of
the target where it adds) once, computes the weight from the two log-sum-exps, and writes the
target once, in float32 and rounded once, as the twin does:

    target = [target +] part * exp(lse_part - lse)      (weighted)
    target = [target +] part                            (unweighted: gradients, up to 3 at a time)

`merge_rows` returns False where it cannot run (no Triton, not CUDA, a row not contiguous, more
leading dims than the kernel takes after merging them): the caller then runs the twin.

Compiling a kernel inside a CUDA-graph recording would load it there, which CUDA may refuse; so the
kernel specialises on no size or stride (one compiled variant per dtypes, flags and alignment,
`_variant`), `merge_rows(..., variants="compiled")` (while recording) declines a variant not yet
compiled, and `variants="new"` (eager calls that would rather run the twin) runs only a variant
that is new, which compiles it for the recordings to come.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with PyTorch's CUDA wheels; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Triton's interpreter (TRITON_INTERPRET=1 before the import) runs the kernels on CPU tensors,
# slowly: how the CPU tests check them against their twins.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LEADING_DIMS = 4  # leading dims the kernel indexes (after merging those that are one run in memory)
BLOCK_ELEMENTS = 4096  # elements one program handles (BLOCK_R rows x BLOCK_D)
_compiled: set[tuple] = set()  # the variants (`_variant`) launched so far in this process


def _coalesced(tensors: list[torch.Tensor]) -> tuple[list[int], list[list[int]]] | None:
    """The leading dims of same-shaped (..., D) tensors as few dims as possible: sizes and each
    tensor's strides, with size-1 dims dropped and neighbours merged where every tensor holds them
    as one run; padded in front to LEADING_DIMS. None where more remain."""
    shape = list(tensors[0].shape[:-1])
    strides = [list(t.stride()[:-1]) for t in tensors]
    keep = [i for i, size in enumerate(shape) if size != 1]
    sizes, merged = [], [[] for _ in tensors]
    for i in keep:
        if sizes and all(s[-1] == st[i] * shape[i] for s, st in zip(merged, strides, strict=True)):
            sizes[-1] *= shape[i]
            for s, st in zip(merged, strides, strict=True):
                s[-1] = st[i]
            continue
        sizes.append(shape[i])
        for s, st in zip(merged, strides, strict=True):
            s.append(st[i])
    if len(sizes) > LEADING_DIMS:
        return None
    pad = LEADING_DIMS - len(sizes)
    return [1] * pad + sizes, [[0] * pad + s for s in merged]


def _variant(pointers: list[torch.Tensor], flags: tuple) -> tuple:
    """What the kernel compiles one variant for: its pointers' dtypes and 16-byte alignment (Triton
    specialises on those), its constant flags and the device; sizes and strides are plain arguments."""
    return tuple((t.dtype, t.data_ptr() % 16 == 0) for t in pointers), flags, pointers[0].device.index


if triton is not None:

    @triton.jit
    def _merge_one(out, src, out_at, src_at, mask, weight, WEIGHTED: tl.constexpr, ACCUMULATE: tl.constexpr):
        value = tl.load(src + src_at, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            value = value * weight
        if ACCUMULATE:
            value += tl.load(out + out_at, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + out_at, value.to(out.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["rows", "head_dim", *(f"{k}{i}" for k in "nosab" for i in range(4))])
    def _merge_rows_kernel(
        out0, out1, out2, src0, src1, src2, lse_part, lse,
        rows, head_dim,
        n0, n1, n2, n3,  # leading sizes
        o0, o1, o2, o3,  # strides of the targets (all alike)
        s0, s1, s2, s3,  # strides of the parts (all alike)
        a0, a1, a2, a3,  # strides of lse_part
        b0, b1, b2, b3,  # strides of lse
        PAIRS: tl.constexpr, WEIGHTED: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr, EVEN_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        in_rows = row < rows
        i3 = row % n3
        rest = row // n3
        i2 = rest % n2
        rest = rest // n2
        i1 = rest % n1
        i0 = rest // n1
        col = tl.arange(0, BLOCK_D)
        if EVEN_D:  # D == BLOCK_D: a mask constant along each row, which keeps the loads vectorised
            mask = in_rows[:, None] & (col < BLOCK_D)[None, :]  # (BLOCK_R, BLOCK_D)
        else:
            mask = in_rows[:, None] & (col < head_dim)[None, :]
        out_row = tl.multiple_of(i0 * o0 + i1 * o1 + i2 * o2 + i3 * o3, ALIGN)  # row starts: vector loads
        src_row = tl.multiple_of(i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3, ALIGN)
        out_at = out_row[:, None] + col[None, :]
        src_at = src_row[:, None] + col[None, :]
        if WEIGHTED:
            part_lse = tl.load(lse_part + i0 * a0 + i1 * a1 + i2 * a2 + i3 * a3, mask=in_rows, other=0.0)
            merged_lse = tl.load(lse + i0 * b0 + i1 * b1 + i2 * b2 + i3 * b3, mask=in_rows, other=0.0)
            weight = tl.exp(part_lse.to(tl.float32) - merged_lse.to(tl.float32))[:, None]
        else:
            weight = 1.0
        _merge_one(out0, src0, out_at, src_at, mask, weight, WEIGHTED, ACCUMULATE)
        if PAIRS > 1:
            _merge_one(out1, src1, out_at, src_at, mask, weight, WEIGHTED, ACCUMULATE)
        if PAIRS > 2:
            _merge_one(out2, src2, out_at, src_at, mask, weight, WEIGHTED, ACCUMULATE)


def merge_rows(
    outs: list[torch.Tensor],
    srcs: list[torch.Tensor],
    lse_part: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    accumulate: bool,
    variants: str = "any",
) -> bool:
    """outs[i] = [outs[i] +] srcs[i] (* exp(lse_part - lse)) in one kernel, in place; False (and
    nothing done) where the kernel cannot take the tensors.

    Args:
        outs: 1-3 targets (..., D), the same shape and strides; a target may be its own src.
        srcs: as many parts (..., D), the targets' shape, the same strides among them.
        lse_part, lse: (...) float log-sum-exps of the part and of the merge (weighted merges), or
            None (unweighted).
        accumulate: add to the targets; else overwrite them.
        variants: which variants of the kernel run: "any" (compiled on first use), "compiled" (only
            those compiled before: while a CUDA graph records), "new" (only one not compiled yet,
            which this call compiles).
    """
    first = outs[0]
    if (
        triton is None
        or first.device.type != ("cpu" if INTERPRETED else "cuda")
        or first.numel() == 0
        or len(outs) != len(srcs)
        or not 1 <= len(outs) <= 3
        or any(t.stride(-1) != 1 or t.shape != first.shape or t.device != first.device for t in outs + srcs)
        or any(t.stride() != first.stride() or t.dtype != first.dtype for t in outs)
        or any(t.stride() != srcs[0].stride() for t in srcs)
    ):
        return False
    weighted = lse_part is not None
    lses = [lse_part, lse] if weighted else []
    if any(t.shape != first.shape[:-1] or t.device != first.device for t in lses):
        return False
    layout = _coalesced([first, srcs[0], *(t[..., None] for t in lses)])
    if layout is None:
        return False
    sizes, strides = layout
    if not weighted:
        strides += [[0] * LEADING_DIMS] * 2
    head_dim = first.shape[-1]
    rows = first.numel() // head_dim
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, BLOCK_ELEMENTS // block_d)
    pad = [outs[0]] * (3 - len(outs)), [srcs[0]] * (3 - len(srcs))
    pointers = [*outs, *pad[0], *srcs, *pad[1], *(lses or [first, first])]
    # rows start at multiples of `align` elements (16 bytes) where every row stride of the targets
    # and parts is one
    align = max(1, 16 // first.element_size())
    align = align if all(s % align == 0 for s in strides[0] + strides[1]) else 1
    variant = _variant(pointers, (len(outs), weighted, accumulate, block_d, align, block_d == head_dim))
    if (variants == "compiled" and variant not in _compiled) or (variants == "new" and variant in _compiled):
        return False
    _compiled.add(variant)
    _merge_rows_kernel[(triton.cdiv(rows, block_r),)](
        *pointers, rows, head_dim, *sizes, *(s for layout_strides in strides for s in layout_strides),
        PAIRS=len(outs), WEIGHTED=weighted, ACCUMULATE=accumulate, BLOCK_R=block_r, BLOCK_D=block_d,
        ALIGN=align, EVEN_D=block_d == head_dim,
    )  # fmt: skip
    return True
