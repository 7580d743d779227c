"""The fused sequence's layout, derived once per batch on the host from the token lengths.

Legend: B batch, N_m padded tokens of modality m, n_m[b] valid tokens of modality m in sample b,
L = sum_m N_m fused tokens, E embed dim, M present modalities, K multiway experts.

Each sample's valid tokens are packed one modality after the other at the start of its fused
row: sample b's tokens of modality m sit at [o_m[b], o_m[b] + n_m[b]) with o_m[b] the sum of
n_k[b] over the modalities k before m. So a token's position never depends on the rest of the
batch. The fused length L is the sum of the padded widths N_m, a function of the input shapes
alone: with bucketed inputs it repeats from batch to batch, and it needs no length read from
the device.

`FusedLayout.build` computes everything the packing and the multiway routing need from the
lengths on the CPU (in NumPy, so that it reads no tensor): the gather index of the packing, the
padding mask, the modality ids, each expert's tokens; `to_device_at_once` moves them, with the
batch's other host-made tensors, to the device in one non-blocking copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmlongnet.layers.multiway import MultiwayRouting


def to_device_at_once(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move CPU integer/bool tensors to `device` in one non-blocking copy (pinned on CUDA).

    Each tensor travels flattened in one int64 buffer and comes back with its shape and dtype.
    The buffer is filled in NumPy, on one thread: torch's host ops would wake a thread pool that
    competes with the data loader's busy workers (a 0.5M-entry plan took ~50 ms so on an H200 host
    with 8 workers, 2 ms alone), and it comes pinned from torch's caching host allocator (a block
    reused without a driver call, where pinning a tensor asks the driver first).
    """
    tensors = list(tensors)
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    sizes = [t.numel() for t in tensors]
    flat = torch.empty(sum(sizes), dtype=torch.long, pin_memory=device.type == "cuda")  # (sum of numels,)
    values, start = flat.numpy(), 0
    for t, size in zip(tensors, sizes, strict=True):
        values[start : start + size] = t.reshape(-1).numpy()
        start += size
    moved = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        out.append(moved[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


@dataclass(frozen=True)
class FusedLayout:
    """Where every token of the fused sequence comes from, plus what the host knows of it.

    Attributes:
        length: L, fused tokens per row.
        source: (B * L,) long: the row of the stacked stream rows `[stream_0 (B * N_0 rows) |
            stream_1 | ... | one zero row]` that fused position (b, l) takes (padding: the zero row).
        padding_mask: (B, L) bool, True at padding (positions >= the sample's valid total).
        modality_ids: (B, L) long, the config index of each token's modality (padding: the first
            present modality's).
        present: (M, B) bool, which samples carry each present modality.
        routing: the multiway routing of the fused tokens by modality (K experts), or None; under
            sequence sharding, of this shard's slice.
        has_padding: whether any position is padding (host bool: the attention then runs maskless).
        valid_tokens: valid fused tokens of the batch (host int).

    `build` makes it on the CPU; `tensors` / `with_tensors` let its tensors travel to the device
    together with others in one copy (`to_device_at_once`).
    """

    length: int
    source: torch.Tensor
    padding_mask: torch.Tensor
    modality_ids: torch.Tensor
    present: torch.Tensor
    routing: MultiwayRouting | None
    has_padding: bool
    valid_tokens: int

    @classmethod
    def build(
        cls,
        token_lengths: Sequence[torch.Tensor],
        widths: Sequence[int],
        modality_index: Sequence[int],
        num_ways: int,
        shard: tuple[int, int] | None = None,
    ) -> FusedLayout:
        """The layout of M present modalities, computed on the CPU.

        Args:
            token_lengths: M (B,) long CPU tensors, n_m, each in [0, N_m].
            widths: M ints, N_m, the padded token widths of the streams.
            modality_index: M ints, each modality's index among the configured ones (its id and
                its multiway expert).
            num_ways: K, the experts of the fusion stack (1: no routing is built).
            shard: (index, P) when the fusion stack runs sequence-sharded: the routing is then of
                shard `index`'s slice of the fused sequence padded to a multiple of P.

        Raises:
            ValueError: a sample has no valid token in any modality.
        """
        counts = np.stack([n.cpu().numpy().astype(np.int64) for n in token_lengths])  # (M, B)
        batch = counts.shape[1]
        totals = counts.sum(0)  # (B,)
        empty = np.flatnonzero(totals == 0)
        if empty.size:
            raise ValueError(
                f"sample {empty[0]} has no modality at all (every length is 0); drop it from the batch"
            )
        length = sum(widths)
        zero_row = batch * length  # the stacked streams hold sum_m B * N_m = B * L rows, then the zero row
        source = np.full((batch, length), zero_row, dtype=np.int64)  # (B, L)
        ids = np.full((batch, length), modality_index[0], dtype=np.int64)  # (B, L)
        offset = np.zeros(batch, dtype=np.int64)  # (B,) where the next modality starts
        base = 0  # first stacked row of the current stream
        for n, width, index in zip(counts, widths, modality_index, strict=True):
            rows, cols = np.nonzero(np.arange(width)[None, :] < n[:, None])  # the valid (b, j)
            where = offset[rows] + cols  # their fused positions
            source[rows, where] = base + rows * width + cols
            ids[rows, where] = index
            offset += n
            base += batch * width
        padding = np.arange(length)[None, :] >= totals[:, None]  # (B, L)
        routing = None
        if num_ways > 1:
            capacities = [0] * num_ways
            for width, index in zip(widths, modality_index, strict=True):
                capacities[index] = batch * width
            routing_ids, routed = ids, ~padding
            if shard is not None:
                routing_ids, routed, capacities = _shard_slice(ids, padding, capacities, *shard)
            routing = MultiwayRouting.from_ids(
                torch.from_numpy(routing_ids), num_ways, routed=torch.from_numpy(routed),
                capacities=capacities, fill=modality_index[0],
            )  # fmt: skip
        return cls(
            length=length, source=torch.from_numpy(source.reshape(-1)),
            padding_mask=torch.from_numpy(padding), modality_ids=torch.from_numpy(ids),
            present=torch.from_numpy(counts > 0), routing=routing,
            has_padding=bool(padding.any()), valid_tokens=int(totals.sum()),
        )  # fmt: skip

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the layout, in a fixed order."""
        routing = self.routing.tensors() if self.routing is not None else []
        return [self.source, self.padding_mask, self.modality_ids, self.present, *routing]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> FusedLayout:
        """The same layout over `tensors` (as `tensors()` lists them, e.g. moved to a device)."""
        routing = self.routing.with_tensors(tensors[4:]) if self.routing is not None else None
        return dataclasses.replace(
            self, source=tensors[0], padding_mask=tensors[1], modality_ids=tensors[2], present=tensors[3],
            routing=routing,
        )  # fmt: skip

    def pack(self, streams: Sequence[torch.Tensor]) -> torch.Tensor:
        """The M streams (B, N_m, E) -> the fused tokens (B, L, E), zero at padding: one gather."""
        batch, _, dim = streams[0].shape
        stacked = torch.cat([s.reshape(-1, dim) for s in streams] + [streams[0].new_zeros(1, dim)])
        return stacked.index_select(0, self.source).view(batch, self.length, dim)  # (B, L, E)


def _shard_slice(
    ids: np.ndarray, padding: np.ndarray, capacities: list[int], index: int, num_shards: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Shard `index`'s slice [index * n, (index + 1) * n) of the (B, L) ids and routed mask, the
    sequence padded to P * n = P * ceil(L / P) with padding; and its experts' capacities.

    Every shard calls the experts of the batch's modalities (capacity > 0), on one spare row if
    its slice has none of their tokens, so that each rank's parameters take part in the gradient
    alike (DDP expects every rank to use the same parameters)."""
    length = ids.shape[1]
    n = -(-length // num_shards)
    extra = n * num_shards - length
    ids = np.pad(ids, ((0, 0), (0, extra)), mode="edge")
    routed = np.pad(~padding, ((0, 0), (0, extra)), constant_values=False)
    cols = slice(index * n, (index + 1) * n)
    local_ids, local_routed = np.ascontiguousarray(ids[:, cols]), np.ascontiguousarray(routed[:, cols])
    local = [
        max(int(((local_ids == e) & local_routed).sum()), 1) if capacity else 0
        for e, capacity in enumerate(capacities)
    ]
    return local_ids, local_routed, local
