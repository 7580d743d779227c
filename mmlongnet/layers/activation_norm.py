"""Activation then LayerNorm in one pass each way: the middle of the MAGNETO feed-forward block.

Legend: F features (the last dim); a row is one (F,) vector of a (..., F) tensor.

    y = LayerNorm(act(x)) = (act(x) - mean) * rstd * weight + bias,   act in {gelu, relu, silu}

computed in float32 (float64 for float64 inputs) and returned in x's dtype. In plain PyTorch (and
as `torch.compile` generated it on an H200) the activation and the norm cost several passes over
the (tokens, F) hidden tensor each way, with the activation evaluated again in each: at 32K tokens
x 3072 features the compiled GELU + sub-LayerNorm took 0.43 ms forward and 0.67 ms backward, several
times their memory traffic. Here a Triton kernel reads each row of x once and writes y (and the
row's mean and rstd) once; the backward kernel reads x and dy once, writes dx, and sums the
weight and bias gradients per program, which one small sum finishes: 0.26 ms forward and 0.42 ms
backward at the same size (`benchmarks/results/longnet_h200_compiled_fused_ffn.json`).

Under `torch.compile`, `activation_layer_norm` is an opaque op (`torch.ops.mmlongnet.activation_layer_norm`)
with its own backward op, so a compiled model calls the kernels as they are; eager calls run the same
computation through an autograd function, without the ops' dispatch cost. It runs the kernels on CUDA
tensors of float32, float16 or bfloat16 with up to `MAX_FEATURES` features when Triton is
installed (or, in Triton's interpreter, TRITON_INTERPRET=1, on CPU tensors: how the CPU tests
check them), and the plain-PyTorch twin otherwise.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with PyTorch's CUDA wheels; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2}  # the kernels' ACTIVATION constant
MAX_FEATURES = 16384  # widest row the kernels hold in registers; wider rows run the twin
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows one backward program handles: its partial weight and bias gradients, (rows / 32, F) in
# float32, are 1/16 of a bfloat16 x's size, and one sum over them finishes the gradients.
BACKWARD_ROWS = 32


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return torch.nn.functional.gelu(x)
    if activation == "relu":
        return torch.relu(x)
    return torch.nn.functional.silu(x)


def _activation_slope(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx, elementwise."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * torch.exp(-0.5 * x * x)  # Phi(x) + x phi(x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    sigmoid = torch.sigmoid(x)
    return sigmoid * (1.0 + x * (1.0 - sigmoid))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_twin(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (..., F) -> y (..., F) in x's dtype, mean and rstd (...) in the compute dtype."""
    compute = _compute_dtype(x.dtype)
    hidden = _activate(x.to(compute), activation)  # (..., F)
    mean = hidden.mean(-1, keepdim=True)
    centred = hidden - mean
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    y = centred * rstd * weight.to(compute) + bias.to(compute)
    return y.to(x.dtype).contiguous(), mean.squeeze(-1), rstd.squeeze(-1)


def _backward_twin(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """grad, x: (..., F); mean, rstd: (...) -> dx (..., F) in x's dtype, dweight and dbias (F,) in
    the weight's dtype."""
    compute = mean.dtype
    x_c, dy = x.to(compute), grad.to(compute)
    normed = (_activate(x_c, activation) - mean[..., None]) * rstd[..., None]  # (..., F)
    scaled = dy * weight.to(compute)
    d_hidden = (
        scaled - scaled.mean(-1, keepdim=True) - normed * (scaled * normed).mean(-1, keepdim=True)
    ) * rstd[..., None]
    dx = d_hidden * _activation_slope(x_c, activation)
    features = x.shape[-1]
    d_weight = (dy * normed).reshape(-1, features).sum(0)  # (F,)
    d_bias = dy.reshape(-1, features).sum(0)
    return dx.to(x.dtype).contiguous(), d_weight.to(weight.dtype), d_bias.to(weight.dtype)


if triton is not None:

    @triton.jit
    def _activate_rows(x, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACTIVATION == 1:
            return tl.maximum(x, 0.0)
        else:
            return x * tl.sigmoid(x)

    @triton.jit
    def _activation_slope_rows(x, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        elif ACTIVATION == 1:
            return tl.where(x > 0.0, 1.0, 0.0)
        else:
            sigmoid = tl.sigmoid(x)
            return sigmoid * (1.0 + x * (1.0 - sigmoid))

    @triton.jit(do_not_specialize=["rows"])
    def _activation_norm_forward(
        x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, rows, features, eps,
        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One program per row: y = LayerNorm(act(x)) of row `program_id`."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < features
        x = tl.load(x_ptr + row * features + cols, mask=inside, other=0.0).to(tl.float32)
        hidden = tl.where(inside, _activate_rows(x, ACTIVATION), 0.0)
        mean = tl.sum(hidden, axis=0) / features
        centred = tl.where(inside, hidden - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / features + eps)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        y = centred * rstd * weight + bias
        tl.store(y_ptr + row * features + cols, y.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit(do_not_specialize=["rows"])
    def _activation_norm_backward(
        grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, d_weight_ptr, d_bias_ptr, rows, features,
        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        """Program p: dx of rows [p * ROWS, (p + 1) * ROWS) and those rows' sums of the weight and
        bias gradients, into row p of (programs, F) partial sums."""
        program = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < features
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        d_weight = tl.zeros([BLOCK], dtype=tl.float32)
        d_bias = tl.zeros([BLOCK], dtype=tl.float32)
        first = program * ROWS
        for step in tl.range(0, ROWS):
            row = first + step
            mask = inside & (row < rows)
            x = tl.load(x_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_ptr + row * features + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row, mask=row < rows, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
            normed = tl.where(mask, (_activate_rows(x, ACTIVATION) - mean) * rstd, 0.0)
            scaled = dy * weight
            mean_scaled = tl.sum(scaled, axis=0) / features
            mean_projection = tl.sum(scaled * normed, axis=0) / features
            d_hidden = (scaled - mean_scaled - normed * mean_projection) * rstd
            dx = d_hidden * _activation_slope_rows(x, ACTIVATION)
            tl.store(dx_ptr + row * features + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            d_weight += dy * normed
            d_bias += dy
        tl.store(d_weight_ptr + program * features + cols, d_weight, mask=inside)
        tl.store(d_bias_ptr + program * features + cols, d_bias, mask=inside)


def kernels_take(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the Triton kernels run for these tensors (else the twin does)."""
    return (
        triton is not None
        and x.device.type == ("cpu" if INTERPRETED else "cuda")
        and x.dtype in KERNEL_DTYPES
        and weight.dtype in KERNEL_DTYPES
        and bias.dtype in KERNEL_DTYPES
        and 0 < x.shape[-1] <= MAX_FEATURES
        and x.numel() > 0
        and weight.device == x.device
        and bias.device == x.device
    )


def _launch_shape(features: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `features` elements."""
    block = triton.next_power_of_2(features)
    return block, min(16, max(1, block // 512))


def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., F), weight and bias (F,) -> y (..., F) in x's dtype, mean and rstd (...) (float32;
    float64 for float64 x): the kernel where it runs, else the twin."""
    if not kernels_take(x, weight, bias):
        return _forward_twin(x, weight, bias, eps, activation)
    features = x.shape[-1]
    x_rows = x.contiguous()
    rows = x_rows.numel() // features
    y = torch.empty_like(x_rows)
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block, warps = _launch_shape(features)
    _activation_norm_forward[(rows,)](
        x_rows, weight.contiguous(), bias.contiguous(), y, mean, rstd, rows, features, eps,
        ACTIVATION=ACTIVATION_CODES[activation], BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return y, mean, rstd


@torch.library.custom_op("mmlongnet::activation_layer_norm", mutates_args=())
def activation_layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op of `activation_layer_norm` (arguments checked there), as `_forward`."""
    return _forward(x, weight, bias, eps, activation)


@activation_layer_norm_op.register_fake
def _activation_layer_norm_fake(x, weight, bias, eps, activation):
    stats = x.new_empty(x.shape[:-1], dtype=_compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of `_forward`: grad, x (..., F); mean, rstd (...) as the forward returned them
    -> dx (..., F) in x's dtype, dweight and dbias (F,) in the weight's dtype."""
    if not (kernels_take(x, weight, weight) and mean.dtype == torch.float32 and grad.dtype in KERNEL_DTYPES):
        return _backward_twin(grad, x, weight, mean, rstd, activation)
    features = x.shape[-1]
    x_rows, grad_rows = x.contiguous(), grad.contiguous()
    rows = x_rows.numel() // features
    programs = triton.cdiv(rows, BACKWARD_ROWS)
    dx = torch.empty_like(x_rows)
    partial_weight = x.new_empty((programs, features), dtype=torch.float32)
    partial_bias = torch.empty_like(partial_weight)
    block, warps = _launch_shape(features)
    _activation_norm_backward[(programs,)](
        grad_rows, x_rows, weight.contiguous(), mean.contiguous(), rstd.contiguous(), dx, partial_weight,
        partial_bias, rows, features, ACTIVATION=ACTIVATION_CODES[activation], BLOCK=block,
        ROWS=BACKWARD_ROWS, num_warps=warps,
    )  # fmt: skip
    return dx, partial_weight.sum(0).to(weight.dtype), partial_bias.sum(0).to(weight.dtype)


@torch.library.custom_op("mmlongnet::activation_layer_norm_backward", mutates_args=())
def activation_layer_norm_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Raw op of the gradients of `activation_layer_norm_op`, as `_backward`."""
    return _backward(grad, x, weight, mean, rstd, activation)


@activation_layer_norm_backward_op.register_fake
def _activation_layer_norm_backward_fake(grad, x, weight, mean, rstd, activation):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, torch.empty_like(weight), torch.empty_like(weight)


def _save(ctx, x, weight, mean, rstd, activation) -> None:
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.activation = activation


def _gradients(ctx, grad_y, backward) -> tuple:
    """(dx, dweight, dbias, None, None) of the forward `_save` saved, by `backward` (op or twin)."""
    x, weight, mean, rstd = ctx.saved_tensors
    return (*backward(grad_y, x, weight, mean, rstd, ctx.activation), None, None)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, _eps, activation = inputs
    _y, mean, rstd = output
    _save(ctx, x, weight, mean, rstd, activation)


def _op_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    return _gradients(ctx, grad_y, activation_layer_norm_backward_op)


activation_layer_norm_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerActivationLayerNorm(torch.autograd.Function):
    """The op's computation without the custom-op dispatch, for eager calls: on an H200 the
    dispatch of the two ops cost more host time than an 8K x 3072 call's kernels take on the GPU
    (`benchmarks/results/feedforward_h200.json`), and eager steps of that size wait on the host."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, activation):
        y, mean, rstd = _forward(x, weight, bias, eps, activation)
        _save(ctx, x, weight, mean, rstd, activation)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward)


def activation_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, activation: str = "gelu"
) -> torch.Tensor:
    """LayerNorm(act(x)) over the last dim, in float32 (float64 for float64 x), returned in x's dtype.

    Args:
        x: (..., F).
        weight, bias: (F,), the LayerNorm's affine parameters.
        eps: the LayerNorm's epsilon.
        activation: "gelu" (exact, erf), "relu" or "silu".

    Returns y (..., F) in x's dtype. Differentiable in x, weight and bias. Under autocast, pass the
    matmul's low-precision output as it is: the kernels read it once and compute in float32.
    """
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    if x.dim() == 0 or weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(
            "weight and bias must have shape (F,) for x of shape (..., F); got x "
            f"{tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}"
        )
    if not (x.is_floating_point() and weight.is_floating_point() and bias.is_floating_point()):
        raise TypeError(
            f"x, weight and bias must be floating point; got {x.dtype}, {weight.dtype}, {bias.dtype}"
        )
    if torch.compiler.is_compiling():  # the opaque op: compiled graphs call the kernels as they are
        return activation_layer_norm_op(x, weight, bias, float(eps), activation)[0]
    return _EagerActivationLayerNorm.apply(x, weight, bias, float(eps), activation)
