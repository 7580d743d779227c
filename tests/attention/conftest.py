"""Fixtures of the attention tests."""

import pytest

from mmlongnet.attention import dilated as dilated_module


@pytest.fixture(params=["default", "per-offset", "diagonal"])
def packing(request, monkeypatch):
    """Run small inputs three ways: as the op chooses (packed and diagonal calls), one call per
    offset, or diagonal calls wherever they are fewer than the per-offset ones."""
    if request.param != "default":
        monkeypatch.setattr(dilated_module, "PACK_MAX_ELEMENTS", 0)
        monkeypatch.setattr(dilated_module, "DIAGONAL_CALLS", request.param == "diagonal")
    return request.param
