"""Fixtures of the attention tests."""

import math

import pytest

from mmlongnet.attention import dilated as dilated_module
from mmlongnet.attention import merge


@pytest.fixture(params=["dense", "packed", "per-offset", "diagonal"])
def call_layout(request, monkeypatch):
    """Run small inputs four ways: as one dense biased call, as the op's branch calls (packed and
    diagonal calls), one branch call per offset, or diagonal calls wherever they are fewer than
    the per-offset ones. The merges run as the fused kernels wherever those run (CUDA), at any size."""
    monkeypatch.setattr(merge, "FUSED_MIN_ELEMENTS", 0)
    if request.param == "dense":
        monkeypatch.setattr(dilated_module, "DENSE_MAX_WORK", math.inf)
    else:
        monkeypatch.setattr(dilated_module, "DENSE_SMALL_INPUTS", False)
    if request.param in ("per-offset", "diagonal"):
        monkeypatch.setattr(dilated_module, "PACK_MAX_ELEMENTS", 0)
        monkeypatch.setattr(dilated_module, "DIAGONAL_CALLS", request.param == "diagonal")
    return request.param


@pytest.fixture
def branch_calls_only(monkeypatch):
    """Small inputs run as the op's branch calls, not as one dense call (for tests of the calls)."""
    monkeypatch.setattr(dilated_module, "DENSE_SMALL_INPUTS", False)
