"""Shared fixtures: `host_reads` and `one_thread`.

`host_reads` counts the ops that read tensor values back on the host. On an accelerator each such
op waits for the device (a host sync); on the CPU nothing waits, but
the same code would, so the tests count the ops there. The model's host-side work (the layout of
a batch from its lengths) runs in NumPy and Python, which do not go through the dispatcher, so
in a forward and backward every counted op is a read of a tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# A host value (`.item()`, `bool()`, `int()`), or an output shape that depends on values read.
READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default,
    aten.masked_select.default, aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
}  # fmt: skip
# Indexing with a bool mask reads the mask inside the kernel (a nonzero the dispatcher never sees).
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads:` ... then `reads.ops` names every host read, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.ops.append(str(func))
        elif func in _INDEXING and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] or []
        ):
            self.ops.append(f"{func} with a bool mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """A fresh `HostReads` mode: `with host_reads as reads: ...; assert reads.ops == []`."""
    return HostReads()


@pytest.fixture
def one_thread():
    """Tiny CPU steps are dominated by thread hand-offs on a busy machine: run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
