"""Where each branch of dilated attention reads and writes: segments, offsets, strided views.

Legend: B batch, N tokens, H heads, D head dim, W segment length, R dilation rate,
S segments in a block, C rows one offset selects in one segment, Ho heads sharing one offset.

Branch i (segment length W, dilation R) cuts [0, N) into segments [s*W, (s+1)*W) clipped to N.
Head h uses offset o = h mod R: in every segment it selects the rows t (index within the
segment) with t mod R == o, for queries and keys alike. All heads with the same offset select
the same rows, so one dense kernel call covers one (block of equal segments, offset) pair: a
zero-copy strided view `(B, S, C, Ho, D)` of the `(B, N, H, D)` input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BranchCall:
    """One dense attention call of a branch: `num_segments` equal segments, one head offset.

    The call reads rows `start + s*segment_stride + j*dilation + offset` for s < num_segments,
    j < rows, and heads `offset, offset + dilation, ...` below the head count.
    """

    start: int
    num_segments: int
    segment_stride: int
    dilation: int
    offset: int
    rows: int
    heads: int


def branch_calls(seq_len: int, num_heads: int, segment_length: int, dilation_rate: int) -> list[BranchCall]:
    """The kernel calls that make up one branch over a sequence of `seq_len` tokens.

    Full segments form one block; a shorter last segment (`seq_len % segment_length`) forms a
    second block of one segment. Offsets that no head uses, or that select no row, are skipped.
    """
    full = seq_len // segment_length
    blocks = []
    if full:
        blocks.append((0, full, segment_length))
    if seq_len - full * segment_length:
        blocks.append((full * segment_length, 1, seq_len - full * segment_length))
    calls = []
    for start, num_segments, length in blocks:
        for offset in range(min(dilation_rate, num_heads, length)):
            calls.append(
                BranchCall(
                    start=start,
                    num_segments=num_segments,
                    segment_stride=segment_length,
                    dilation=dilation_rate,
                    offset=offset,
                    rows=-(-(length - offset) // dilation_rate),
                    heads=-(-(num_heads - offset) // dilation_rate),
                )
            )
    return calls


def branch_view(x: torch.Tensor, call: BranchCall, *, has_heads: bool = True) -> torch.Tensor:
    """The rows (and heads) of `call` as a strided view of `x`, sharing its storage.

    x: (B, N, H, *rest) -> (B, S, C, Ho, *rest) when `has_heads`, else (B, N, *rest) -> (B, S, C, *rest)
    (the latter for per-token tensors such as the key padding mask).
    """
    stride = x.stride()
    size = [x.shape[0], call.num_segments, call.rows]
    strides = [stride[0], call.segment_stride * stride[1], call.dilation * stride[1]]
    offset = x.storage_offset() + (call.start + call.offset) * stride[1]
    rest = 2
    if has_heads:
        size.append(call.heads)
        strides.append(call.dilation * stride[2])
        offset += call.offset * stride[2]
        rest = 3
    size += x.shape[rest:]
    strides += stride[rest:]
    return x.as_strided(size, strides, offset)
