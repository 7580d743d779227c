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

The dilated-attention op (its branch calls), the decoding cache (its branches) and the sharded
op (its local and remote branches) merge with these functions; none reads a value on the host.
"""

from __future__ import annotations

import torch


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
