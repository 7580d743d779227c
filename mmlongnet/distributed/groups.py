"""Splitting a sequence over the ranks of a sequence-parallel group, and building such groups.

Legend: B batch, N tokens, n = N / P tokens of one rank, P ranks of the group, * any trailing shape.

Rank p of a group of P ranks holds the contiguous slice [p*n, (p+1)*n) of every sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mmlongnet.distributed.collectives import Group, all_gather, group_rank, group_size


def check_split(seq_len: int, num_shards: int) -> int:
    """n = seq_len / num_shards, or a ValueError saying which lengths split evenly."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"the number of ranks must be a positive int, got {num_shards!r}")
    if seq_len <= 0 or seq_len % num_shards:
        padded = max(-(-seq_len // num_shards), 1) * num_shards
        raise ValueError(
            f"N={seq_len} tokens cannot be split evenly over P={num_shards} ranks (each rank needs the same, "
            f"non-zero number of tokens); pad N to a multiple of {num_shards}, e.g. {padded}"
        )
    return seq_len // num_shards


def split_sequence(x: torch.Tensor, num_shards: int, index: int, dim: int = 1) -> torch.Tensor:
    """Slice `index` of `x` cut into `num_shards` equal slices along `dim`: (B, N, *) -> (B, n, *).

    A view; raises ValueError when N is not a positive multiple of num_shards.
    """
    if not 0 <= index < num_shards:
        raise ValueError(f"index must be in [0, {num_shards}), got {index}")
    n = check_split(x.shape[dim], num_shards)
    return x.narrow(dim, index * n, n)


def shard_sequence(x: torch.Tensor, group: Group = None, dim: int = 1) -> torch.Tensor:
    """This rank's slice of a full sequence held by every rank: (B, N, *) -> (B, n, *), a view."""
    return split_sequence(x, group_size(group), group_rank(group), dim)


def gather_sequence(x: torch.Tensor, group: Group = None, dim: int = 1) -> torch.Tensor:
    """The full sequence from every rank's slice, differentiably: (B, n, *) -> (B, N, *).

    The gradient reaching x is the sum over ranks of the gradient of this rank's slice (so a loss
    computed identically on every rank contributes P times; divide by P where that matters).
    """
    gathered = all_gather(x.movedim(dim, 0), group)  # (P * n, ...) with dim moved first
    return gathered.movedim(0, dim)


def sequence_parallel_layout(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The (D x P) mesh of `world_size` ranks: (sequence-parallel groups, data-parallel groups).

    Legend: W = world_size ranks, P = sp_size ranks of a sequence-parallel group, D = W / P.
    Sequence group d holds the consecutive ranks [d*P, (d+1)*P) (data parallelism runs across
    these groups); data-parallel group p holds the ranks with sequence rank p, [p, p + P, p + 2P, ...].
    Raises ValueError unless P is a positive int that divides the world.
    """
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sequence_parallel_size must be a positive int, got {sp_size!r}")
    if world_size % sp_size:
        raise ValueError(
            f"sequence_parallel_size={sp_size} must divide the world size {world_size} (devices x nodes); "
            f"choose one of {[size for size in range(1, world_size + 1) if world_size % size == 0]}"
        )
    sequence = [list(range(start, start + sp_size)) for start in range(0, world_size, sp_size)]
    data = [list(range(offset, world_size, sp_size)) for offset in range(sp_size)]
    return sequence, data


def new_sequence_parallel_groups(sp_size: int) -> tuple[dist.ProcessGroup, list[list[int]]]:
    """Split the default group into the sequence-parallel groups of `sequence_parallel_layout`.

    Every rank must call this (it calls `dist.new_group` for every group). Returns this rank's group
    and the rank lists of all groups.
    """
    layout, _ = sequence_parallel_layout(dist.get_world_size(), sp_size)
    mine = None
    for ranks in layout:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine, layout
