"""Merge attention parts computed over disjoint sets of keys into one softmax, by their log-sum-exps.

Legend: B batch, N tokens, H heads, D head dim; `...` stands for any leading dims (B, N, H) or a
view of them, the same for every argument of one call.

A part i over its keys gives an output o_i (..., D), normalised by its own softmax denominator,
and its log-sum-exp l_i (...), the log of that denominator. The softmax over the union of the keys
has log-sum-exp l = log(sum_i exp(l_i)) and output o = sum_i o_i * exp(l_i - l) (LongNet,
Ding et al. 2023, arXiv 2307.02486, eq. 10). Merging runs in two passes: `merge_lse` folds every
l_i into l, then `merge_output` adds every o_i with its weight. A row no part gives a key keeps
l = -inf; `silence_keyless_rows` turns it into +inf, which gives it weight exp(l_i - inf) = 0 in the
forward and probability 0 in a backward that recomputes exp(score - l).

On CUDA, `merge_weighted` and `add_parts` run as one kernel per call (`fused_merge`, Triton) where
the GPU time counts (`FUSED_MIN_ELEMENTS`) and the tensors' layout allows; these functions'
PyTorch code is its twin (and runs everywhere else).

The dilated-attention op (its branch calls), the decoding cache (its branches) and the sharded
op (its local and remote branches) merge with these functions; none reads a value on the host.
"""

from __future__ import annotations

import os

import torch

# Merge through `fused_merge`'s kernels where they run (CUDA, Triton); False: PyTorch's passes only.
FUSED_MERGE = True
# A kernel launch from Python costs more host time than the PyTorch passes it replaces (H200,
# LM schedule, causal, H = 12: eager forward + backward 1.1-1.5x slower with the kernels from 8K
# to 128K tokens, where the eager op is bound by the host), while it takes 0.45x their GPU time
# (the op's other kernels 3.6 -> 1.4 ms at 128K). So the kernels run where the GPU time counts:
# while a CUDA graph records (graphed steps, compiled models; launches cost nothing at replay),
# and eagerly for targets of at least this many elements (smaller ones run a kernel variant's
# first call only, which compiles it outside the recordings).
FUSED_MIN_ELEMENTS = 1 << 26
# where the kernels run: CUDA tensors; CPU ones under Triton's interpreter (`fused_merge.INTERPRETED`)
_KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log-sum-exps and merge weights are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def silence_keyless_rows(lse: torch.Tensor) -> torch.Tensor:
    """lse (...) with -inf (a row with no key) turned into +inf, a new tensor.

    Used as the merged log-sum-exp, it gives such a row weight 0 in `merge_output` and probability
    exp(score - inf) = 0 in a backward.
    """
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def merge_lse(lse: torch.Tensor, lse_part: torch.Tensor, *, first: bool = False) -> torch.Tensor:
    """Fold one part's log-sum-exp into the merged one, in place, and return `lse`.

    Args:
        lse: (...) the merged log-sum-exp so far (a view may be passed), -inf where no part had a key.
        lse_part: (...) the part's log-sum-exp, -inf for a row without a key.
        first: `lse` holds nothing yet: copy `lse_part` into it.
    """
    if first:
        return lse.copy_(lse_part)
    return torch.logaddexp(lse, lse_part, out=lse)


def merge_output(
    out: torch.Tensor,
    out_part: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    *,
    first: bool = False,
) -> torch.Tensor:
    """out = out_part * weight (`first`) or out += out_part * weight, in one pass, in place.

    Args:
        out: (..., D) the merged output so far (a view may be passed).
        out_part: (..., D) the part's output; None when the part is already in `out` (written
            there by its kernel, `first` only): then out *= weight.
        weight: (...) the part's weight, `part_weight(lse_part, lse)`; None for 1 (gradients of
            parts over disjoint rows, which add without weights).
        first: `out` holds nothing yet: write instead of add.

    Returns:
        `out`.
    """
    if out_part is None:
        if not first:
            raise ValueError("merge_output: a part already in `out` must be the first one there")
        return out if weight is None else out.mul_(weight[..., None])
    if weight is None:
        return out.copy_(out_part) if first else out.add_(out_part)
    if first:
        return torch.mul(out_part, weight[..., None], out=out)
    return out.addcmul_(out_part, weight[..., None])


def part_weight(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(...) exp(lse_part - lse): a part's weight in the merged output.

    `lse` is the merged log-sum-exp of all parts, with `silence_keyless_rows` applied wherever a row
    may have no key (then such a row gets weight 0, not NaN).
    """
    return torch.exp(lse_part - lse)


def _fused(tensor: torch.Tensor):
    """(`mmlongnet.attention.fused_merge`, which of its kernel variants may run: see its
    `merge_rows`) for a merge into `tensor` on CUDA: the compiled ones while a CUDA graph records,
    any for FUSED_MIN_ELEMENTS and more, else a new one (compiled now, for the recordings to come).
    None elsewhere (CPU tensors run them only under Triton's interpreter, for the tests). Imported
    on first use: Triton loads only where a merge runs on a GPU."""
    if not FUSED_MERGE or tensor.device.type != _KERNEL_DEVICE:
        return None
    from mmlongnet.attention import fused_merge

    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return fused_merge, "compiled"
    return fused_merge, "any" if tensor.numel() >= FUSED_MIN_ELEMENTS else "new"


def merge_weighted(
    out: torch.Tensor,
    out_part: torch.Tensor | None,
    lse_part: torch.Tensor,
    lse: torch.Tensor,
    *,
    first: bool = False,
) -> torch.Tensor:
    """`merge_output` with the weight `part_weight(lse_part, lse)`: out = out_part * weight (`first`)
    or out += out_part * weight, in place; one kernel on CUDA.

    Args:
        out: (..., D) the merged output so far (a view may be passed).
        out_part: (..., D) the part's output; None when the part is already in `out` (`first` only).
        lse_part: (...) the part's log-sum-exp.
        lse: (...) the merged log-sum-exp (see `part_weight`).
        first: `out` holds nothing yet: write instead of add.

    Returns:
        `out`.
    """
    fused = _fused(out)
    if out_part is None and not first:
        raise ValueError("merge_weighted: a part already in `out` must be the first one there")
    source = out if out_part is None else out_part
    if fused is not None:
        kernels, variants = fused
        if kernels.merge_rows([out], [source], lse_part, lse, accumulate=not first, variants=variants):
            return out
    return merge_output(out, out_part, part_weight(lse_part, lse), first=first)


def add_parts(outs: list[torch.Tensor], parts: list[torch.Tensor], *, first: bool = False) -> None:
    """outs[i] = parts[i] (`first`) or outs[i] += parts[i], in place, for gradients of parts over
    disjoint rows (no weights); on CUDA one kernel for up to three pairs of one layout.

    Args:
        outs: (..., D) targets (views may be passed).
        parts: (..., D) as many parts, each its target's shape.
        first: the targets hold nothing yet: write instead of add.
    """
    fused = _fused(outs[0]) if outs else None
    if fused is not None:
        kernels, variants = fused
        if kernels.merge_rows(outs, parts, accumulate=not first, variants=variants):
            return
    for out, part in zip(outs, parts, strict=True):
        merge_output(out, part, first=first)
