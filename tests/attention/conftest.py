"""Fixtures of the attention tests."""

import pytest

from mmlongnet.attention import dilated as dilated_module


@pytest.fixture(params=["packed", "per-offset"])
def packing(request, monkeypatch):
    """Run small inputs both ways: all offsets of a block in one packed call, or one call each."""
    if request.param == "per-offset":
        monkeypatch.setattr(dilated_module, "PACK_MAX_ELEMENTS", 0)
    return request.param
