"""`activation_layer_norm`: its plain-PyTorch twin against autograd of the composition, the Triton
kernels against the twin (on a GPU, and on the CPU in Triton's interpreter: a subprocess with
TRITON_INTERPRET=1 runs this file's kernel tests), and `FeedForward` on the kernels."""

import pytest
import torch
import torch.nn.functional as F

from mmlongnet.layers import FeedForward, activation_layer_norm
from mmlongnet.layers import activation_norm as module
from tests.triton_kernels import kernel_device, kernel_test, run_interpreted

DEVICE = kernel_device(module)  # where the kernels run in this process
kernels = kernel_test(module)
FUNCTIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def composition(x, weight, bias, activation, eps=1e-5):
    return F.layer_norm(FUNCTIONS[activation](x), x.shape[-1:], weight, bias, eps)


@pytest.mark.parametrize("activation", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(3, 5, 20), (7, 33), (20,)])
def test_the_twin_is_layer_norm_of_the_activation_with_its_gradients(activation, shape):
    """On the CPU the op runs its twin: values and every gradient against autograd of
    `layer_norm(act(x))`, float64."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
    assert not module.kernels_take(x, weight, bias)
    got = activation_layer_norm(x, weight, bias, 1e-5, activation)
    want = composition(x, weight, bias, activation)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (x, weight, bias), grad)
    want_grads = torch.autograd.grad(want, (x, weight, bias), grad)
    for name, a, b in zip(("x", "weight", "bias"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_low_precision_inputs_are_computed_in_float32_and_returned_in_their_dtype():
    torch.manual_seed(0)
    x = torch.randn(4, 64).to(torch.bfloat16)
    weight, bias = torch.randn(64), torch.randn(64)
    y = activation_layer_norm(x, weight, bias)
    assert y.dtype == torch.bfloat16
    want = composition(x.float(), weight, bias, "gelu")  # no rounding between activation and norm
    torch.testing.assert_close(y.float(), want, rtol=8e-3, atol=8e-3)


def test_eager_calls_skip_the_op_dispatch_and_give_the_op_s_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    eager = activation_layer_norm(x, weight, bias, 1e-5, "gelu")
    assert type(eager.grad_fn).__name__ == "_EagerActivationLayerNormBackward"
    op = torch.ops.mmlongnet.activation_layer_norm(x, weight, bias, 1e-5, "gelu")[0]
    torch.testing.assert_close(eager, op, rtol=0, atol=0)
    grad = torch.randn(5, 12, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(eager, (x, weight, bias), grad),
        torch.autograd.grad(op, (x, weight, bias), grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_ops_pass_opcheck():
    torch.manual_seed(0)
    x = torch.randn(6, 24, requires_grad=True)
    weight, bias = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.mmlongnet.activation_layer_norm, (x, weight, bias, 1e-5, "silu"))
    _, mean, rstd = torch.ops.mmlongnet.activation_layer_norm(x.detach(), weight, bias, 1e-5, "silu")
    grad = torch.randn(6, 24)
    torch.library.opcheck(
        torch.ops.mmlongnet.activation_layer_norm_backward,
        (grad, x.detach(), weight.detach(), mean.detach(), rstd.detach(), "silu"),
    )


def test_bad_arguments_say_what_is_wrong():
    x, weight = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_layer_norm(x, weight, weight, activation="tanh")
    with pytest.raises(ValueError, match=r"shape \(F,\)"):
        activation_layer_norm(x, torch.randn(7), weight)
    with pytest.raises(TypeError, match="floating point"):
        activation_layer_norm(torch.ones(3, 8, dtype=torch.long), weight, weight)


def _kernel_case(shape, dtype, activation, contiguous=True):
    torch.manual_seed(0)
    features = shape[-1]
    x = (2 * torch.randn(*shape[:-1], features + (0 if contiguous else 5), device=DEVICE)).to(dtype)
    x = x[..., :features]  # rows with a stride longer than F where not contiguous
    weight = torch.randn(features, device=DEVICE)
    bias = torch.randn(features, device=DEVICE)
    return x, weight, bias, torch.randn(shape, device=DEVICE).to(dtype)


@kernels
@pytest.mark.parametrize("activation", list(FUNCTIONS))
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("shape", "contiguous"), [((2, 37, 100), True), ((70, 64), False), ((1, 3), True)])
def test_the_kernel_matches_its_twin(activation, dtype, tolerance, shape, contiguous):
    """Values, row statistics and the three gradients against the float64 twin, on rows whose
    count is not a multiple of the backward's rows per program and widths not a power of two."""
    x, weight, bias, grad = _kernel_case(shape, dtype, activation, contiguous)
    assert module.kernels_take(x, weight, bias)
    y, mean, rstd = torch.ops.mmlongnet.activation_layer_norm(x, weight, bias, 1e-5, activation)
    want_y, want_mean, want_rstd = module._forward_twin(
        x.double(), weight.double(), bias.double(), 1e-5, activation
    )
    assert y.dtype == dtype and mean.dtype == torch.float32
    scale = want_y.abs().max()
    torch.testing.assert_close(y.double(), want_y, rtol=tolerance, atol=tolerance * scale)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-4, atol=1e-5)
    got = torch.ops.mmlongnet.activation_layer_norm_backward(grad, x, weight, mean, rstd, activation)
    want = module._backward_twin(grad.double(), x.double(), weight.double(), want_mean, want_rstd, activation)
    for name, a, b in zip(("dx", "dweight", "dbias"), got, want, strict=True):
        assert a.dtype == (dtype if name == "dx" else torch.float32)
        scale = max(1.0, float(b.abs().max()))  # a dx that cancels to ~0 has no relative scale
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance * scale, msg=name)


@kernels
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_feedforward_runs_the_kernels_and_gives_the_modules_results(activation):
    """FeedForward takes the kernels where dropout is inactive, with the values and gradients of its
    modules (dropout 0.5 in training mode, which runs the modules, checks the other path)."""
    torch.manual_seed(0)
    ffn = FeedForward(16, 48, activation, dropout=0.5).to(DEVICE).eval()
    x = torch.randn(3, 11, 16, device=DEVICE, requires_grad=True)
    assert ffn._fused(ffn.fc1(x))
    got = ffn(x)
    want = ffn.fc2(composition(ffn.fc1(x), ffn.inner_norm.weight, ffn.inner_norm.bias, activation))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [x, *ffn.parameters()]
    grad = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not ffn.train()._fused(ffn.fc1(x))


@kernels
def test_a_compiled_feedforward_calls_the_op_and_matches_eager():
    """The compiled forward and backward call the two ops (the compiler does not inline the twin)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    ffn = FeedForward(16, 40).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 9, 16, device=DEVICE)
    params = [x, *ffn.parameters()]
    compiled = torch.compile(ffn, fullgraph=True)

    def step():
        out = compiled(x)
        return out, torch.autograd.grad(out, params, grad)

    (got, got_grads), code = run_and_get_code(step)
    source = "\n".join(code)
    assert "torch.ops.mmlongnet.activation_layer_norm.default(" in source
    assert "torch.ops.mmlongnet.activation_layer_norm_backward.default(" in source
    want = ffn(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, torch.autograd.grad(want, params, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_kernels_match_their_twin_in_triton_s_interpreter():
    """This file's kernel tests, run on the CPU by Triton's interpreter in a subprocess."""
    selection = "kernel_matches_its_twin or feedforward_runs_the_kernels or compiled_feedforward"
    run_interpreted(module, __file__, selection)
