"""Exact dilated attention (LongNet, Ding et al. 2023, arXiv 2307.02486, eq. 3-15).

Legend: B batch, N tokens, H heads, D head dim, S segments, C rows per segment, Ho heads of one offset.

Four layers, as in flash-attn: the raw ops `mmlongnet::dilated_attention_forward/backward`
(registered with `torch.library.custom_op`, with fake implementations for `torch.compile`)
-> `DilatedAttentionFunction` (autograd) -> `dilated_attention` (checks and backend choice)
-> `mmlongnet.attention.DilatedAttention` (the module).

Forward: every branch call (one block of segments, one head offset) is one dense kernel call on
a strided view of q, k, v. The calls' log-sum-exps are merged first into one (the log of the
mixture's softmax denominator, eq. 10); then each call's output is merged into the output with
weight exp(lse_call - lse), in one elementwise pass per call (written by the calls of a branch of
dilation 1, which cover every row and head once, added by the others); `mmlongnet.attention.merge`
holds the merge.
Backward: each call's kernel backward runs with the MERGED output and log-sum-exp, so its
probabilities are those of the one softmax over all branches, and dq, dk, dv are exact.

Small inputs (`runs_dense`) skip the branch calls: one dense kernel call with the schedule's
log-multiplicity as an additive bias computes the same softmax, with autograd's backward.

Neither direction reads a device value on the host: for fixed shapes the op can be captured in a
CUDA graph. `KernelSelector` picks each call's kernel so that no plan is built for a new shape.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmlongnet._tracing import traced
from mmlongnet.attention.flash import DTYPES as FLASH_DTYPES
from mmlongnet.attention.flash import FlashAttentionUnavailable, flash_install, flash_kernel
from mmlongnet.attention.geometry import BranchCall, PackedBlock, branch_calls
from mmlongnet.attention.kernels import SELECTOR, Kernel, biased_attention, kernel_chain
from mmlongnet.attention.merge import (
    accumulation_dtype,
    add_parts,
    merge_lse,
    merge_weighted,
    silence_keyless_rows,
)
from mmlongnet.attention.reference import branch_multiplicity, dilated_attention_reference

BACKENDS = ("auto", "reference", "sdpa", "flash_attn")
_LONGEST_SEGMENT = 1 << 40  # longer segment lengths are clipped to N
_SDPA_DTYPES = {
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def sdpa_takes(q: torch.Tensor) -> bool:
    """Whether the "sdpa" backend's kernels take q's device type and dtype."""
    return q.dtype in _SDPA_DTYPES.get(q.device.type, ())


# Inputs of at most this many elements run with packed calls (one per block of segments, all
# head offsets together): there the host's launch overhead, not the GPU, sets the pace.
PACK_MAX_ELEMENTS = 1 << 24
# The offsets of a branch of a high rate go into the kernel's head dimension (diagonal calls:
# fewer and fuller kernel calls, no copy).
DIAGONAL_CALLS = True
# The covering calls' kernels write their results straight into the op's output and gradients,
# where the kernel takes buffers (flash-attn's do): less memory, fewer copies.
WRITE_IN_PLACE = True

# Small inputs run as ONE dense kernel call whose additive bias is log(multiplicity) of the
# branches (-inf where no branch pairs a query and a key): the reference's single softmax in a
# fused kernel, one attention kernel each way (and a few elementwise passes for a padding mask)
# instead of every branch call and its merge passes, where launches, not arithmetic, set the pace
# (a training step of the bundled AV task at 16 digits held ~3,000 kernels). Taken when the
# scores B * H * N * N are at most DENSE_MAX_SCORES elements (the bias is materialised at that
# size) and the dense work is at most DENSE_MAX_WORK times the branches' (N <= DENSE_MAX_WORK *
# keys per query over all branches).
DENSE_SMALL_INPUTS = True
DENSE_MAX_SCORES = 1 << 26
DENSE_MAX_WORK = 2.0


def _calls(
    q: torch.Tensor, segment_lengths: list[int], dilation_rates: list[int]
) -> tuple[tuple[BranchCall | PackedBlock, ...], int]:
    """The op's kernel calls, those of a branch of dilation 1 first, and how many of them that is
    (0 without such a branch): its calls cover every row and head of q exactly once."""
    _, seq_len, num_heads, _ = q.shape
    pack = q.numel() <= PACK_MAX_ELEMENTS
    schedule = (tuple(segment_lengths), tuple(dilation_rates))
    return _schedule_calls(seq_len, num_heads, *schedule, pack, DIAGONAL_CALLS)


@functools.lru_cache(maxsize=256)
def _schedule_calls(
    seq_len: int, num_heads: int, segment_lengths: tuple, dilation_rates: tuple, pack: bool, diagonal: bool
) -> tuple[tuple[BranchCall | PackedBlock, ...], int]:
    """`_calls` for one shape and schedule, kept for the 256 most recent (the forward and the
    backward of every layer ask for the same ones; `geometry`'s constants are read when a shape
    is first seen)."""
    branches = sorted(zip(segment_lengths, dilation_rates, strict=True), key=lambda branch: branch[1] != 1)
    calls = [branch_calls(seq_len, num_heads, w, r, pack=pack, diagonal=diagonal) for w, r in branches]
    covering = len(calls[0]) if branches[0][1] == 1 else 0
    return tuple(call for branch in calls for call in branch), covering


def _key_bias(padding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Key bias of one call's padding mask, (b, c) or per head (b, c, h): 0 for a key, -inf for
    padding, in the mask's shape."""
    if padding is None:
        return None
    return torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill(padding, float("-inf"))


def _valid_rows(padding: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """(b, c, h or 1) bool of one call's padding mask, (b, c) or per head (b, c, h): the rows that
    see at least one non-padding key (causal: one at or before them)."""
    keep = ~padding if padding.dim() == 3 else ~padding[..., None]  # (b, c, h or 1)
    return keep.cumsum(1) > 0 if is_causal else keep.any(1, keepdim=True).expand_as(keep)


# flash-attn 4's kernels are faster on the GPU than PyTorch's, but each call costs more host time
# (H200, LM schedule, causal, H=16, D=64, eager forward+backward: 0.8x the "sdpa" backend's speed
# at 32K tokens, 1.3x at 128K). Eager calls of less work than this (b * c * c * h * D multiply-adds
# of the scores) run on the "sdpa" kernels, whose host work is lighter; calls that a CUDA graph
# records (or that the eager step before a recording runs, `KernelSelector.recording_next`) take
# flash-attn at any size, as a replay pays no host work.
FLASH_MIN_WORK = 1 << 36


def _kernels(q_rows: torch.Tensor, has_bias: bool, backend: str) -> list[Kernel]:
    """The kernels that may run one call on q_rows (b, c, h, D), fastest first: the "sdpa" chain,
    behind the flash-attn kernel on the "flash_attn" backend for a call without a key bias (masked
    calls run on the chain) and of at least FLASH_MIN_WORK or recorded in a CUDA graph."""
    chain = kernel_chain(q_rows.device, q_rows.dtype, has_bias, rows=q_rows.shape[1])
    batch, rows, heads, head_dim = q_rows.shape
    large = batch * rows * rows * heads * head_dim >= FLASH_MIN_WORK
    if backend == "flash_attn" and not has_bias and (large or SELECTOR.recording_next()):
        chain.insert(0, flash_kernel(q_rows.device, q_rows.dtype))
    return chain


def _rows_of(call: BranchCall | PackedBlock, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The call's kernel rows of each tensor (B, N, H, D) as views a kernel can write the results
    into, or None where they are copies (a `PackedBlock`'s gathered rows; segments of several
    samples that one batch dim cannot address)."""
    if not WRITE_IN_PLACE:
        return None
    rows = [call.kernel_rows(t) for t in tensors]
    storage = [
        (r.untyped_storage().data_ptr(), t.untyped_storage().data_ptr())
        for r, t in zip(rows, tensors, strict=True)
    ]
    return rows if all(a == b for a, b in storage) else None


def _shape_key(rows: list[torch.Tensor], has_bias: bool, is_causal: bool) -> tuple:
    """What a kernel that plans per input builds its plan for: the q, k, v rows' dtype, shape and
    strides (cuDNN keys its plans on the strides too: the same shape from another sequence length
    has other strides and builds another plan), the key bias and causality."""
    q_rows = rows[0]
    return (q_rows.dtype, tuple(q_rows.shape), *(t.stride() for t in rows), has_bias, is_causal)


def runs_dense(q: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> bool:
    """Whether `dilated_attention` runs q (B, N, H, D) as one dense biased call (see DENSE_SMALL_INPUTS)."""
    batch, seq_len, num_heads, _ = q.shape
    keys_per_query = sum(min(w, seq_len) / r for w, r in zip(segment_lengths, dilation_rates, strict=True))
    return (
        DENSE_SMALL_INPUTS
        and batch * num_heads * seq_len * seq_len <= DENSE_MAX_SCORES
        and seq_len <= DENSE_MAX_WORK * keys_per_query
    )


def _schedule_bias(
    seq_len: int,
    num_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    is_causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, selected) of a schedule: bias (H, N, N8) whose first N columns are log(multiplicity)
    in `dtype` (-inf where no branch pairs query and key, 0 on the rows of a query no branch
    selects: the caller zeroes their output), N8 = N rounded up to a multiple of 8 (the kernels'
    row alignment; the extra columns hold 0); selected (H, N) bool. In `dtype` under autocast too."""
    count = branch_multiplicity(
        seq_len, num_heads, list(segment_lengths), list(dilation_rates), is_causal=is_causal, device=device
    )
    selected = (count > 0).any(-1)
    with torch.autocast(device.type, enabled=False):  # autocast computes log in float32
        bias = count.to(dtype).log().masked_fill(~selected[..., None], 0.0)
    return F.pad(bias, (0, -seq_len % 8)), selected


@functools.lru_cache(maxsize=16)
def _cached_schedule_bias(*key) -> tuple[torch.Tensor, torch.Tensor]:
    """`_schedule_bias`, kept for the 16 most recent schedules and shapes (eager calls)."""
    with torch.inference_mode(False):  # a normal tensor, which autograd may save, even when built there
        return _schedule_bias(*key)


def _dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Dilated attention of (B, N, H, D) inputs as one dense kernel call with the schedule's bias
    (`runs_dense`); returns (B, N, H, D). Exact: the reference's softmax in a fused kernel."""
    batch, seq_len, num_heads, _ = q.shape
    key = (seq_len, num_heads, tuple(segment_lengths), tuple(dilation_rates), is_causal, q.dtype, q.device)
    # Traced or recorded, the bias is built inside the graph: a recorded graph must not read a
    # cached tensor that the cache may later drop.
    build = _schedule_bias if traced() else _cached_schedule_bias
    bias, keep = build(*key)  # (H, N, N8), (H, N)
    keep = keep[None]  # (1, H, N): the query rows with a key
    if key_padding_mask is None:
        bias = bias[..., :seq_len].expand(batch, -1, -1, -1)
    else:
        padding = F.pad(key_padding_mask, (0, bias.shape[-1] - seq_len))  # (B, N8)
        key_bias = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill(
            padding, float("-inf")
        )
        # a query row has a key where the schedule pairs it with an unpadded one: counted as one
        # (H, N, N) x (N, B) product, not a comparison and a reduction over the (B, H, N, N) bias
        paired = (bias[..., :seq_len] > float("-inf")).float()  # (H, N, N)
        has_key = torch.matmul(paired, (~key_padding_mask).float().T) > 0  # (H, N, B)
        keep = keep & has_key.permute(2, 0, 1)  # (B, H, N)
        bias = bias + key_bias[:, None, None, :]  # (B, H, N, N8)
        bias = bias.masked_fill_(~keep[..., None], 0.0)[..., :seq_len]  # a row with no key: zeroed below
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = biased_attention(qh, kh, vh, bias, scale)  # (B, H, N, D)
    if key_padding_mask is not None or 1 not in dilation_rates:  # (a branch of rate 1 selects every row)
        out = out * keep[..., None]
    return out.transpose(1, 2)


@torch.library.custom_op("mmlongnet::dilated_attention_forward", mutates_args=())
def dilated_attention_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw forward op: (B, N, H, D) x3 -> output (B, N, H, D), merged log-sum-exp (B, N, H)
    (-inf for rows with no key)."""
    batch, seq_len, num_heads, head_dim = q.shape
    acc_dtype = accumulation_dtype(q.dtype)
    calls, covering = _calls(q, segment_lengths, dilation_rates)
    lse = torch.empty((batch, seq_len, num_heads), dtype=acc_dtype, device=q.device)
    if not covering:  # rows and heads no call selects keep lse = -inf
        lse.fill_(float("-inf"))
    # The output accumulates in the input dtype: every merge pass computes in float32 and rounds
    # once, and 16-bit inputs need no float32 buffer of the output's size nor a final cast.
    out = (torch.empty if covering else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    parts = []
    for index, call in enumerate(calls):
        rows = [call.kernel_rows(t) for t in (q, k, v)]  # 3 x (b, c, h, D)
        padding = call.key_padding(key_padding_mask, q)  # (b, c) or None
        bias = _key_bias(padding, q.dtype)
        chain = _kernels(rows[0], bias is not None, backend)
        key = _shape_key(rows, bias is not None, is_causal)
        # a covering call's output may go straight to its rows of `out` (scaled there by the merge)
        into = _rows_of(call, [out]) if index < covering else None
        out_call, lse_call = SELECTOR.run(
            chain, "forward", key, *rows, bias, is_causal, scale, into[0] if into else None
        )
        lse_call = lse_call.to(acc_dtype)  # (b, c, h)
        if padding is not None:  # a row without a key: lse -inf (its output is finite, weighted 0)
            lse_call = lse_call.masked_fill(~_valid_rows(padding, is_causal), float("-inf"))
        lse_call = call.place(lse_call, float("-inf"))  # laid out like call.target(lse)
        merge_lse(call.target(lse), lse_call, first=index < covering)
        parts.append((call, None if into and out_call is into[0] else out_call, lse_call))
    # A placed lse_call holds -inf for a row without a key (mask) and for the entries a padded
    # packed call does not select; where the merged lse is -inf too, +inf makes the weight 0. With
    # no mask and a covering branch, every merged lse is finite.
    lse_safe = lse if key_padding_mask is None and covering else silence_keyless_rows(lse)
    for index, (call, out_call, lse_call) in enumerate(parts):
        part = None if out_call is None else call.place(out_call, 0.0)  # None: already in `out`
        merge_weighted(call.target(out), part, lse_call, call.target(lse_safe), first=index < covering)
    return out, lse


@torch.library.custom_op("mmlongnet::dilated_attention_backward", mutates_args=())
def dilated_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segment_lengths: list[int],
    dilation_rates: list[int],
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw backward op: dq, dk, dv (B, N, H, D) from the merged output and log-sum-exp of the forward."""
    # Without a mask every row a call reads has a key; padding rows of packed calls get lse = +inf.
    if key_padding_mask is not None:
        lse = silence_keyless_rows(lse)
    calls, covering = _calls(q, segment_lengths, dilation_rates)
    allocate = torch.empty if covering else torch.zeros
    grads = [allocate(q.shape, dtype=q.dtype, device=q.device) for _ in range(3)]  # as the output
    for index, call in enumerate(calls):
        rows = [call.kernel_rows(t) for t in (grad_out, q, k, v, out)]  # 5 x (b, c, h, D)
        lse_rows = call.kernel_rows(lse, float("inf"))  # (b, c, h)
        bias = _key_bias(call.key_padding(key_padding_mask, q), q.dtype)
        chain = _kernels(rows[1], bias is not None, backend)
        key = _shape_key(rows[1:4], bias is not None, is_causal)
        # a covering call's gradients may go straight to their rows of the gradients
        into = _rows_of(call, grads) if index < covering else None
        call_grads = SELECTOR.run(chain, "backward", key, *rows, lse_rows, bias, is_causal, scale, into)
        pending = [
            (call.target(grad), call.place(call_grad, 0.0))
            for grad, call_grad, written in zip(grads, call_grads, into or (None,) * 3, strict=True)
            if call_grad is not written
        ]
        add_parts([target for target, _ in pending], [part for _, part in pending], first=index < covering)
    return tuple(grads)


@dilated_attention_forward_op.register_fake
def _forward_fake(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@dilated_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class DilatedAttentionFunction(torch.autograd.Function):
    """Autograd of the fused dilated-attention op (the "sdpa" and "flash_attn" backends)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, backend):
        out, lse = torch.ops.mmlongnet.dilated_attention_forward(
            q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, backend
        )
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (segment_lengths, dilation_rates, is_causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.mmlongnet.dilated_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, key_padding_mask, *ctx.options
        )
        return dq, dk, dv, None, None, None, None, None, None


def backend_status(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Each backend of `dilated_attention` (besides "auto") -> None where it runs on `device`,
    else why not (e.g. "flash-attn-4 is not installed; flash-attn is not installed")."""
    device = torch.device(device)
    status: dict[str, str | None] = {"reference": None}
    status["sdpa"] = None if device.type in _SDPA_DTYPES else f"no fused kernels on {device.type}"
    try:
        flash_install(device)
        status["flash_attn"] = None
    except FlashAttentionUnavailable as error:
        status["flash_attn"] = str(error)
    return status


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends `dilated_attention` can run on `device` (besides "auto"); `backend_status`
    says why the others cannot."""
    return [name for name, reason in backend_status(device).items() if reason is None]


def check_schedule(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Validate a branch schedule and return it as two lists of ints.

    Raises ValueError naming the argument when the lists are empty, of unequal length, hold
    non-positive values, or a dilation rate exceeds its segment length.
    """
    segment_lengths, dilation_rates = list(segment_lengths), list(dilation_rates)
    if not segment_lengths or len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must be non-empty lists of equal length, got "
            f"segment_lengths={segment_lengths} and dilation_rates={dilation_rates}"
        )
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in values):
            raise ValueError(f"{name} must hold positive ints, got {values}")
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        if r > w:
            raise ValueError(
                f"a dilation rate may not exceed its segment length, got dilation_rates entry {r} "
                f"for segment length {w}"
            )
    return segment_lengths, dilation_rates


def _check_inputs(q, k, v, key_padding_mask, position_bias, softmax_scale, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, N, H, D), got {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape (B, N, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if tuple(key_padding_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape (B, N) = {tuple(q.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if position_bias is not None:
        batch, seq_len, num_heads, _ = q.shape
        allowed = [(num_heads, seq_len, seq_len), (batch, num_heads, seq_len, seq_len)]
        if not isinstance(position_bias, torch.Tensor) or tuple(position_bias.shape) not in allowed:
            shape = tuple(position_bias.shape) if isinstance(position_bias, torch.Tensor) else position_bias
            raise ValueError(
                f"position_bias must have shape (H, N, N) or (B, H, N, N) = {allowed}, got {shape}"
            )
    if q.shape[-1] == 0:
        raise ValueError(f"q, k, v must have a positive head dim D, got shape {tuple(q.shape)}")
    if softmax_scale is not None and not (
        isinstance(softmax_scale, float | int)
        and not isinstance(softmax_scale, bool)
        and 0 < softmax_scale < math.inf
    ):
        raise ValueError(f"softmax_scale must be a positive, finite number or None, got {softmax_scale!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


_warned_reference: set[str] = set()


@torch.compiler.assume_constant_result  # compiled code takes the answer as a constant
def _flash_runs_on(device: torch.device) -> bool:
    """Whether the "flash_attn" backend runs on `device` (`backend_status` says why not)."""
    return device.type == "cuda" and flash_kernel(device, torch.bfloat16) is not None


def _resolve_backend(backend: str, q: torch.Tensor, dropout_p: float, has_position_bias: bool) -> str:
    """The backend that will run: "auto" resolved, the requested one checked against the input.

    "auto" takes "flash_attn" where flash-attn runs on the device and dtype, else "sdpa" where
    its kernels take the dtype, else "reference". Attention dropout and an additive position bias
    run on the dense "reference" backend only: "auto" routes such calls there (with a one-time
    warning), the fused backends reject them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    runs = {"reference": True, "sdpa": q.device.type in _SDPA_DTYPES, "flash_attn": _flash_runs_on(q.device)}
    sdpa_ok = sdpa_takes(q)
    dense_only = [
        name
        for name, used in (("dropout_p > 0", dropout_p > 0.0), ("position_bias", has_position_bias))
        if used
    ]
    if backend == "auto":
        if dense_only:
            for reason in dense_only:
                if reason not in _warned_reference:
                    warnings.warn(
                        f"dilated_attention: {reason} runs on the dense reference backend (O(N^2) memory); "
                        "the fused kernels take neither attention dropout nor a position bias",
                        stacklevel=3,
                    )
                    _warned_reference.add(reason)
            return "reference"
        if q.dtype in FLASH_DTYPES and runs["flash_attn"]:
            return "flash_attn"
        return "sdpa" if sdpa_ok else "reference"
    if not runs[backend]:
        status = backend_status(q.device)
        raise ValueError(
            f"backend {backend!r} is not available on {q.device} ({status[backend]}); "
            f"available: {[name for name, reason in status.items() if reason is None]}"
        )
    if backend != "reference" and dense_only:
        raise ValueError(
            f"backend {backend!r} takes neither attention dropout nor a position bias; use "
            f"backend='reference' (or 'auto') for {' and '.join(dense_only)}, or rotary/XPOS positions"
        )
    if backend == "sdpa" and not sdpa_ok:
        raise TypeError(
            f"backend 'sdpa' on {q.device.type} takes dtypes {_SDPA_DTYPES[q.device.type]}, got {q.dtype}; "
            "use backend='reference'"
        )
    if backend == "flash_attn" and q.dtype not in FLASH_DTYPES:
        raise TypeError(
            f"backend 'flash_attn' takes dtypes {FLASH_DTYPES}, got {q.dtype}; use backend='sdpa' or 'auto'"
        )
    return backend


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """LongNet dilated attention, exact in value and gradient, for any sequence length.

    Args:
        q, k, v: (B, N, H, D) queries, keys and values, same shape, dtype and device.
        segment_lengths: segment length w_i of each branch, e.g. [2048, 4096, 8192].
        dilation_rates: dilation rate r_i of each branch, e.g. [1, 2, 4]; r_i <= w_i.
        is_causal: a query attends only to keys at positions <= its own, in every branch.
        key_padding_mask: (B, N) bool, True marks padding keys, which never receive weight.
        position_bias: (H, N, N) or (B, H, N, N) additive score bias, e.g. a relative position bias
            (runs on the "reference" backend).
        softmax_scale: score scale, default 1 / sqrt(D).
        dropout_p: dropout on the attention probabilities (runs on the "reference" backend).
        backend: "auto" (default: "flash_attn" where it runs, else "sdpa" where it takes the
            input, else "reference"), "reference" (dense, any device and dtype, O(N^2) memory),
            "sdpa" (PyTorch's fused kernels: cuDNN, flash and memory-efficient attention on CUDA,
            flash attention on CPU) or "flash_attn" (the flash-attn package's kernels, CUDA, float16
            and bfloat16, for the calls large enough to gain from them; calls with a key padding
            mask run on the "sdpa" kernels).
            `backend_status(device)` says which run where, and why not.

    Returns:
        (B, N, H, D). Branch i cuts the sequence into segments [s*w_i, (s+1)*w_i) clipped to N; in
        each, head h keeps the rows t with t mod r_i == h mod r_i for queries and keys alike. All
        branches share one softmax (a key reached through m branches counts m times), which is
        the paper's mixture weighted by softmax denominators (eq. 10). A query with no key
        (all masked, or selected by no branch) outputs zeros. An empty input (B, N or H = 0)
        gives an empty output; a segment length beyond N acts as N.

    NaN and inf: inputs are expected finite; on every backend, a query row holding NaN or inf
    outputs NaN, and so does every row that attends to a key or value holding one. (The dense
    reference may also spread a value's NaN to rows that give it weight 0, as 0 * NaN = NaN; a small
    input run as one dense call, see `runs_dense`, a key's or a value's NaN to every row of its
    sample and head.)
    """
    _check_inputs(q, k, v, key_padding_mask, position_bias, softmax_scale, dropout_p)
    segment_lengths, dilation_rates = check_schedule(segment_lengths, dilation_rates)
    backend = _resolve_backend(backend, q, dropout_p, position_bias is not None)
    if q.numel() == 0:  # B, N or H is 0: nothing to attend, an empty output (autograd reaches q, k, v)
        return (q + k + v) * 0.0
    # a segment longer than the sequence is one segment [0, N): lengths past any real N (whose
    # strided views would overflow) run as N
    segment_lengths = [
        w if w <= _LONGEST_SEGMENT else max(q.shape[1], r)
        for w, r in zip(segment_lengths, dilation_rates, strict=True)
    ]
    if backend == "reference":
        return dilated_attention_reference(
            q, k, v, segment_lengths, dilation_rates, is_causal=is_causal,
            key_padding_mask=key_padding_mask, position_bias=position_bias, softmax_scale=softmax_scale,
            dropout_p=dropout_p,
        )  # fmt: skip
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if runs_dense(q, segment_lengths, dilation_rates):
        out = _dense_attention(
            q, k, v, key_padding_mask, segment_lengths, dilation_rates, bool(is_causal), scale
        )
    else:
        out = DilatedAttentionFunction.apply(
            q, k, v, key_padding_mask, segment_lengths, dilation_rates, bool(is_causal), scale, backend
        )
    if q.device.type != "cpu":  # the CUDA kernels give such rows NaN themselves
        return out
    # NaN policy (as the reference): a query row holding NaN or inf outputs NaN (PyTorch's CPU flash
    # kernel returns zeros for it); one pass over q, no host sync
    return out.masked_fill(~torch.isfinite(q).all(-1, keepdim=True), float("nan"))
