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
padding mask, the modality ids, each expert's tokens; and moves them to the device in one
non-blocking copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmlongnet.layers.multiway import MultiwayRouting


def to_device_at_once(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move CPU integer/bool tensors to `device` in one non-blocking copy (pinned on CUDA).

    Each tensor travels flattened in one int64 buffer and comes back with its shape and dtype.
    """
    tensors = list(tensors)
    if torch.device(device).type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).long() for t in tensors])  # (sum of numels,)
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory()
    moved = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        out.append(moved[start : start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


@dataclass(frozen=True)
class FusedLayout:
    """Where every token of the fused sequence comes from, on the device, plus host facts.

    Attributes:
        length: L, fused tokens per row.
        source: (B * L,) long: the row of the stacked stream rows `[stream_0 (B * N_0 rows) |
            stream_1 | ... | one zero row]` that fused position (b, l) takes (padding: the zero row).
        padding_mask: (B, L) bool, True at padding (positions >= the sample's valid total).
        has_padding: whether any position is padding (host bool: the attention then runs maskless).
        routing: the multiway routing of the fused tokens by modality (K experts), or None.
        modality_ids: (B, L) long, the config index of each token's modality (padding: the first
            present modality's).
        present: (M, B) bool, which samples carry each present modality.
        valid_tokens: valid fused tokens of the batch (host int).
        host_ids, host_padding: (B, L) NumPy copies of `modality_ids` and `padding_mask`.
    """

    length: int
    source: torch.Tensor
    padding_mask: torch.Tensor
    has_padding: bool
    routing: MultiwayRouting | None
    modality_ids: torch.Tensor
    present: torch.Tensor
    valid_tokens: int
    host_ids: np.ndarray
    host_padding: np.ndarray

    @classmethod
    def build(
        cls,
        token_lengths: Sequence[torch.Tensor],
        widths: Sequence[int],
        modality_index: Sequence[int],
        num_ways: int,
        device: torch.device,
    ) -> FusedLayout:
        """The layout of M present modalities, computed on the CPU and moved in one copy.

        Args:
            token_lengths: M (B,) long CPU tensors, n_m, each in [0, N_m].
            widths: M ints, N_m, the padded token widths of the streams.
            modality_index: M ints, each modality's index among the configured ones (its id and
                its multiway expert).
            num_ways: K, the experts of the fusion stack (1: no routing is built).
            device: where the model runs.

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
            capacity = [0] * num_ways
            for width, index in zip(widths, modality_index, strict=True):
                capacity[index] = batch * width
            routing = MultiwayRouting.from_ids(
                torch.from_numpy(ids), num_ways, routed=torch.from_numpy(~padding), capacities=capacity,
                fill=modality_index[0],
            )  # fmt: skip
        source, padding_t, ids_t = (torch.from_numpy(a) for a in (source, padding, ids))
        host = [source.flatten(), padding_t, ids_t, torch.from_numpy(counts > 0)]
        if routing is not None:
            host += routing.tensors()
        moved = to_device_at_once(host, device)
        if routing is not None:
            routing = routing.with_tensors(moved[4:])
        return cls(
            length=length, source=moved[0], padding_mask=moved[1], has_padding=bool(padding.any()),
            routing=routing, modality_ids=moved[2], present=moved[3], valid_tokens=int(totals.sum()),
            host_ids=ids, host_padding=padding,
        )  # fmt: skip

    def pack(self, streams: Sequence[torch.Tensor]) -> torch.Tensor:
        """The M streams (B, N_m, E) -> the fused tokens (B, L, E), zero at padding: one gather."""
        batch, _, dim = streams[0].shape
        stacked = torch.cat([s.reshape(-1, dim) for s in streams] + [streams[0].new_zeros(1, dim)])
        return stacked.index_select(0, self.source).view(batch, self.length, dim)  # (B, L, E)

    def shard_routing(
        self, index: int, num_shards: int, num_ways: int, device: torch.device
    ) -> MultiwayRouting:
        """The routing of shard `index`'s slice of the fused sequence, padded with padding tokens to
        a multiple of `num_shards`: tokens [index * n, (index + 1) * n) with n = ceil(L / P)."""
        n = -(-self.length // num_shards)
        extra = n * num_shards - self.length
        ids = np.pad(self.host_ids, ((0, 0), (0, extra)), constant_values=self.host_ids[0, 0])
        padding = np.pad(self.host_padding, ((0, 0), (0, extra)), constant_values=True)
        rows = slice(index * n, (index + 1) * n)
        local_ids, local_routed = ids[:, rows], ~padding[:, rows]  # (B, n)
        # Every shard calls the experts of the batch's modalities, on one spare row if its slice has
        # none of their tokens, so that each rank's parameters take part in the gradient alike.
        batch_experts = set(np.unique(self.host_ids[~self.host_padding]).tolist())
        capacities = [
            max(int(((local_ids == e) & local_routed).sum()), 1) if e in batch_experts else 0
            for e in range(num_ways)
        ]
        routing = MultiwayRouting.from_ids(
            torch.from_numpy(np.ascontiguousarray(local_ids)), num_ways,
            routed=torch.from_numpy(np.ascontiguousarray(local_routed)), capacities=capacities,
            fill=int(self.host_ids[0, 0]),
        )  # fmt: skip
        return routing.with_tensors(to_device_at_once(routing.tensors(), device))
