"""Where each branch of dilated attention reads and writes: segments, offsets, strided views.

Legend: B batch, N tokens, H heads, D head dim, W segment length, R dilation rate,
S segments in a block, L rows of one segment of the block, C rows one offset selects in one
segment, Ho heads sharing one offset, O offsets of a block, G = ceil(H / R).

Branch i (segment length W, dilation R) cuts [0, N) into segments [s*W, (s+1)*W) clipped to N.
Head h uses offset o = h mod R: in every segment it selects the rows t (index within the
segment) with t mod R == o, for queries and keys alike. All heads with the same offset select
the same rows, so one dense kernel call covers one (block of equal segments, offset) pair: a
zero-copy strided view `(B, S, C, Ho, D)` of the `(B, N, H, D)` input (`BranchCall`).

A branch of rate R >= 2 over H heads is R such calls, of ceil(H/R) heads each. Where that is
many small calls (R near or above H), its offsets go into the kernel's head dimension instead: call
head e of a "diagonal" call reads row offset o0 + e and head h0 + e, which is again one strided view
(the head stride is one row plus one head), so that one call covers up to R offsets with no copy,
ceil(H/R) calls in all (twice that where W % R splits the offsets by row count). Its keys differ per
head, and so does its key padding mask, (b, c, h).

Short inputs are bound by the host's kernel-launch overhead rather than by the GPU; there all
offsets of a block go into ONE call (`PackedBlock`): the rows are gathered into a copy
`(B*S*O, C, G, D)`, padded where L or H is not a multiple of R; padded rows are masked as keys,
and padded rows and heads are discarded.

Both kinds of call offer the op the same four methods: `kernel_rows` (the kernel's input, batch
first), `key_padding` (its key mask), `target` (the view of a (B, N, H, ...) tensor its results
merge into) and `place` (a kernel output laid out like `target`). Where the layout allows (every
`BranchCall`, a `PackedBlock` without padding), `target` is exactly the call's rows and heads and
`place` a view, so that a result merges into its target in one elementwise pass, with no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_MIN_OFFSETS = 3  # pack a block only when that saves at least two kernel calls


@dataclass(frozen=True)
class BranchCall:
    """One dense attention call of a branch: `num_segments` equal segments, one strided view.

    Kernel head e of the call reads rows `start + s*segment_stride + j*dilation + offset (+ e if
    diagonal)` for s < num_segments, j < rows, and head `offset + e*dilation` (per offset) or
    `first_head + e` (diagonal), for e < heads.
    """

    start: int
    num_segments: int
    segment_stride: int
    dilation: int
    offset: int
    rows: int
    heads: int
    diagonal: bool = False
    first_head: int = -1  # the diagonal call's head of e = 0; per offset it is `offset`

    def kernel_rows(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, N, H, *rest) -> (B*S, C, Ho, *rest), a view (`fill` is not needed)."""
        return branch_view(x, self, batch_first=True)

    def key_padding(self, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool padding mask -> (B*S, C), or per kernel head (B*S, C, Ho) for a diagonal call
        (its heads read different rows); None without a mask. `like`: the (B, N, H, ...) input."""
        if mask is None:
            return None
        if self.diagonal:
            per_head = mask[:, :, None].expand(*like.shape[:3])  # (B, N, H), stride 0 over heads
            return branch_view(per_head, self, batch_first=True)
        return branch_view(mask, self, has_heads=False, batch_first=True)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, *rest) -> (B, S, C, Ho, *rest), a view sharing x's storage."""
        return branch_view(x, self)

    def place(self, y: torch.Tensor, fill: float) -> torch.Tensor:
        """A kernel output (B*S, C, Ho, *rest) -> (B, S, C, Ho, *rest), shaped like `target`."""
        return y.reshape(-1, self.num_segments, *y.shape[1:])


@dataclass(frozen=True)
class PackedBlock:
    """All `offsets` head offsets of a block of `num_segments` equal segments in one call.

    The segments start at `start + s*segment_stride` and hold `length` rows each; offset o
    selects rows o, o + dilation, ... and heads o, o + dilation, ... (of `num_heads`).
    """

    start: int
    num_segments: int
    segment_stride: int
    length: int
    dilation: int
    offsets: int
    num_heads: int

    @property
    def padded_shape(self) -> tuple[int, int]:
        """(C * R, G * R): the block's rows and heads rounded up to multiples of R."""
        r = self.dilation
        return -(-self.length // r) * r, -(-self.num_heads // r) * r

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *rest) -> (B, S, L, *rest), a view."""
        if self.num_segments == 1:  # also the shorter last segment, which may end before start + W
            return x.narrow(1, self.start, self.length).unsqueeze(1)
        rows = x.narrow(1, self.start, self.num_segments * self.segment_stride)
        return rows.unflatten(1, (self.num_segments, self.segment_stride))  # length == W here

    def _offsets_view(self, padded: torch.Tensor, has_heads: bool) -> torch.Tensor:
        """A padded (B, S, C*R, G*R, *rest) or (B, S, C*R) tensor -> (B, S, O, C, G, *rest) or
        (B, S, O, C): the rows and heads of each offset, a view."""
        r, batch, segments = self.dilation, padded.shape[0], padded.shape[1]
        rows, heads = self.padded_shape
        if not has_heads:
            view = padded.view(batch, segments, rows // r, r)  # (B, S, C, R)
            return view.movedim(3, 2)[:, :, : self.offsets]  # (B, S, O, C)
        rest = padded.shape[4:]
        view = padded.view(batch, segments, rows // r, r, heads // r, r, *rest)  # (B, S, C, R, G, R, ..)
        diagonal = view.diagonal(dim1=3, dim2=5)  # (B, S, C, G, *rest, R): row offset == head offset
        return diagonal.movedim(-1, 2)[:, :, : self.offsets]  # (B, S, O, C, G, *rest)

    def _padded(self, x: torch.Tensor, fill: float | bool, has_heads: bool) -> torch.Tensor:
        block = self._block(x)  # (B, S, L, H, *rest) or (B, S, L)
        rows, heads = self.padded_shape
        shape = (*block.shape[:2], rows, heads, *block.shape[4:]) if has_heads else (*block.shape[:2], rows)
        if tuple(block.shape) == shape:
            return block
        padded = block.new_full(shape, fill)
        if has_heads:
            padded[:, :, : self.length, : self.num_heads] = block
        else:
            padded[:, :, : self.length] = block
        return padded

    def kernel_rows(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, N, H, *rest) -> (B*S*O, C, G, *rest), a copy; padding rows/heads hold `fill`."""
        view = self._offsets_view(self._padded(x, fill, True), True)  # (B, S, O, C, G, *rest)
        return view.flatten(0, 2)

    def key_padding(self, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool padding mask (or None) -> (B*S*O, C), with the padding rows marked; None
        when there is neither a mask nor a padding row. `like`: the (B, N, ...) input."""
        if mask is None:
            if self.length % self.dilation == 0:
                return None
            mask = torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
        view = self._offsets_view(self._padded(mask, True, False), False)  # (B, S, O, C)
        return view.flatten(0, 2)

    @property
    def is_padded(self) -> bool:
        """Whether the block's rows or heads are not a multiple of R (its kernel rows are padded)."""
        return _pads(self.length, self.num_heads, self.dilation)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, *rest) -> a view sharing x's storage, laid out like `place`'s result:
        (B, S, O, C, G, *rest), the rows and heads of each offset, when the block is not padded;
        else (B, S, L, H, *rest), the whole block."""
        block = self._block(x)  # (B, S, L, H, *rest)
        return block if self.is_padded else self._offsets_view(block, True)

    def place(self, y: torch.Tensor, fill: float) -> torch.Tensor:
        """A kernel output (B*S*O, C, G, *rest) laid out like `target`: (B, S, O, C, G, *rest), a
        view, when the block is not padded; else (B, S, L, H, *rest), a copy whose entries that no
        offset selected hold `fill`."""
        batch = y.shape[0] // (self.num_segments * self.offsets)
        offsets = y.unflatten(0, (batch, self.num_segments, self.offsets))  # (B, S, O, C, G, *rest)
        if not self.is_padded:
            return offsets
        rows, heads = self.padded_shape
        padded = y.new_full((batch, self.num_segments, rows, heads, *y.shape[3:]), fill)
        self._offsets_view(padded, True).copy_(offsets)
        return padded[:, :, : self.length, : self.num_heads]


def _diagonal_calls(
    start: int, num_segments: int, segment_length: int, length: int, num_heads: int, dilation_rate: int
) -> list[BranchCall]:
    """A block's offsets as diagonal calls: per group of R heads, the offsets whose rows count
    alike (offsets below length % R select one row more than the others)."""
    r, calls = dilation_rate, []
    longer = length % r  # offsets [0, longer) select ceil(length / r) rows, the others floor
    for first_head in range(0, num_heads, r):
        used = min(r, num_heads - first_head, length)  # offsets of this group that select a row
        for low, high in ((0, min(longer, used)), (longer, used)) if longer else ((0, used),):
            if low < high:
                calls.append(BranchCall(
                    start=start, num_segments=num_segments, segment_stride=segment_length,
                    dilation=r, offset=low, rows=-(-(length - low) // r), heads=high - low,
                    diagonal=True, first_head=first_head + low,
                ))  # fmt: skip
    return calls


DIAGONAL_OVER_PACKED = 2  # where a block may be packed, go diagonal only in this many calls or fewer


def _pads(length: int, num_heads: int, dilation_rate: int) -> bool:
    """Whether a `PackedBlock` of segments of `length` rows over `num_heads` heads is padded."""
    return length % dilation_rate != 0 or num_heads % dilation_rate != 0


def branch_calls(
    seq_len: int,
    num_heads: int,
    segment_length: int,
    dilation_rate: int,
    *,
    pack: bool = False,
    diagonal: bool = False,
) -> list[BranchCall | PackedBlock]:
    """The kernel calls that make up one branch over a sequence of `seq_len` tokens.

    Full segments form one block; a shorter last segment (`seq_len % segment_length`) forms a
    second block of one segment. Offsets that no head uses, or that select no row, are skipped.
    Each block is, in this order of preference: diagonal calls (with `diagonal`, where they are
    fewer than the per-offset calls, and with `pack` at most `DIAGONAL_OVER_PACKED` of them where
    the block is packable), one `PackedBlock` (with `pack`, a block of at least `PACK_MIN_OFFSETS`
    offsets; with `diagonal` too, only one that needs no padding), or one call per offset.

    A padded `PackedBlock` (rows or heads not a multiple of R) gathers, places and merges the
    whole block, every row and head, for the 1/R of them its offsets select. Counted by
    `benchmarks/op_passes.py` (operations; elements written over the input's size), the LM schedule
    at 8K tokens, H = 12, causal: forward 55 and 12.2x with padded blocks packed, 50 and 4.1x
    without; backward 70 and 30.1x, 68 and 14.0x.
    """
    full = seq_len // segment_length
    blocks = []
    if full:
        blocks.append((0, full, segment_length))
    if seq_len - full * segment_length:
        blocks.append((full * segment_length, 1, seq_len - full * segment_length))
    calls: list[BranchCall | PackedBlock] = []
    for start, num_segments, length in blocks:
        offsets = min(dilation_rate, num_heads, length)
        # with diagonal calls, a block is packed only where that needs no padding
        packable = (
            pack
            and offsets >= PACK_MIN_OFFSETS
            and not (diagonal and _pads(length, num_heads, dilation_rate))
        )
        if diagonal:
            diagonals = _diagonal_calls(start, num_segments, segment_length, length, num_heads, dilation_rate)
            if len(diagonals) < offsets and not (packable and len(diagonals) > DIAGONAL_OVER_PACKED):
                calls.extend(diagonals)
                continue
        if packable:
            calls.append(
                PackedBlock(start, num_segments, segment_length, length, dilation_rate, offsets, num_heads)
            )
            continue
        for offset in range(offsets):
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


def branch_view(
    x: torch.Tensor, call: BranchCall, *, has_heads: bool = True, batch_first: bool = False
) -> torch.Tensor:
    """The rows (and heads) of `call` as a strided view of `x`, sharing its storage.

    x: (B, N, H, *rest) -> (B, S, C, Ho, *rest) when `has_heads`, else (B, N, *rest) -> (B, S, C, *rest)
    (the latter for per-token tensors such as the key padding mask, of per-offset calls).
    `batch_first`: B and S as one dim, (B*S, ...), as `flatten(0, 1)` gives it (a view in one step
    where B is 1 or the segments fill the batch stride, else a copy).
    """
    stride = x.stride()
    size = [x.shape[0], call.num_segments, call.rows]
    strides = [stride[0], call.segment_stride * stride[1], call.dilation * stride[1]]
    if batch_first and (size[0] == 1 or strides[0] == size[1] * strides[1]):
        size[:2], strides[:2] = [size[0] * size[1]], [strides[1]]
        batch_first = False  # merged here
    offset = x.storage_offset() + (call.start + call.offset) * stride[1]
    rest = 2
    if has_heads:
        size.append(call.heads)
        if call.diagonal:  # head e: one row and one head further per e
            strides.append(stride[1] + stride[2])
            offset += call.first_head * stride[2]
        else:
            strides.append(call.dilation * stride[2])
            offset += call.offset * stride[2]
        rest = 3
    size += x.shape[rest:]
    strides += stride[rest:]
    view = x.as_strided(size, strides, offset)
    return view.flatten(0, 1) if batch_first else view
