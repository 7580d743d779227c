"""Dense attention kernels behind the dilated-attention op, each with forward and backward.

Every kernel takes one branch call's rows in the layout (b, c, h, D): b = B * segments,
c rows per segment, h heads. Its forward returns the output (b, c, h, D) and the log-sum-exp
of the scores (b, c, h) in float32 (float64 for float64 inputs). Its backward takes an output
and a log-sum-exp from outside — the MERGED ones of all branches — so that it recomputes the
branch's probabilities as part of the one softmax over all branches, which makes dq, dk, dv
exact for the mixture (the scheme of ring attention).

`bias` is an additive key bias (b, c) in the input dtype (0 for a key, -inf for padding) or None.
A row whose log-sum-exp is +inf gets probability 0 everywhere in the backward: that is how the
caller silences rows with no valid key.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

aten = torch.ops.aten

KernelForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
KernelBackward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Kernel:
    """A dense attention kernel: name, forward, backward, and whether it takes a key bias."""

    name: str
    forward: KernelForward
    backward: KernelBackward
    takes_bias: bool


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(b, c, h, D) -> (b, h, c, D) views, the layout of PyTorch's attention ops."""
    return [t.transpose(1, 2) for t in tensors]


def _dense_heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(b, c, h, D) -> (b, h, c, D) over dense (b, c, h, D) storage: the layout a backward kernel
    expects for the output and its gradient (cuDNN reads both with the output's strides)."""
    return [t.contiguous().transpose(1, 2) for t in tensors]


def _expanded_bias(bias: torch.Tensor | None, heads: int, rows: int) -> torch.Tensor | None:
    """(b, c) key bias -> (b, h, c, c) broadcast view (stride 0 over heads and query rows)."""
    if bias is None:
        return None
    return bias[:, None, None, :].expand(bias.shape[0], heads, rows, bias.shape[1])


def _lse_rows_last(lse: torch.Tensor, rows: int) -> torch.Tensor:
    """A kernel's (b, h, c[, 1]) or row-padded log-sum-exp -> (b, c, h) float."""
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :rows]
    return lse.transpose(1, 2)


# --- CPU: PyTorch's flash-attention CPU kernel -------------------------------------------------


def _cpu_forward(q, k, v, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        qh, kh, vh, 0.0, is_causal, attn_mask=_expanded_bias(bias, qh.shape[1], qh.shape[2]), scale=scale
    )
    return out.transpose(1, 2), _lse_rows_last(lse, qh.shape[2])


def _cpu_backward(dout, q, k, v, out, lse, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _dense_heads_first(dout, out)
    grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        douth,
        qh,
        kh,
        vh,
        outh,
        lse.to(q.dtype).transpose(1, 2).contiguous(),
        0.0,
        is_causal,
        attn_mask=_expanded_bias(bias, qh.shape[1], qh.shape[2]),
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)


# --- CUDA: cuDNN, flash and memory-efficient attention ops of PyTorch --------------------------


def _cuda_empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=like.device)


def _cudnn_forward(q, k, v, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_cudnn_attention(
        qh, kh, vh, _expanded_bias(bias, qh.shape[1], qh.shape[2]), True, 0.0, is_causal, False, scale=scale
    )
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _cudnn_backward(dout, q, k, v, out, lse, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _dense_heads_first(dout, out)
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


def _flash_forward(q, k, v, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, is_causal, False, scale=scale)
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _flash_backward(dout, q, k, v, out, lse, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    douth, outh = _dense_heads_first(dout, out)
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
    rows = bias.shape[1]
    padded = bias.new_zeros(bias.shape[0], -(-rows // 8) * 8)
    padded[:, :rows] = bias
    return _expanded_bias(padded[:, :rows], heads, rows)


def _efficient_forward(q, k, v, bias, is_causal, scale):
    qh, kh, vh = _heads_first(q, k, v)
    result = aten._scaled_dot_product_efficient_attention(
        qh, kh, vh, _aligned_bias(bias, qh.shape[1]), True, 0.0, is_causal, scale=scale
    )
    return result[0].transpose(1, 2), _lse_rows_last(result[1], qh.shape[2])


def _efficient_backward(dout, q, k, v, out, lse, bias, is_causal, scale):
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


CPU = Kernel("cpu_flash", _cpu_forward, _cpu_backward, takes_bias=True)
CUDNN = Kernel("cudnn", _cudnn_forward, _cudnn_backward, takes_bias=True)
CUDA_FLASH = Kernel("cuda_flash", _flash_forward, _flash_backward, takes_bias=False)
EFFICIENT = Kernel("efficient", _efficient_forward, _efficient_backward, takes_bias=True)

KERNELS = {kernel.name: kernel for kernel in (CPU, CUDNN, CUDA_FLASH, EFFICIENT)}


def kernel_chain(device: torch.device, dtype: torch.dtype, has_bias: bool) -> list[Kernel]:
    """The kernels of the "sdpa" backend, fastest first; later ones take shapes the first refuses.

    On CUDA: cuDNN attention (fastest measured on H100), then PyTorch's flash kernel (no key
    bias), then its memory-efficient kernel (the only one of the three for float32).
    """
    if device.type != "cuda":
        return [CPU]
    chain = [CUDNN, CUDA_FLASH] if dtype in (torch.float16, torch.bfloat16) else []
    chain.append(EFFICIENT)
    return [kernel for kernel in chain if kernel.takes_bias or not has_bias]


_refused: set[tuple] = set()


def run_chain(chain: list[Kernel], method: str, shape_key: tuple, *args):
    """Call `method` ("forward"/"backward") of the first kernel of `chain` that takes this shape.

    A kernel that raises for a shape is remembered and skipped for that shape afterwards.
    """
    errors = []
    for kernel in chain:
        key = (kernel.name, method, shape_key)
        if key in _refused:
            continue
        try:
            return getattr(kernel, method)(*args)
        except torch.OutOfMemoryError:
            raise  # out of memory is not a refusal of the shape
        except RuntimeError as error:
            if len(chain) == 1:
                raise
            _refused.add(key)
            errors.append(f"{kernel.name}: {error}")
            warnings.warn(
                f"dilated_attention: the {kernel.name} kernel refused a {method} call of shape {shape_key}; "
                f"using the next kernel for this shape ({str(error).splitlines()[0][:200]})",
                stacklevel=2,
            )
    raise RuntimeError("no attention kernel accepted this call:\n" + "\n".join(errors))
