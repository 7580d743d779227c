"""LongNet's distributed dilated attention (Ding et al. 2023, arXiv 2307.02486, section 3.1).

Legend: B batch, N = P * n tokens, P ranks, n tokens of one rank, H heads, D head dim,
W segment length, R dilation rate, C rows one head offset selects on one rank (padded to the
largest count over ranks and offsets), K gathered key rows one rank attends to.

Rank p holds the slice [p*n, (p+1)*n) of q, k, v. The result, output and gradients, equals
`dilated_attention` on the full sequence (same segments, offsets, causality, padding, and one
softmax over all branches).

Branches are of two kinds:
- local: W divides n. Every segment lies inside one rank's slice (at the same in-segment
  indices), so the branch runs on the slice with the package's fused op, without communication.
- remote: the other branches; some of their segments cross a slice boundary. Each rank sparsifies
  its own keys and values first: for head h (offset o = h mod R) it keeps the C rows whose index
  within their segment is = o mod R, about n / R rows, as a (B, C, H, D) tensor. These are
  all-gathered (one `all_gather_into_tensor` of keys and values together per branch; the backward
  is a reduce-scatter over the same ranks) only among the ranks that span the segment:
  - n divides W (W = m * n, the usual case of powers of two): the segments are exactly the aligned
    blocks of m consecutive ranks [b*m, (b+1)*m) (the last one shorter when m does not divide P),
    so each block gathers within its own process group (`block_group`, created once per parent
    group and m, then cached; a block of the whole group uses the group itself, a block of one rank
    does not communicate). `gather_ranks` gives the ranks a rank gathers from.
  - otherwise segments straddle slices irregularly and overlapping windows of different ranks
    would need many small groups: the branch is gathered over the whole group.
  Each rank then lets its own selected queries attend to the gathered keys of the ranks its
  segments span (the "window"), with explicit scores masked by segment, causality (global
  positions) and padding (the masks are all-gathered over the whole group, once).

All branches are merged by their log-sum-exps; the backward recomputes every branch with the
MERGED output and log-sum-exp (the fused op's backward for the local branches, the explicit
formulas of flash attention's backward for the remote ones), which gives exact dq, dk, dv.

Assumptions: every rank of the group calls with the same shapes, dtype, schedule, causality and
softmax scale, with a padding mask on all ranks or on none. `validate=True` (default) checks them
with one small all_gather before any other collective, together with each rank's own input checks:
an input that one rank rejects, or a mismatch, raises on every rank alike (the rejecting rank its
own error, the others the same type naming that rank and quoting its message), so no rank is left
waiting in a collective. With `validate=False` a rank raises alone and its peers wait for the
process group's timeout (`SequenceParallelStrategy(timeout_s=...)`).
"""

from __future__ import annotations

import functools
import math
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmlongnet.attention.dilated import (
    check_schedule,
    dilated_attention_backward_op,
    dilated_attention_forward_op,
    sdpa_takes,
)
from mmlongnet.attention.merge import (
    accumulation_dtype,
    merge_lse,
    merge_weighted,
    silence_keyless_rows,
)
from mmlongnet.distributed.collectives import Group, all_gather, all_gather_no_grad, group_rank, group_size

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Selection:
    """The rows one remote branch selects on every rank, per head (CPU tensors, cached).

    index: (P, C, H) long, the local row (in [0, n)) of selected entry c of head h on rank p.
    valid: (P, C, H) bool, False for padding entries (their index is 0).
    position: (P, C, H) long, the global position p*n + index of each entry.
    """

    index: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor


@functools.lru_cache(maxsize=64)
def branch_selection(
    num_shards: int, local_len: int, num_heads: int, segment_length: int, rate: int
) -> Selection:
    """The sparsified rows of branch (W, R) on each of P ranks of n tokens, for H heads.

    Head h keeps the rows whose index t within their segment [s*W, (s+1)*W) has t mod R = h mod R.
    """
    offsets = min(rate, num_heads)
    position = torch.arange(num_shards * local_len).view(num_shards, local_len)  # (P, n) global
    offset_of_row = position % segment_length % rate  # (P, n)
    counts = [(offset_of_row == o).sum(1) for o in range(offsets)]  # O x (P,)
    rows = max(1, max(int(c.max()) for c in counts))  # C
    index = torch.zeros(num_shards, rows, offsets, dtype=torch.long)  # (P, C, O)
    valid = torch.zeros(num_shards, rows, offsets, dtype=torch.bool)  # (P, C, O)
    for o in range(offsets):
        chosen = offset_of_row == o  # (P, n)
        slot = chosen.cumsum(1) - 1  # (P, n): where a chosen row goes among its rank's entries
        ranks, local = chosen.nonzero(as_tuple=True)
        index[ranks, slot[ranks, local], o] = local
        valid[ranks, slot[ranks, local], o] = True
    heads = torch.arange(num_heads) % rate  # (H,) offset of each head
    index, valid = index[:, :, heads], valid[:, :, heads]  # (P, C, H)
    shard_start = (torch.arange(num_shards) * local_len)[:, None, None]  # (P, 1, 1)
    return Selection(index=index, valid=valid, position=index + shard_start)


def window(rank: int, num_shards: int, local_len: int, segment_length: int) -> tuple[int, int]:
    """The ranks [lo, hi) whose keys the queries of `rank` can reach in branch segment_length W."""
    seq_len = num_shards * local_len
    first = rank * local_len // segment_length * segment_length  # start of the first segment
    last = min(((rank + 1) * local_len - 1) // segment_length * segment_length + segment_length, seq_len)
    return first // local_len, (last - 1) // local_len + 1


def gather_ranks(rank: int, num_shards: int, local_len: int, segment_length: int) -> tuple[int, int]:
    """The ranks [lo, hi) whose sparsified keys `rank` gathers for a remote branch of segment length W.

    n divides W (W = m * n): the block [b*m, (b+1)*m) of m consecutive ranks holding rank's segment
    (cut at P for the last block), which contains its window. Otherwise the whole group [0, P).
    """
    if segment_length % local_len:
        return 0, num_shards
    block = segment_length // local_len  # m
    lo = rank // block * block
    return lo, min(lo + block, num_shards)


# parent group -> {block: this rank's block group}; an entry lives as long as its parent group
_BLOCK_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, dict[int, dist.ProcessGroup | None]] = (
    weakref.WeakKeyDictionary()
)


def block_group(group: Group, block: int) -> Group:
    """The process group of this rank's block of `block` consecutive ranks of `group`, cached.

    A block of all ranks of `group` is `group` itself. Otherwise, at the first call for (group,
    block), every rank of `group` creates the groups of all blocks in the same order, with
    `use_local_synchronization` so that only the ranks of `group` take part (group may be one of
    several sequence-parallel groups). Blocks of one rank get no group (None: no communication).
    The cache holds its parent weakly: once the parent group is destroyed (e.g. by
    `dist.destroy_process_group()`), its block groups are dropped with it.
    """
    num_shards = group_size(group)
    if block >= num_shards:
        return group
    parent = group if group is not None else dist.group.WORLD
    cached = _BLOCK_GROUPS.setdefault(parent, {})
    if block not in cached:
        global_ranks = dist.get_process_group_ranks(parent)
        rank = group_rank(group)
        mine = None
        for lo in range(0, num_shards, block):
            members = global_ranks[lo : min(lo + block, num_shards)]
            if len(members) == 1:
                continue
            created = dist.new_group(members, use_local_synchronization=True)
            if lo <= rank < lo + block:
                mine = created
        cached[block] = mine
    return cached[block]


def _heads_index(index: torch.Tensor, batch: int, head_dim: int | None) -> torch.Tensor:
    """(C, H) row index -> (B, C, H[, D]) expanded for gather/scatter along dim 1."""
    if head_dim is None:
        return index[None].expand(batch, *index.shape)
    return index[None, :, :, None].expand(batch, *index.shape, head_dim)


class _Branch:
    """The explicit scores of one remote branch on this rank (device tensors of its geometry)."""

    def __init__(
        self,
        segment_length: int,
        selection: Selection,
        rank: int,
        key_ranks: tuple[int, int],
        first_gathered: int,
        device: torch.device,
    ) -> None:
        lo, hi = key_ranks  # the ranks whose keys this rank's queries can reach
        self.w = segment_length
        self.q_index = selection.index[rank].to(device)  # (C, H)
        self.q_valid = selection.valid[rank].to(device)  # (C, H)
        self.q_pos = selection.position[rank].to(device)  # (C, H)
        self.k_valid = selection.valid[lo:hi].flatten(0, 1).to(device)  # (K, H)
        self.k_pos = selection.position[lo:hi].flatten(0, 1).to(device)  # (K, H)
        # rows of the (ranks, 2, B, C, H, D) key/value tensor to read, which starts at rank first_gathered
        self.lo, self.hi = lo - first_gathered, hi - first_gathered

    def allowed(self, is_causal: bool, padding: torch.Tensor | None) -> torch.Tensor:
        """(B or 1, H, C, K) bool: query entry c of head h may attend key entry k.

        padding: (B, N) bool, True = padding, of the full sequence (or None).
        """
        same_segment = (self.q_pos // self.w)[:, None, :] == (self.k_pos // self.w)[None, :, :]  # (C, K, H)
        ok = same_segment & self.q_valid[:, None, :] & self.k_valid[None, :, :]
        if is_causal:
            ok = ok & (self.k_pos[None, :, :] <= self.q_pos[:, None, :])
        ok = ok.permute(2, 0, 1)[None]  # (1, H, C, K)
        if padding is not None:
            key_pad = padding[:, self.k_pos]  # (B, K, H)
            ok = ok & ~key_pad.permute(0, 2, 1)[:, :, None, :]  # (B, H, C, K)
        return ok

    def scores(self, q_sel, k_win, allowed, scale) -> torch.Tensor:
        """(B, C, H, D) x (B, K, H, D) -> masked scores (B, H, C, K), -inf where not allowed."""
        s = torch.einsum("bchd,bkhd->bhck", q_sel, k_win) * scale
        return s.masked_fill(~allowed, _NEG_INF)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, H, *rest) local rows -> (B, C, H, *rest) this rank's selected entries."""
        head_dim = x.shape[3] if x.dim() == 4 else None
        return x.gather(1, _heads_index(self.q_index, x.shape[0], head_dim))

    def place(self, y: torch.Tensor, like: torch.Tensor, fill: float) -> torch.Tensor:
        """(B, C, H, *rest) per entry -> (B, n, H, *rest) shaped like `like`; unselected rows hold fill.

        Padding entries must hold `fill` (0 for sums, -inf for log-sum-exps).
        """
        head_dim = y.shape[3] if y.dim() == 4 else None
        index = _heads_index(self.q_index, y.shape[0], head_dim)
        if fill == 0.0:
            return torch.zeros_like(like, dtype=y.dtype).scatter_add_(1, index, y)
        full = torch.full(like.shape, fill, dtype=y.dtype, device=y.device)
        return full.scatter_reduce_(1, index, y, "amax")


def _sdpa_takes(q: torch.Tensor) -> bool:
    """Whether the local branches run on the fused op: its "sdpa" kernels take q's device and dtype."""
    return sdpa_takes(q)


class ShardedDilatedAttentionFunction(torch.autograd.Function):
    """Output and exact gradients of all branches on this rank's slice, given the gathered K/V.

    forward(q, k, v (B, n, H, D), key_padding_mask (B, n) or None, padding (B, N) or None,
    options, *gathered) -> (B, n, H, D), where gathered[i] (P_i, 2, B, C_i, H, D) holds the
    sparsified keys (index 0) and values (index 1) of remote branch i of the P_i consecutive ranks it
    was gathered from (its block, the whole group, or this rank alone). The backward returns dq,
    dk, dv of the local branches and of the queries of the remote ones, and the gradient of every
    gathered tensor (zero outside the branch's window); autograd routes the latter through the
    all-gather's reduce-scatter, over the same ranks, to the owners of the keys.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, padding, options, *gathered):
        local_w, local_r, branches, is_causal, scale = options
        acc = accumulation_dtype(q.dtype)
        batch, local_len, num_heads, _ = q.shape
        lse = torch.full((batch, local_len, num_heads), _NEG_INF, dtype=acc, device=q.device)  # (B, n, H)
        parts = []  # (out (B, n, H, D) normalised by lse_part, lse_part (B, n, H))
        if local_w:
            out_local, lse_local = dilated_attention_forward_op(
                q, k, v, key_padding_mask, local_w, local_r, is_causal, scale, "sdpa"
            )
            parts.append((out_local.to(acc), lse_local))
            lse = lse_local.clone()
        for branch, kv in zip(branches, gathered, strict=True):
            kv_win = kv[branch.lo : branch.hi].movedim(0, 2)  # (2, B, Pw, C, H, D)
            k_win, v_win = kv_win.flatten(2, 3).to(acc)  # (B, K, H, D) each
            s = branch.scores(branch.select(q).to(acc), k_win, branch.allowed(is_causal, padding), scale)
            lse_b = torch.logsumexp(s, dim=-1)  # (B, H, C), -inf for entries without a key
            p = torch.exp(s - silence_keyless_rows(lse_b)[..., None])  # (B, H, C, K)
            out_b = torch.einsum("bhck,bkhd->bchd", p, v_win)  # (B, C, H, D)
            lse_b = branch.place(lse_b.transpose(1, 2), lse, _NEG_INF)  # (B, n, H)
            parts.append((branch.place(out_b, q, 0.0), lse_b))
            merge_lse(lse, lse_b)  # lse is this function's own tensor
        lse_weights = silence_keyless_rows(lse)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, n, H, D)
        for out_part, lse_part in parts:
            merge_weighted(out, out_part, lse_part, lse_weights)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, key_padding_mask, padding, out, lse, *gathered)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, padding, out, lse, *gathered = ctx.saved_tensors
        local_w, local_r, branches, is_causal, scale = ctx.options
        acc = lse.dtype
        grad_out = grad_out.contiguous()
        if local_w:
            dq, dk, dv = dilated_attention_backward_op(
                grad_out, q, k, v, out, lse, key_padding_mask, local_w, local_r, is_causal, scale, "sdpa"
            )
            dq = dq.to(acc)
        else:
            dq, dk, dv = (
                torch.zeros(q.shape, dtype=acc, device=q.device),
                torch.zeros_like(k),
                torch.zeros_like(v),
            )
        lse_rows = silence_keyless_rows(lse)  # (B, n, H)
        grads_gathered = []
        for branch, kv in zip(branches, gathered, strict=True):
            kv_win = kv[branch.lo : branch.hi].movedim(0, 2)  # (2, B, Pw, C, H, D)
            k_win, v_win = kv_win.flatten(2, 3).to(acc)  # (B, K, H, D) each
            q_sel = branch.select(q).to(acc)  # (B, C, H, D)
            dout_sel = branch.select(grad_out).to(acc)  # (B, C, H, D)
            out_sel = branch.select(out).to(acc)  # (B, C, H, D)
            lse_sel = branch.select(lse_rows)  # (B, C, H)
            lse_sel = lse_sel.masked_fill(~branch.q_valid, float("inf")).transpose(1, 2)  # (B, H, C)
            s = branch.scores(q_sel, k_win, branch.allowed(is_causal, padding), scale)
            p = torch.exp(s - lse_sel[..., None])  # (B, H, C, K), the merged softmax's probabilities
            dv_win = torch.einsum("bhck,bchd->bkhd", p, dout_sel)  # (B, K, H, D)
            dp = torch.einsum("bchd,bkhd->bhck", dout_sel, v_win)  # (B, H, C, K)
            delta = (dout_sel * out_sel).sum(-1).transpose(1, 2)[..., None]  # (B, H, C, 1)
            ds = p * (dp - delta)  # (B, H, C, K)
            dq_sel = torch.einsum("bhck,bkhd->bchd", ds, k_win) * scale  # (B, C, H, D)
            dk_win = torch.einsum("bhck,bchd->bkhd", ds, q_sel) * scale  # (B, K, H, D)
            dq = dq + branch.place(dq_sel, q, 0.0)
            grad_kv = torch.zeros(kv.shape, dtype=kv.dtype, device=kv.device)  # (P_i, 2, B, C, H, D)
            reached = torch.stack((dk_win, dv_win))  # (2, B, K, H, D)
            reached = reached.unflatten(2, (branch.hi - branch.lo, -1))  # (2, B, Pw, C, H, D)
            grad_kv[branch.lo : branch.hi] = reached.movedim(2, 0).to(kv.dtype)
            grads_gathered.append(grad_kv)
        return dq.to(q.dtype), dk, dv, None, None, None, *grads_gathered


def _check_inputs(q, k, v, key_padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, n, H, D) tensor, got {getattr(t, 'shape', t)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, n, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if k.dtype != q.dtype or v.dtype != q.dtype or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0:
        raise ValueError("this rank's slice is empty (n = 0): every rank needs at least one token")
    for name, size in (("B", q.shape[0]), ("H", q.shape[2]), ("D", q.shape[3])):
        if size == 0:
            raise ValueError(f"q, k, v must have a positive {name}, got shape {tuple(q.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"key_padding_mask must be this rank's slice (B, n) = {tuple(q.shape[:2])}, got "
                             f"{tuple(key_padding_mask.shape)}")  # fmt: skip


def _check_scale(softmax_scale, head_dim: int) -> float:
    """The score scale: softmax_scale, or 1 / sqrt(D) when None; ValueError unless positive and finite."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, int | float):
        raise TypeError(f"softmax_scale must be a number or None, got {softmax_scale!r}")
    if not 0 < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale must be a positive, finite number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _local_checks(q, k, v, key_padding_mask, segment_lengths, dilation_rates, softmax_scale):
    """This rank's (schedule, scale, None), or (None, None, the error its inputs raise), not raised."""
    try:
        _check_inputs(q, k, v, key_padding_mask)
        schedule = check_schedule(segment_lengths, dilation_rates)
        scale = _check_scale(softmax_scale, q.shape[-1])
    except (TypeError, ValueError) as error:
        return None, None, error
    return schedule, scale, None


_MESSAGE_BYTES = 512  # of a rejecting rank's error message, sent to its peers
_ERRORS = (ValueError, TypeError)  # status 1, 2 of a report


def _report_device(group: Group) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _validate_group(q, schedule, is_causal, has_mask, scale, error, group) -> None:
    """One small all_gather of every rank's report: its own input error, if any (raised on every
    rank, the rejecting rank's type and message), then its shapes and options (ValueError on every
    rank alike when they disagree)."""
    fields = (
        "shape (B, n, H, D)",
        "dtype",
        "schedule",
        "is_causal",
        "key_padding_mask given",
        "softmax_scale",
    )
    if error is None:
        status, message = 0, b""
        crc = zlib.crc32(repr(schedule).encode())  # the same in every process
        mine = [*q.shape, zlib.crc32(str(q.dtype).encode()), crc, int(is_causal), int(has_mask),
                round(scale * 1e12)]  # fmt: skip
    else:
        status, message = 1 + int(isinstance(error, TypeError)), str(error).encode()[:_MESSAGE_BYTES]
        mine = [0] * 9
    text = [*message, *[0] * (_MESSAGE_BYTES - len(message))]
    row = torch.tensor([[status, *mine, *text]], dtype=torch.long, device=_report_device(group))
    table = all_gather_no_grad(row, group).cpu()  # (P, 10 + _MESSAGE_BYTES)
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        if error is not None:
            raise error
        rank = failed[0]
        status, quoted = int(table[rank, 0]), bytes(table[rank, 10:].tolist()).rstrip(b"\0")
        raise _ERRORS[status - 1](
            f"sharded_dilated_attention: rank {rank} of the group rejected its input: "
            f"{quoted.decode(errors='replace')}"
        )
    table = table[:, 1:10]  # (P, 9)
    columns = (slice(0, 4), 4, 5, 6, 7, 8)
    for field, column in zip(fields, columns, strict=True):
        values = table[:, column]
        if not (values == values[:1]).all():
            raise ValueError(
                f"sharded_dilated_attention: the ranks of the group disagree on {field}: per rank "
                f"{values.tolist()}; every rank must pass its equal slice with the same options"
            )


def sharded_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    group: Group = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Dilated attention over a sequence split evenly over the ranks of `group`, exact.

    Every rank p of the P ranks of `group` (None: the default group) calls this with its slice of
    global positions [p*n, (p+1)*n) and receives its slice of the output of
    `dilated_attention(q_full, k_full, v_full, segment_lengths, dilation_rates, is_causal=...,
    key_padding_mask=mask_full, softmax_scale=...)`; gradients flow to every rank's q, k, v exactly
    as on one device.

    Args:
        q, k, v: (B, n, H, D) this rank's slice (n = N / P, the same on every rank).
        segment_lengths, dilation_rates: the branch schedule, as in `dilated_attention`. Branches
            with n divisible by W run locally; the others exchange sparsified keys/values.
        group: the sequence-parallel process group. Remote branches with W = m * n gather within blocks
            of m ranks, whose groups are created at the first call with that m (see `block_group`).
        is_causal: a query attends to keys at global positions <= its own (on its own and earlier ranks).
        key_padding_mask: (B, n) bool this rank's slice of the padding mask, True = padding; given on
            every rank or on none.
        softmax_scale: score scale, default 1 / sqrt(D).
        validate: check with one small all_gather that the ranks agree on shapes and options, and
            make an input that one rank rejects raise on every rank (see the module docstring).

    Returns:
        (B, n, H, D), this rank's slice of the output.

    Attention dropout and an additive position bias are not supported here.
    """
    schedule, scale, error = _local_checks(
        q, k, v, key_padding_mask, segment_lengths, dilation_rates, softmax_scale
    )
    if error is not None and not (validate and dist.is_initialized()):
        raise error
    num_shards, rank = group_size(group), group_rank(group)
    if validate and num_shards > 1:  # before any other collective: every rank raises, or none does
        _validate_group(q, schedule, is_causal, key_padding_mask is not None, scale, error, group)
    elif error is not None:
        raise error
    segment_lengths, dilation_rates = schedule
    batch, local_len, num_heads, head_dim = q.shape
    fused = _sdpa_takes(q)
    local_w, local_r, remotes = [], [], []
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        if fused and local_len % w == 0:
            local_w.append(w)
            local_r.append(r)
        else:
            remotes.append((w, r))
    padding = None
    if remotes and key_padding_mask is not None:
        padding = key_padding_mask  # (B, n): the keys of this rank only, while nothing is gathered
        if num_shards > 1:
            gathered_mask = all_gather_no_grad(key_padding_mask, group)  # (P * B, n)
            padding = gathered_mask.view(num_shards, batch, local_len).transpose(0, 1).flatten(1)  # (B, N)
    branches, gathered = [], []
    for w, r in remotes:
        # Decided alike on every rank (all_gather is collective): gather unless the branch is local
        # (n divisible by W, here only because the fused kernels refuse the dtype).
        exchange = num_shards > 1 and local_len % w != 0
        key_ranks = window(rank, num_shards, local_len, w) if exchange else (rank, rank + 1)
        lo, hi = gather_ranks(rank, num_shards, local_len, w) if exchange else (rank, rank + 1)
        selection = branch_selection(num_shards, local_len, num_heads, w, r)
        branch = _Branch(w, selection, rank, key_ranks, lo, q.device)
        kv_sel = torch.stack((branch.select(k), branch.select(v)))  # (2, B, C, H, D)
        if hi - lo > 1:
            among = group if hi - lo == num_shards else block_group(group, w // local_len)
            kv = all_gather(kv_sel, among).unflatten(0, (hi - lo, 2))  # (hi - lo, 2, B, C, H, D)
        else:
            kv = kv_sel[None]  # (1, 2, B, C, H, D): own keys only
        branches.append(branch)
        gathered.append(kv)
    options = (local_w, local_r, branches, bool(is_causal), scale)
    return ShardedDilatedAttentionFunction.apply(q, k, v, key_padding_mask, padding, options, *gathered)
