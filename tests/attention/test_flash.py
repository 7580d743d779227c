"""The "flash_attn" backend: version and signature checks, the choice of backend, and the op on
flash-attn's calling conventions (stand-ins of both packages' private entry points on the CPU,
the real kernels on a CUDA GPU where a supported flash-attn is installed)."""

import doctest
import importlib.metadata
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from mmlongnet.attention import available_backends, backend_status, dilated_attention
from mmlongnet.attention import dilated as dilated_module
from mmlongnet.attention import flash as flash_module
from tests.attention.test_dilated import (
    GRID,
    assert_low_precision_close,
    make_inputs,
    padding_mask,
    run,
)


def _scores(q, k, scale, causal):
    """(b, c, h, D) x2 -> scores (b, h, c, c), future keys at -inf when causal."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        future = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _attention_forward(q, k, v, scale, causal):
    """Dense attention in flash-attn's layout: out (b, c, h, D), lse (b, h, c) float32."""
    scores = _scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v)
    return out, lse.to(torch.float32) if q.dtype != torch.float64 else lse


def _attention_backward(dout, q, k, v, out, lse, scale, causal):
    """dq, dk, dv from an output and log-sum-exp (b, h, c) given from outside (+inf: no weight)."""
    probs = torch.exp(_scores(q, k, scale, causal) - lse[..., None].to(q.dtype))  # (b, h, c, c)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)
    delta = (dout * out).sum(-1).transpose(1, 2)  # (b, h, c)
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout, v) - delta[..., None])
    return (
        torch.einsum("bhqk,bkhd->bqhd", dscores, k) * scale,
        torch.einsum("bhqk,bqhd->bkhd", dscores, q) * scale,
        dv,
    )


def fake_flash_attn_4(refuse=False):
    """A stand-in of `flash_attn.cute.interface` (flash-attn 4) with its private signatures."""

    def _flash_attn_fwd(
        q, k, v, qv=None, softmax_scale=None, causal=False, return_lse=False, out=None, lse=None
    ):
        assert not refuse, "head_dim must be between 8 and 256"  # the kernels' checks are asserts
        assert q.stride(-1) == 1
        result, log_sum_exp = _attention_forward(q, k, v, softmax_scale, causal)
        if out is not None:  # the kernel writes into a given (strided) output
            assert out.shape == q.shape and out.stride(-1) == 1
            result = out.copy_(result)
        return result, log_sum_exp if return_lse else None, None, None, None

    def _flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, dq=None, dk=None, dv=None
    ):
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.is_contiguous()
        grads = _attention_backward(dout, q, k, v, out, lse, softmax_scale, causal)
        into = (dq, dk, dv)
        return tuple(g if buffer is None else buffer.copy_(g) for g, buffer in zip(grads, into, strict=True))

    return types.SimpleNamespace(_flash_attn_fwd=_flash_attn_fwd, _flash_attn_bwd=_flash_attn_bwd)


def fake_flash_attn_2():
    """A stand-in of `flash_attn.flash_attn_interface` (flash-attn 2.6-2.8) with its private
    signatures: the backward writes into the dq, dk, dv it is given."""

    def _flash_attn_forward(
        q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
        softcap=0.0, alibi_slopes=None, return_softmax=False,
    ):  # fmt: skip
        out, lse = _attention_forward(q, k, v, softmax_scale, causal)
        return out, lse, None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):  # fmt: skip
        assert dout.is_contiguous() and softmax_lse.is_contiguous()
        grads = _attention_backward(dout, q, k, v, out, softmax_lse, softmax_scale, causal)
        for target, grad in zip((dq, dk, dv), grads, strict=True):
            target.copy_(grad)
        return None

    return types.SimpleNamespace(
        _flash_attn_forward=_flash_attn_forward, _flash_attn_backward=_flash_attn_backward
    )


MODULES = {
    flash_module.FLASH_ATTN_4: "flash_attn.cute.interface",
    flash_module.FLASH_ATTN_2: "flash_attn.flash_attn_interface",
}


@pytest.fixture
def installed(monkeypatch):
    """install(package=version, ...): make those flash-attn stand-ins importable, the others absent."""
    real_version = importlib.metadata.version

    def install(modules=None, **versions):
        versions = {
            name.replace("_", "-").replace("flash-attn-2", "flash-attn"): v for name, v in versions.items()
        }

        def version(name):
            if name in versions:
                return versions[name]
            if name in MODULES:
                raise importlib.metadata.PackageNotFoundError(name)
            return real_version(name)

        monkeypatch.setattr(importlib.metadata, "version", version)
        defaults = {
            flash_module.FLASH_ATTN_4: fake_flash_attn_4(),
            flash_module.FLASH_ATTN_2: fake_flash_attn_2(),
        }
        for package, module in MODULES.items():
            monkeypatch.setitem(sys.modules, module, (modules or {}).get(package, defaults[package]))
        flash_module._installed.cache_clear()
        flash_module.flash_kernel.cache_clear()

    yield install
    flash_module._installed.cache_clear()
    flash_module.flash_kernel.cache_clear()


def test_missing_flash_attn_is_explained(installed):
    installed()
    found, reasons = flash_module._installed()
    assert found == ()
    assert reasons == {
        "flash-attn-4": "flash-attn-4 is not installed",
        "flash-attn": "flash-attn is not installed",
    }
    assert "flash_attn" not in available_backends("cpu")
    assert "CUDA devices only" in backend_status("cpu")["flash_attn"]


UNSUPPORTED = [
    ("flash_attn_4", "4.0.0b20"),
    ("flash_attn_4", "4.1.0"),
    ("flash_attn_2", "2.5.9"),
    ("flash_attn_2", "3.0"),
]


@pytest.mark.parametrize(("package", "version"), UNSUPPORTED)
def test_unsupported_version_names_the_installed_one(installed, package, version):
    installed(**{package: version})
    _, reasons = flash_module._installed()
    name = package.replace("_", "-").replace("flash-attn-2", "flash-attn")
    assert f"{name} {version} is installed" in reasons[name]
    assert "pip install" in reasons[name]


def test_changed_signature_is_refused_with_the_version(installed):
    changed = fake_flash_attn_4()
    changed._flash_attn_bwd = lambda q, k, v, o, do, logsumexp, softmax_scale=None, causal=False: None
    installed(modules={"flash-attn-4": changed}, flash_attn_4="4.0.0b36")
    _, reasons = flash_module._installed()
    assert (
        "flash-attn-4 4.0.0b36" in reasons["flash-attn-4"]
        and "['out', 'dout', 'lse', 'dq', 'dk', 'dv']" in reasons["flash-attn-4"]
    )


def test_supported_versions_load_flash_attn_4_first(installed):
    installed(flash_attn_4="4.0.0b36", flash_attn_2="2.8.3")
    found, reasons = flash_module._installed()
    assert [(f.package, f.version, f.kernel.name) for f in found] == [
        ("flash-attn-4", "4.0.0b36", "flash_attn_4"),
        ("flash-attn", "2.8.3", "flash_attn_2"),
    ]
    assert reasons == {}


@pytest.fixture
def flash_on_cpu(monkeypatch, installed):
    """Run the "flash_attn" backend on the CPU through the stand-in kernels (any float dtype):
    use(package) picks the package whose calling conventions are exercised."""

    def use(package, refuse=False):
        modules = {"flash-attn-4": fake_flash_attn_4(refuse=refuse)}
        installed(modules=modules, flash_attn_4="4.0.0b36", flash_attn_2="2.8.3")
        install = next(f for f in flash_module._installed()[0] if f.package == package)
        status = {"reference": None, "sdpa": None, "flash_attn": None}
        monkeypatch.setattr(dilated_module, "backend_status", lambda device: status)
        monkeypatch.setattr(dilated_module, "_flash_runs_on", lambda device: True)
        monkeypatch.setattr(dilated_module, "flash_kernel", lambda device, dtype: install.kernel)
        monkeypatch.setattr(dilated_module, "FLASH_DTYPES", (torch.float64, torch.float32))
        monkeypatch.setattr(dilated_module, "FLASH_MIN_WORK", 0)  # every unmasked call on flash-attn
        monkeypatch.setattr(dilated_module, "DENSE_SMALL_INPUTS", False)  # the op's branch calls
        return install.kernel

    return use


@pytest.mark.parametrize("package", ["flash-attn-4", "flash-attn"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("seq_len", "segs", "rates", "num_heads"), GRID)
def test_flash_conventions_match_reference(
    flash_on_cpu, package, seq_len, segs, rates, num_heads, is_causal, masked
):
    """The op on flash-attn's layouts (lse heads first, the backward's lse from outside, flash-attn
    2 writing into given gradients) equals the dense reference in float64, with the flash kernel
    taking every call without a key mask and the "sdpa" kernels the masked ones."""
    kernel = flash_on_cpu(package)
    calls = []
    counting = type(kernel)(
        kernel.name, lambda *a: calls.append(1) or kernel.forward(*a), kernel.backward, False
    )
    q, k, v = make_inputs(seq_len, num_heads, torch.float64)
    mask = padding_mask(2, seq_len) if masked else None
    grad = torch.randn(q.shape, dtype=torch.float64)
    kwargs = dict(is_causal=is_causal, key_padding_mask=mask)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dilated_module, "flash_kernel", lambda device, dtype: counting)
        fast = run(q, k, v, segs, rates, "flash_attn", grad, **kwargs)
    slow = run(q, k, v, segs, rates, "reference", grad, **kwargs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    assert (len(calls) == 0) == masked  # a masked call never reaches the flash kernel


def test_auto_takes_flash_attn_for_16_bit_inputs_only(flash_on_cpu, monkeypatch):
    flash_on_cpu("flash-attn-4")
    monkeypatch.setattr(dilated_module, "FLASH_DTYPES", (torch.bfloat16,))
    q = torch.randn(1, 8, 2, 4, dtype=torch.bfloat16)
    assert dilated_module._resolve_backend("auto", q, 0.0, False) == "flash_attn"
    assert dilated_module._resolve_backend("auto", q.float(), 0.0, False) == "sdpa"
    with pytest.raises(TypeError, match="backend 'flash_attn' takes dtypes"):
        dilated_module._resolve_backend("flash_attn", q.float(), 0.0, False)
    monkeypatch.setattr(dilated_module, "_warned_reference", set())  # the warning is once per process
    with pytest.warns(UserWarning, match="dropout_p"):
        assert dilated_module._resolve_backend("auto", q, 0.5, False) == "reference"


def test_unavailable_flash_attn_says_why(installed):
    installed()
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="backend 'flash_attn' is not available on cpu .*CUDA devices only"):
        dilated_attention(q, q, q, [8], [1], backend="flash_attn")


def test_a_refused_call_runs_on_the_next_kernel(flash_on_cpu, monkeypatch):
    """A kernel check that fails (an assert inside flash-attn) demotes the kernel for that shape,
    with a warning, and the call runs on the "sdpa" kernels: the result is unchanged."""
    flash_on_cpu("flash-attn-4", refuse=True)
    monkeypatch.setattr(dilated_module, "SELECTOR", type(dilated_module.SELECTOR)())
    q, k, v = make_inputs(40, 2, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64)
    with pytest.warns(
        UserWarning, match="flash_attn_4 kernel refused .*flash-attn-4 refused the call: AssertionError"
    ):
        fast = run(q, k, v, [16], [1], "flash_attn", grad)
    slow = run(q, k, v, [16], [1], "reference", grad)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- CUDA: the installed flash-attn against the float64 reference ------------------------------

flash_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or "flash_attn" not in available_backends("cuda"),
    reason="needs a CUDA GPU with a supported flash-attn installed",
)


@pytest.mark.cuda
@flash_gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("seq_len", "segs", "rates", "num_heads"), GRID)
def test_cuda_flash_attn_error_within_twice_reference_bf16_error(
    seq_len, segs, rates, num_heads, is_causal, masked, head_dim, call_layout, monkeypatch
):
    monkeypatch.setattr(dilated_module, "FLASH_MIN_WORK", 0)  # every unmasked call on flash-attn
    seq_len, segs = seq_len * 8, [w * 8 for w in segs]  # kernel-sized problems
    mask = padding_mask(2, seq_len, device="cuda") if masked else None
    assert_low_precision_close(
        seq_len, segs, rates, num_heads, "flash_attn", torch.bfloat16, "cuda", head_dim, is_causal=is_causal,
        key_padding_mask=mask,
    )  # fmt: skip


def test_small_calls_stay_on_the_sdpa_kernels(flash_on_cpu, monkeypatch):
    """Only calls of at least FLASH_MIN_WORK go to flash-attn (its host work per call is heavier)."""
    kernel = flash_on_cpu("flash-attn-4")
    monkeypatch.setattr(dilated_module, "FLASH_MIN_WORK", 2 * 16 * 16 * 2 * 8)  # (b, c, h, D) = (2, 16, 2, 8)
    small, large = torch.zeros(2, 15, 2, 8), torch.zeros(2, 16, 2, 8)
    assert dilated_module._kernels(small, False, "flash_attn")[0].name == "cpu_flash"
    assert dilated_module._kernels(large, False, "flash_attn")[0] is kernel
    assert dilated_module._kernels(large, True, "flash_attn")[0].name == "cpu_flash"  # masked
    assert dilated_module._kernels(large, False, "sdpa")[0].name == "cpu_flash"


def test_readme_backend_status_example_holds():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Backends", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    example = doctest.DocTestParser().get_doctest(block, {}, "README Backends", "README.md", 0)
    runner = doctest.DocTestRunner(verbose=False)
    runner.run(example)
    assert runner.summarize(verbose=False).failed == 0
