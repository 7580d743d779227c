"""Global queries: a few query rows that attend to every key, beside dilated attention for the rest.

Legend: B batch, N tokens (queries and keys), H heads, D head dim, G global rows per sample (at most).

A dilated branch of rate R selects a query row only in the heads of its offset (h mod R) and pairs
it with the keys of its own residue, so a query sees its first segment in every head and the rest
of the sequence through one residue per branch. A query that must weigh every key alike (counting
the tokens that match it, say) cannot: its heads weigh the keys by where they sit. Global rows
(Longformer's global attention, Beltagy et al. 2020, arXiv 2004.05150, in one direction) take dense
softmax attention over all keys instead, for the rows marked; the other rows keep their dilated
attention. Their cost is G * N scores per head, small while G is. The other direction, every row
also reading the global rows, is the global read (`attend_globally(..., read_gate=...)`,
`MultiheadDilatedAttention(global_read=True)`).

The rows are found on the device (a stable sort of the mask, no host sync), and G, the most a
sample may hold, is a host int, so that the shapes depend on the batch's shape only: the step can
be recorded in a CUDA graph or compiled once per shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmlongnet._tracing import traced

__all__ = ["GlobalQueries"]


@dataclass(frozen=True)
class GlobalQueries:
    """The query rows of a batch that attend to every key.

    Attributes:
        mask: (B, N) bool, True at a global row (padding rows should be False).
        count: G, at least the most True of any sample's row; a host int, so that shapes do not
            depend on the values (a sum of padded widths, for instance). Checked where the mask is
            on the CPU (outside tracing); on a device it is the caller's promise (`from_mask` counts
            with one sync).
    """

    mask: torch.Tensor
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 2:
            got = self.mask
            if isinstance(got, torch.Tensor):
                got = f"{got.dtype} of shape {tuple(got.shape)}"
            raise ValueError(f"GlobalQueries.mask must be a (B, N) bool tensor, got {got}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"GlobalQueries.count must be an int >= 0, got {self.count!r}")
        checkable = self.mask.device.type == "cpu" and self.mask.numel() and not traced()
        if checkable and int(self.mask.sum(1).max()) > self.count:
            raise ValueError(
                f"a sample has {int(self.mask.sum(1).max())} global rows, more than count = {self.count}; "
                "give count >= the most any sample holds (or use GlobalQueries.from_mask)"
            )

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> GlobalQueries:
        """The global rows of `mask` (B, N) bool, with count the most any sample holds (read back
        from the mask's device once)."""
        return cls(mask, int(mask.sum(1).max()) if mask.numel() else 0)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B, G') long: each sample's global rows in order, then other rows to fill G' =
        min(count, N) places; valid (B, G') bool: which of them are global. Distinct per sample."""
        width = min(self.count, self.mask.shape[1])
        order = torch.argsort((~self.mask).to(torch.uint8), dim=1, stable=True)  # (B, N): global first
        index = order[:, :width]
        return index, self.mask.gather(1, index)
