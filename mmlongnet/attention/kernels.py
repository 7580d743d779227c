"""Dense attention kernels behind the dilated-attention op, each with forward and backward.

Every kernel takes one branch call's rows in the layout (b, c, h, D): b = B * segments,
c rows per segment, h heads. Its forward returns the output (b, c, h, D) and the log-sum-exp
of the scores (b, c, h) in float32 (float64 for float64 inputs). Its backward takes an output
and a log-sum-exp from outside — the MERGED ones of all branches — so that it recomputes the
branch's probabilities as part of the one softmax over all branches, which makes dq, dk, dv
exact for the mixture (the scheme of ring attention).

`into`, the last argument of both, is None or buffers the result may be written to: the output
(b, c, h, D) for the forward, (dq, dk, dv) for the backward, strided views of the op's own
output and gradients. A kernel that can write there (flash-attn's) does so and returns them; the
others ignore them and return new tensors, which the caller copies.

`bias` is an additive key bias in the input dtype (0 for a key, -inf for padding), (b, c) for all
heads alike or (b, c, h) per head, or None.
A row whose keys are all padding gets a finite output from the forward (its log-sum-exp there is
unspecified: the caller sets it to -inf, which weights that output by 0). A row whose log-sum-exp
is +inf gets probability 0 everywhere in the backward: that is how the caller silences rows with
no valid key.

Which kernel of a chain runs a call is `KernelSelector`'s choice: none that builds a plan per
shape (cuDNN) for a shape seen for the first time. A call's shape key holds what cuDNN keys its
plans on: dtype, shape and the strides of q, k and v (rows of one shape over a longer sequence
have other strides and need another plan).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

aten = torch.ops.aten

KernelForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
KernelBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Kernel:
    """A dense attention kernel: name, forward, backward, whether it takes a key bias, and whether
    it builds an execution plan for every new input shape (cuDNN: ~144 ms per forward + backward
    the first time a shape is seen on an H200, ~0.4 ms once planned)."""

    name: str
    forward: KernelForward
    backward: KernelBackward
    takes_bias: bool
    plans_per_shape: bool = False
    # compiles a variant on its first call of one (flash-attn 4's JIT): while a CUDA graph records,
    # it runs only the shapes it has run before, eagerly (`KernelSelector.order`)
    compiles_on_first_call: bool = False


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(b, c, h, D) -> (b, h, c, D) views, the layout of PyTorch's attention ops."""
    return [t.transpose(1, 2) for t in tensors]


def _dense_heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(b, c, h, D) -> (b, h, c, D) over dense (b, c, h, D) storage: the layout the memory-efficient
    kernel's backward needs for the output and its gradient (it gives a wrong dq on strided ones)."""
    return [t.contiguous().transpose(1, 2) for t in tensors]


def _alike_heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(b, c, h, D) -> (b, h, c, D) views of the output and its gradient in one layout, for the
    backward kernels that read both with the output's strides (cuDNN, flash): as they are where
    they share their strides (views of the op's output and gradient at the same rows), else over
    dense copies."""
    if all(t.stride() == tensors[0].stride() and t.stride(-1) == 1 for t in tensors):
        return _heads_first(*tensors)
    return _dense_heads_first(*tensors)


def _keys_last(bias: torch.Tensor) -> torch.Tensor:
    """(b, c) or per-head (b, c, h) key bias -> (b, 1 or h, c), contiguous over the keys (cuDNN
    reads a bias whose keys are strided from misaligned addresses)."""
    return bias.transpose(1, 2).contiguous() if bias.dim() == 3 else bias[:, None, :]


def _broadcast(per_head: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """(b, 1 or h, c) key bias -> (b, h, c, c) view, stride 0 over the query rows (and the heads)."""
    return per_head[:, :, None, :].expand(per_head.shape[0], heads, rows, per_head.shape[-1])


def _expanded_bias(bias: torch.Tensor | None, heads: int, rows: int) -> torch.Tensor | None:
    """(b, c) or per-head (b, c, h) key bias -> (b, h, c, c) broadcast view (stride 0 over the query
    rows, and over the heads for (b, c))."""
    return None if bias is None else _broadcast(_keys_last(bias), heads, rows)


def _lse_rows_last(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """A kernel's (b, h, c[, 1]) or row-padded log-sum-exp -> (b, c, h) float."""
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :rows]
    return lse.transpose(1, 2)


# --- CPU: PyTorch's flash-attention CPU kernel -------------------------------------------------


def _cpu_forward(q, k, v, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, is_causal, attn_mask=_expanded_bias(bias, qh.shape[1], qh.shape[2]), scale=scale
    )
    return out.transpose(1, 2), _lse_rows_last(lse, qh.shape[2])


def _cpu_backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _alike_heads_first(dout, out)
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        douth,
        qh,
        kh,
        vh,
        outh,
        lse.transpose(1, 2).contiguous(),  # float32 (float64 for float64 inputs), as the forward gave it
        0.0,
        is_causal,
        attn_mask=_expanded_bias(bias, qh.shape[1], qh.shape[2]),
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)


# --- CUDA: cuDNN, flash and memory-efficient attention ops of PyTorch --------------------------


def _cuda_empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=like.device)


def _cudnn_forward(q, k, v, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_cudnn_attention(
        qh, kh, vh, _expanded_bias(bias, qh.shape[1], qh.shape[2]), True, 0.0, is_causal, False, scale=scale
    )
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _cudnn_backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _alike_heads_first(dout, out)
    rows = qh.shape[2]
    empty = _cuda_empty(q)
    grads = aten._scaled_dot_product_cudnn_attention_backward(
        douth,
        qh,
        kh,
        vh,
        outh,
        lse.transpose(1, 2).contiguous().unsqueeze(-1),
        empty,
        empty,
        _expanded_bias(bias, qh.shape[1], rows),
        None,
        None,
        rows,
        rows,
        0.0,
        is_causal,
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)


def _flash_forward(q, k, v, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, is_causal, False, scale=scale)
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _flash_backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _alike_heads_first(dout, out)
    rows = qh.shape[2]
    empty = _cuda_empty(q)
    grads = aten._scaled_dot_product_flash_attention_backward(
        douth, qh, kh, vh, outh, lse.transpose(1, 2).contiguous(), None, None, rows, rows, 0.0,
        is_causal, empty, empty, scale=scale,
    )  # fmt: skip
    return tuple(g.transpose(1, 2) for g in grads)


def _aligned_bias(bias: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """The memory-efficient kernel wants the bias rows 8-element aligned: pad the storage."""
    if bias is None:
        return None
    per_head = _keys_last(bias)  # (b, 1 or h, c)
    keys = per_head.shape[-1]
    padded = per_head.new_zeros(*per_head.shape[:-1], -(-keys // 8) * 8)
    padded[..., :keys] = per_head
    return _broadcast(padded[..., :keys], heads, keys)


def _efficient_forward(q, k, v, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_efficient_attention(
        qh, kh, vh, _aligned_bias(bias, qh.shape[1]), True, 0.0, is_causal, scale=scale
    )
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _efficient_backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _dense_heads_first(dout, out)
    rows = qh.shape[2]
    lse = F.pad(lse.transpose(1, 2), (0, -(-rows // 32) * 32 - rows)).contiguous()  # row-padded layout
    empty = _cuda_empty(q)
    grads = aten._scaled_dot_product_efficient_attention_backward(
        douth, qh, kh, vh, _aligned_bias(bias, qh.shape[1]), outh, lse, empty, empty, 0.0,
        [True, True, True, False], is_causal, scale=scale,
    )  # fmt: skip
    return tuple(g.transpose(1, 2) for g in grads[:3])


def aligned_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`bias` (broadcastable to (B, H, N, M)) as `biased_attention` takes it for q (B, H, N, D) and
    k (B, H, M, D): in q's dtype, expanded to (B, H, N, M) without a copy where it broadcasts, its
    rows 8-element aligned in storage (copied into padded rows where they are not)."""
    batch, heads, rows, _ = q.shape
    keys = k.shape[2]
    bias = bias.to(q.dtype)
    if bias.stride(-1) != 1 or any(s % 8 for s in bias.stride()[:-1] if s) or bias.storage_offset() % 8:
        bias = F.pad(bias, (0, -keys % 8))[..., :keys]  # a fresh tensor: rows of ceil(M / 8) * 8
    while bias.dim() < 4:
        bias = bias[None]
    return bias.expand(batch, heads, rows, keys)


def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One dense attention call with an additive score bias, differentiable by autograd.

    q, k, v: (B, H, N, D); bias: (B or 1, H, N, N) in q's dtype (stride 0 over a broadcast batch
    allowed), its rows 8-element aligned in storage, no row all -inf. Returns (B, H, N, D).
    On CUDA PyTorch's memory-efficient kernel (no plan per shape, any bias); elsewhere
    `F.scaled_dot_product_attention`. Runs in q's dtype under autocast too, as the op's branch
    calls do (autocast would cast q, k, v but not the bias).
    """
    with torch.autocast(q.device.type, enabled=False):
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # for the backward
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, needs_lse, 0.0, False, scale=scale
        )[0]


CPU = Kernel("cpu_flash", _cpu_forward, _cpu_backward, takes_bias=True)
CUDNN = Kernel("cudnn", _cudnn_forward, _cudnn_backward, takes_bias=True, plans_per_shape=True)
CUDA_FLASH = Kernel("cuda_flash", _flash_forward, _flash_backward, takes_bias=False)
EFFICIENT = Kernel("efficient", _efficient_forward, _efficient_backward, takes_bias=True)

KERNELS = {kernel.name: kernel for kernel in (CPU, CUDNN, CUDA_FLASH, EFFICIENT)}


def kernel_chain(
    device: torch.device, dtype: torch.dtype, has_bias: bool, rows: int | None = None
) -> list[Kernel]:
    """The kernels of the "sdpa" backend, fastest first; later ones take shapes the first refuses.

    On CUDA: cuDNN attention (fastest measured on H100), then PyTorch's flash kernel (no key
    bias), then its memory-efficient kernel (the only one of the three for float32).
    `KernelSelector` decides per call which of them runs. `rows`: the call's rows per segment,
    when known; cuDNN refuses calls of one row ("s_q = s_kv = 1 is not supported"), so it is left
    out of those.
    """
    if device.type != "cuda":
        return [CPU]
    half = dtype in (torch.float16, torch.bfloat16)
    chain = ([CUDNN] if half and rows != 1 else []) + ([CUDA_FLASH] if half else [])
    chain.append(EFFICIENT)
    return [kernel for kernel in chain if kernel.takes_bias or not has_bias]


# A shape's cuDNN plan costs ~144 ms once; on the dilated strided rows cuDNN is then much faster than
# the plan-free kernels (H200, LongNet-base step at 32K tokens: 179 ms on cuDNN, 302 ms plan-free).
# A shape seen 16 times recurs (a bucketed shape reaches this within one or two steps of a 12-layer
# model), and its plan pays for itself within a few steps; a one-off length never builds one.
PROMOTE_AFTER = 16
RETRY_AFTER = 256  # later calls of a (method, shape) for which a kernel that raised is skipped
MAX_ENTRIES = 4096  # (method, shape) call counts, and refusal records, each kept for at most this many


def _put(table: OrderedDict, key: tuple, value: int, max_entries: int) -> None:
    """table[key] = value as its most recent entry, evicting the least recent beyond max_entries."""
    table[key] = value
    table.move_to_end(key)
    if len(table) > max_entries:
        table.popitem(last=False)


class KernelSelector:
    """Which kernel of a chain runs each call, so that no execution plan is built for a new shape.

    A (method, shape) call takes the chain's plan-free kernels first (on CUDA: flash without a key
    bias in 16-bit, memory-efficient otherwise) until it has been seen `promote_after` times; from
    then on it takes the chain in its own order, so cuDNN builds its plan once, for a shape that
    recurs. A planning kernel still runs a new shape that every plan-free kernel refuses. Inside
    CUDA-graph capture a shape is not promoted (its plan would be built during the capture); one
    promoted in an eager call before runs on its plan. Inside `promoting()` every shape is promoted
    at its first call: for the eager step before a capture. While a capture records, a kernel that
    compiles on its first call of a variant (`Kernel.compiles_on_first_call`) runs only the
    (method, shape)s it has run eagerly before (the `ran` table), so that nothing compiles inside the
    recording.

    A kernel that raises a RuntimeError (out of memory excepted, which propagates) is skipped for
    that (method, shape) during its next `retry_after` calls, then tried again; it warns once per
    (kernel, method, shape) while the refusal stands. Both the call counts and the refusal records
    are LRU tables of at most `max_entries` entries each.
    """

    def __init__(
        self,
        promote_after: int = PROMOTE_AFTER,
        retry_after: int = RETRY_AFTER,
        max_entries: int = MAX_ENTRIES,
    ):
        settings = {"promote_after": promote_after, "retry_after": retry_after, "max_entries": max_entries}
        for name, value in settings.items():
            if value < 1:
                raise ValueError(f"KernelSelector: {name} must be >= 1, got {value}")
        self.promote_after, self.retry_after, self.max_entries = promote_after, retry_after, max_entries
        self.calls: OrderedDict[tuple, int] = OrderedDict()  # (method, shape key) -> calls so far
        self.refusals: OrderedDict[tuple, int] = OrderedDict()  # (kernel, method, shape) -> calls to skip
        self.ran: OrderedDict[tuple, int] = OrderedDict()  # (kernel, method, shape) run eagerly -> 1
        self.promote_now = False  # inside `promoting()`; an attribute, read by autograd's threads too

    @contextmanager
    def promoting(self) -> Iterator[None]:
        """Calls inside take their chain in its own order at once, as if their shape had recurred
        `promote_after` times: planning kernels build their plans now (or refuse the shape now).
        For an eager step that a CUDA graph records next (`GraphedSteps` runs the last warm-up
        step of a signature so): the recording then runs every shape on its fastest kernel."""
        outer, self.promote_now = self.promote_now, True
        try:
            yield
        finally:
            self.promote_now = outer  # nested: the outer context still promotes

    def clear(self) -> None:
        """Forget every call count, refusal and eager run: every shape is new again."""
        self.calls.clear()
        self.refusals.clear()
        self.ran.clear()

    def recording_next(self) -> bool:
        """Whether this call is recorded into a CUDA graph now, or in an eager step that one records
        next (`promoting()`): where per-call host work costs nothing at replay."""
        return self.promote_now or _capturing()

    def order(self, chain: list[Kernel], method: str, shape_key: tuple) -> list[Kernel]:
        """Count this call of (method, shape) and return the kernels to try for it, in order."""
        key = (method, shape_key)
        calls = self.calls.get(key, 0) + 1
        if self.promote_now:
            calls = max(calls, self.promote_after)
        _put(self.calls, key, calls, self.max_entries)
        # While a CUDA graph is being captured no plan may be built (a shape promoted only now waits)
        # and nothing compiled (a compiling kernel takes the shapes it has run before only).
        capturing = _capturing()
        if capturing:
            chain = [k for k in chain if not k.compiles_on_first_call or (k.name, *key) in self.ran]
        if calls >= self.promote_after and not (capturing and calls - 1 < self.promote_after):
            return chain
        return [k for k in chain if not k.plans_per_shape] + [k for k in chain if k.plans_per_shape]

    def _skips(self, key: tuple) -> bool:
        """Whether a refusal record makes this call skip the kernel (and count the skip)."""
        left = self.refusals.get(key)
        if not left:
            return False
        _put(self.refusals, key, left - 1, self.max_entries)
        return True

    def run(self, chain: list[Kernel], method: str, shape_key: tuple, *args):
        """Call `method` ("forward"/"backward") of the first kernel of `order(...)` that takes it."""
        errors = []
        for kernel in self.order(chain, method, shape_key):
            key = (kernel.name, method, shape_key)
            if self._skips(key):
                continue
            try:
                result = getattr(kernel, method)(*args)
            except torch.OutOfMemoryError:
                raise  # out of memory is not a refusal of the shape
            except RuntimeError as error:
                if len(chain) == 1:
                    raise
                if key not in self.refusals:
                    warnings.warn(
                        f"dilated_attention: the {kernel.name} kernel refused a {method} call of shape "
                        f"{shape_key}; using the next kernel for this shape's next {self.retry_after} "
                        f"calls ({str(error).splitlines()[0][:200]})",
                        stacklevel=2,
                    )
                _put(self.refusals, key, self.retry_after, self.max_entries)
                errors.append(f"{kernel.name}: {error}")
                continue
            self.refusals.pop(key, None)  # accepted on its retry
            if kernel.compiles_on_first_call and not _capturing():
                _put(self.ran, key, 1, self.max_entries)
            return result
        raise RuntimeError("no attention kernel accepted this call:\n" + "\n".join(errors))


def _capturing() -> bool:
    """Whether the current CUDA stream is recording a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


SELECTOR = KernelSelector()  # the one the dilated-attention op uses
