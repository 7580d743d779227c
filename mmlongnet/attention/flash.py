"""flash-attn kernels behind the dilated-attention op (the "flash_attn" backend).

Two packages provide them:
- flash-attn 4 (`pip install flash-attn-4`, import `flash_attn.cute`): CuTe DSL kernels compiled
  on first use (a few seconds per head dim, dtype and causal flag; any sequence length after that),
  for Hopper and Blackwell GPUs (compute capability 9.0 and up);
- flash-attn 2 (`pip install flash-attn`, import `flash_attn`, 2.6 to 2.8): compiled CUDA kernels
  for Ampere and later (compute capability 8.0 and up).

The op needs what the public functions of both packages hide: a forward that returns the
log-sum-exp, and a backward that takes the output and log-sum-exp from outside (the merged ones of
all branches). Those are private functions of the packages, whose signatures change between
releases; this module is the only place that calls them. It checks the installed version against
the versions it was written for and the functions' parameters against the ones it passes, and
says which version is installed when either check fails.

Both kernels take the op's (b, c, h, D) rows as strided views with no copy (last dim contiguous,
other strides multiples of 16 bytes), in float16 or bfloat16, without a key bias: calls with a key
padding mask run on the "sdpa" kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass

import torch

from mmlongnet.attention.kernels import Kernel

FLASH_ATTN_4 = "flash-attn-4"  # distribution names
FLASH_ATTN_2 = "flash-attn"
# Versions whose private entry points this module was written against (lowest inclusive, highest
# exclusive). flash-attn 4 is a beta: its private functions may change with any release.
SUPPORTED_VERSIONS = {FLASH_ATTN_4: ("4.0.0b36", "4.1"), FLASH_ATTN_2: ("2.6", "2.9")}
MIN_CAPABILITY = {FLASH_ATTN_4: (9, 0), FLASH_ATTN_2: (8, 0)}
DTYPES = (torch.float16, torch.bfloat16)

# Parameters the adapters pass by name; a release that renames one is refused up front.
_FA4_FORWARD = ("q", "k", "v", "softmax_scale", "causal", "return_lse", "out")
_FA4_BACKWARD = ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "dq", "dk", "dv")
_FA2_FORWARD = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
                "window_size_right", "softcap", "alibi_slopes", "return_softmax")  # fmt: skip
_FA2_BACKWARD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                 "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
                 "alibi_slopes", "deterministic")  # fmt: skip


class FlashAttentionUnavailable(ImportError):
    """flash-attn is missing, of a version this package does not support, or not for this device."""


@dataclass(frozen=True)
class FlashInstall:
    """An installed flash-attn package that passed the checks: its name, version and kernel."""

    package: str
    version: str
    kernel: Kernel


def _version_tuple(version: str) -> tuple:
    """'4.0.0b36' -> (4, 0, 0, -1, 36), '2.8.3' -> (2, 8, 3, 0, 0): pre-releases sort first."""
    release, _, rest = version.partition("+")[0].partition("b")
    numbers = [int(part) for part in release.split(".") if part.isdigit()]
    numbers += [0] * (3 - len(numbers))
    return (*numbers[:3], -1 if rest else 0, int(rest) if rest.isdigit() else 0)


def _check_version(package: str, version: str) -> None:
    low, high = SUPPORTED_VERSIONS[package]
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        raise FlashAttentionUnavailable(
            f"{package} {version} is installed; the flash_attn backend supports {package} >= {low}, "
            f"< {high} (install it with `pip install '{package}>={low},<{high}'`, or use backend='sdpa')"
        )


def _check_signature(package: str, version: str, function, names: tuple[str, ...]) -> None:
    parameters = inspect.signature(function).parameters
    missing = [name for name in names if name not in parameters]
    if missing:
        raise FlashAttentionUnavailable(
            f"{package} {version}: {function.__module__}.{function.__name__} lacks the parameters "
            f"{missing} the flash_attn backend passes; install a supported version "
            f"({SUPPORTED_VERSIONS[package][0]} up to {SUPPORTED_VERSIONS[package][1]}) or use backend='sdpa'"
        )


def _refusal(package: str, error: Exception) -> RuntimeError:
    """A kernel's refusal of a call (its checks are asserts) as the RuntimeError the op's kernel
    choice expects: the call then runs on the next kernel."""
    return RuntimeError(f"{package} refused the call: {type(error).__name__}: {error}")


# --- flash-attn 4 ------------------------------------------------------------------------------


def _flash4_kernel(interface) -> Kernel:
    fwd, bwd = interface._flash_attn_fwd, interface._flash_attn_bwd

    def forward(q, k, v, bias, is_causal, scale, into=None):
        try:
            out, lse = fwd(q, k, v, softmax_scale=scale, causal=is_causal, return_lse=True, out=into)[:2]
        except (AssertionError, NotImplementedError, ValueError) as error:
            raise _refusal(FLASH_ATTN_4, error) from error
        return out, lse.transpose(1, 2)  # lse (b, h, c) -> (b, c, h)

    def backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
        dq, dk, dv = into or (None, None, None)
        try:
            lse = lse.transpose(1, 2).contiguous()  # (b, c, h) -> (b, h, c)
            grads = bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=is_causal, dq=dq, dk=dk, dv=dv)
        except (AssertionError, NotImplementedError, ValueError) as error:
            raise _refusal(FLASH_ATTN_4, error) from error
        return tuple(grads[:3])

    return Kernel("flash_attn_4", forward, backward, takes_bias=False, compiles_on_first_call=True)


# --- flash-attn 2 ------------------------------------------------------------------------------


def _flash2_kernel(interface) -> Kernel:
    fwd, bwd = interface._flash_attn_forward, interface._flash_attn_backward

    def forward(q, k, v, bias, is_causal, scale, into=None):
        out, lse = fwd(
            q, k, v, dropout_p=0.0, softmax_scale=scale, causal=is_causal, window_size_left=-1,
            window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
        )[:2]  # fmt: skip
        return out, lse.transpose(1, 2)  # lse (b, h, c) -> (b, c, h)

    def backward(dout, q, k, v, out, lse, bias, is_causal, scale, into=None):
        grads = list(into or (torch.empty_like(t) for t in (q, k, v)))  # the kernel writes them here
        bwd(
            dout.contiguous(), q, k, v, out.contiguous(), lse.transpose(1, 2).contiguous(), *grads,
            dropout_p=0.0, softmax_scale=scale, causal=is_causal, window_size_left=-1,
            window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
        )  # fmt: skip
        return tuple(grads)

    return Kernel("flash_attn_2", forward, backward, takes_bias=False)


def _load(package: str) -> FlashInstall:
    """Import `package`, check its version and signatures, and wrap its kernels."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise FlashAttentionUnavailable(f"{package} is not installed") from None
    _check_version(package, version)
    module = "flash_attn.cute.interface" if package == FLASH_ATTN_4 else "flash_attn.flash_attn_interface"
    try:
        interface = importlib.import_module(module)
    except Exception as error:  # a broken install fails in many ways (missing CUDA libraries, ...)
        raise FlashAttentionUnavailable(
            f"{package} {version} is installed but `import {module}` failed: {error}"
        ) from error
    if package == FLASH_ATTN_4:
        functions = [(interface._flash_attn_fwd, _FA4_FORWARD), (interface._flash_attn_bwd, _FA4_BACKWARD)]
    else:
        functions = [(interface._flash_attn_forward, _FA2_FORWARD)]
        functions.append((interface._flash_attn_backward, _FA2_BACKWARD))
    for function, names in functions:
        _check_signature(package, version, function, names)
    kernel = (_flash4_kernel if package == FLASH_ATTN_4 else _flash2_kernel)(interface)
    return FlashInstall(package, version, kernel)


@functools.cache
def _installed() -> tuple[tuple[FlashInstall, ...], dict[str, str]]:
    """The installed flash-attn packages that pass the checks, flash-attn 4 first, and why each
    other one does not."""
    found, reasons = [], {}
    for package in (FLASH_ATTN_4, FLASH_ATTN_2):
        try:
            found.append(_load(package))
        except FlashAttentionUnavailable as error:
            reasons[package] = str(error)
    return tuple(found), reasons


def flash_install(device: torch.device) -> FlashInstall:
    """The flash-attn package that runs on `device` (flash-attn 4 before flash-attn 2), or
    FlashAttentionUnavailable saying why none does."""
    device = torch.device(device)
    if device.type != "cuda":
        raise FlashAttentionUnavailable(f"flash-attn runs on CUDA devices only, not on {device.type}")
    found, reasons = _installed()
    capability = torch.cuda.get_device_capability(device)
    for install in found:
        needed = MIN_CAPABILITY[install.package]
        if capability >= needed:
            return install
        reasons = {**reasons, install.package: (
            f"{install.package} {install.version} needs compute capability >= {needed[0]}.{needed[1]}, "
            f"{device} has {capability[0]}.{capability[1]}"
        )}  # fmt: skip
    raise FlashAttentionUnavailable("; ".join(reasons[package] for package in (FLASH_ATTN_4, FLASH_ATTN_2)))


@functools.cache
def flash_kernel(device: torch.device, dtype: torch.dtype) -> Kernel | None:
    """The flash-attn kernel for `device` and `dtype`, or None where there is none."""
    if dtype not in DTYPES:
        return None
    try:
        return flash_install(device).kernel
    except FlashAttentionUnavailable:
        return None
