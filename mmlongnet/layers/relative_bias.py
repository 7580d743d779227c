"""T5 relative position bias (Raffel et al. 2020, arXiv 1910.10683, section 2.1).

Legend: H heads, Nq query positions, Nk key positions, K buckets.

Every (query, key) pair is mapped to a bucket of its relative position key - query, and each
bucket holds one learned additive score bias per head. Small distances get one bucket each; larger
ones share log-spaced buckets up to max_distance, beyond which all fall into the last bucket.
Bidirectional buckets give half of the buckets to keys after the query; causal (unidirectional)
buckets map every key after the query to bucket 0, the bucket of distance 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> None:
    smallest = 4 if bidirectional else 2
    if not isinstance(num_buckets, int) or num_buckets < smallest or (bidirectional and num_buckets % 2):
        allowed = "an even integer >= 4" if bidirectional else "an integer >= 2"
        raise ValueError(
            f"num_buckets must be {allowed} (bidirectional={bidirectional}), got {num_buckets!r}"
        )
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if not isinstance(max_distance, int) or max_distance <= exact:
        raise ValueError(
            f"max_distance must be an integer > {exact} (the number of exact buckets), got {max_distance!r}"
        )


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 bucket of each relative position (key position - query position).

    With K = num_buckets (K/2 per direction when bidirectional) and E = K/2 exact buckets,
    a distance d < E has bucket d; a distance d >= E has bucket
    min(E + floor(log(d / E) / log(max_distance / E) * (K - E)), K - 1).
    Bidirectional: d = |relative_position| and keys after the query are shifted by K/2.
    Unidirectional: d = max(-relative_position, 0) (keys after the query share bucket 0).

    Args:
        relative_position: integer tensor of any shape.

    Returns:
        int64 tensor of the same shape, values in [0, num_buckets).
    """
    _check_buckets(num_buckets, max_distance, bidirectional)
    if relative_position.is_floating_point() or relative_position.dtype == torch.bool:
        raise ValueError(f"relative_position must be an integer tensor, got {relative_position.dtype}")
    relative_position = relative_position.long()
    if bidirectional:
        per_side = num_buckets // 2
        bucket = (relative_position > 0).long() * per_side
        distance = relative_position.abs()
    else:
        per_side = num_buckets
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    exact = per_side // 2
    # The log-spaced part, in float64; distance is clamped to >= exact so the log is finite.
    ratio = distance.clamp(min=exact).to(torch.float64) / exact
    spread = torch.log(ratio) / math.log(max_distance / exact) * (per_side - exact)
    far = (exact + spread.long()).clamp(max=per_side - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned additive attention bias per head and relative-position bucket (T5).

    Args:
        num_heads: H.
        num_buckets: K (32 in T5); even and >= 4 when bidirectional, >= 2 otherwise.
        max_distance: distances from here on share the last bucket (128 in T5).
        bidirectional: separate buckets for keys before and after the query (encoder); False
            for causal attention (decoder).
        device, dtype: of the weight.

    weight: (K, H).

    forward(query_positions (Nq,), key_positions (Nk,)) -> (H, Nq, Nk) score bias in the
    weight's dtype, bias[h, i, j] = weight[bucket(key_positions[j] - query_positions[i]), h].
    """

    def __init__(
        self,
        num_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        _check_buckets(num_buckets, max_distance, bidirectional)
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        if query_positions.dim() != 1 or key_positions.dim() != 1:
            raise ValueError(
                "query_positions and key_positions must be (Nq,) and (Nk,), "
                f"got {tuple(query_positions.shape)} and {tuple(key_positions.shape)}"
            )
        device = self.weight.device
        relative = key_positions.to(device).unsqueeze(0) - query_positions.to(device).unsqueeze(1)  # (Nq, Nk)
        bucket = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (Nq, Nk)
        bias = F.embedding(bucket, self.weight)  # (Nq, Nk, H)
        return bias.permute(2, 0, 1)  # (H, Nq, Nk)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
