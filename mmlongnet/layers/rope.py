"""Rotary position embedding (RoPE, Su et al. 2021, arXiv 2104.09864), rotate-half layout.

Legend: B batch, N tokens, H heads, D head dim, P = D/2 channel pairs.

Channel i is paired with channel i + D/2 (the GPT-NeoX "rotate-half" layout) and the pair is
rotated by the angle position * inv_freq_i, inv_freq_i = base^(-2i/D). The score of a rotated
query at position m and a rotated key at position n then depends on the positions only through
m - n. `RotaryEmbedding(rotary_dim=R)` rotates only the first R channels of each head (pairs i,
i + R/2, inv_freq_i = base^(-2i/R)) and leaves the other D - R position-free, so a query can match
a key's content the same way at every distance (GPT-NeoX's partial rotary).

Precision: the angle is formed in float64 from the integer positions and reduced modulo 2 pi
before it is cast to float32. A float32 product position * inv_freq is off by up to half an ulp of
the product, about 0.06 rad at position 2^20, which breaks the relative-position property there;
the float64 product is exact to about 1e-10 rad at any position below 2^32. The rotation itself
runs in float32 (float64 for float64 inputs) and the result is cast back to the input's dtype.

The module holds no parameters and no buffers: cos and sin are computed on the fly, on the
device of the inputs, by one opaque op (`torch.ops.mmlongnet.rotary_cos_sin`): a compiler then
computes the (N, D/2) table once per call instead of folding its float64 arithmetic into every
element of the (B, N, H, D) rotation (measured under `torch.compile` on a 32K-token LongNet-base
step: the folded angles were a quarter of the step's GPU time).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _check_head_dim(head_dim: int) -> None:
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")


def check_rotary(head_dim: int, base: float) -> None:
    """ValueError unless head_dim is a positive even int and the frequency base is positive."""
    _check_head_dim(head_dim)
    if not base > 0:
        raise ValueError(f"base must be positive, got {base}")


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is rotated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotary_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles.

    Args:
        positions: integer positions, (N,) or (B, N).
        head_dim: D, even.
        base: frequency base; inv_freq_i = base^(-2i/D), i = 0..D/2-1.
        dtype: dtype of the result, float32 (default) or float64.

    Returns:
        (cos, sin), each (N, D/2) or (B, N, D/2) in `dtype`, on the device of `positions`.
    """
    _check_head_dim(head_dim)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"positions must be (N,) or (B, N), got shape {tuple(positions.shape)}")
    if not base > 0:
        raise ValueError(f"base must be positive, got {base}")
    return torch.ops.mmlongnet.rotary_cos_sin(positions, head_dim, float(base), dtype)


@torch.library.custom_op("mmlongnet::rotary_cos_sin", mutates_args=())
def rotary_cos_sin_op(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw op of `rotary_cos_sin` (arguments checked there): positions (N,) or (B, N) integer ->
    (cos, sin), each (N, D/2) or (B, N, D/2) in `dtype`."""
    half = head_dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=positions.device) * (2.0 / head_dim)
    inv_freq = float(base) ** -exponents  # (P,), float64
    angle = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (N, P) or (B, N, P), float64
    angle = torch.remainder(angle, 2.0 * math.pi).to(dtype)  # in [0, 2 pi), then cast
    return angle.cos(), angle.sin()


@rotary_cos_sin_op.register_fake
def _rotary_cos_sin_fake(positions, head_dim, base, dtype):
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (i, i + D/2) of `x` by the angles whose cos and sin are given.

    Args:
        x: (B, N, H, D).
        cos, sin: (N, D/2) or (B, N, D/2), broadcast over heads.

    Returns:
        (B, N, H, D) in x.dtype; computed in float32 (float64 when x is float64).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, N, H, D), got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or cos.shape[-1] * 2 != x.shape[-1] or cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must be (N, D/2) or (B, N, D/2) with D = {x.shape[-1]} even, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    compute = rotation_dtype(x.dtype)
    cos = cos.to(compute).unsqueeze(-2)  # (N, 1, P) or (B, N, 1, P)
    sin = sin.to(compute).unsqueeze(-2)  # (N, 1, P) or (B, N, 1, P)
    x1, x2 = x.to(compute).chunk(2, dim=-1)  # (B, N, H, P) each
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, N, H, D)
    return rotated.to(x.dtype)


def resolve_positions(
    q: torch.Tensor, k: torch.Tensor, head_dim: int, positions: torch.Tensor | None, offset: int
) -> torch.Tensor:
    """Check self-attention q, k (B, N, H, D) against head_dim and return the positions to use.

    Returns `positions` ((N,) or (B, N)) when given, else offset + arange(N) (N,).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, N, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != head_dim or k.shape[-1] != head_dim:
        raise ValueError(
            f"q and k must share B and N and have D = head_dim = {head_dim}, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    batch, seq_len = q.shape[:2]
    if positions is None:
        return torch.arange(offset, offset + seq_len, device=q.device)  # (N,)
    if offset != 0:
        raise ValueError(f"offset must be 0 when positions are given, got {offset}")
    if tuple(positions.shape) not in ((seq_len,), (batch, seq_len)):
        raise ValueError(
            f"positions must be (N,) = ({seq_len},) or (B, N) = ({batch}, {seq_len}), "
            f"got {tuple(positions.shape)}"
        )
    return positions.to(q.device)


def rotary_angles(
    q: torch.Tensor,
    k: torch.Tensor,
    head_dim: int,
    base: float,
    positions: torch.Tensor | None,
    offset: int,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions and rotary angles of self-attention q, k (B, N, H, D).

    Returns (positions, cos, sin): the positions of `resolve_positions` ((N,) or (B, N)) and their
    cos, sin ((N, R/2) or (B, N, R/2), R = rotary_dim, default D) in the rotation dtype of q and k
    together (float64 when either is float64, else float32).
    """
    positions = resolve_positions(q, k, head_dim, positions, offset)
    dtype = torch.promote_types(rotation_dtype(q.dtype), rotation_dtype(k.dtype))
    cos, sin = rotary_cos_sin(positions, rotary_dim or head_dim, base, dtype=dtype)
    return positions, cos, sin


def rotary_dims(head_dim: int, fraction: float) -> int:
    """The even number of channels of a D-channel head that `fraction` (in (0, 1]) of it rotates:
    round(fraction * D / 2) pairs, at least one."""
    _check_head_dim(head_dim)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"rotary_fraction must be in (0, 1], got {fraction!r}")
    return 2 * max(1, round(fraction * head_dim / 2))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of self-attention queries and keys (rotate-half layout).

    Args:
        head_dim: D, even.
        base: frequency base (10000 in the paper).
        rotary_dim: R, the channels of each head that are rotated, the first R (even, <= D);
            None: all D (the paper's). The other D - R channels pass unchanged.

    forward(q, k, positions=None, offset=0) -> (q, k):
        q, k: (B, N, H, D) (the head counts of q and k may differ).
        positions: integer (N,) or (B, N); default offset + arange(N), so that a slice of a
            longer sequence (a shard, a cached decoding step) is rotated at its true positions.
        Returns the rotated q and k, (B, N, H, D) each, in their input dtypes.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None) -> None:
        super().__init__()
        check_rotary(head_dim, base)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if (
            isinstance(rotary_dim, bool)
            or not isinstance(rotary_dim, int)
            or not 0 < rotary_dim <= head_dim
            or rotary_dim % 2
        ):
            raise ValueError(
                f"rotary_dim must be None or an even int in [2, head_dim={head_dim}], got {rotary_dim!r}"
            )
        self.head_dim = head_dim
        self.base = float(base)
        self.rotary_dim = rotary_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor | None = None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, cos, sin = rotary_angles(q, k, self.head_dim, self.base, positions, offset, self.rotary_dim)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, N, H, D) with its first R channels rotated."""
        if self.rotary_dim == self.head_dim:
            return apply_rotary(x, cos, sin)
        rotated = apply_rotary(x[..., : self.rotary_dim], cos, sin)  # (B, N, H, R)
        return torch.cat((rotated, x[..., self.rotary_dim :]), dim=-1)

    def extra_repr(self) -> str:
        partial = "" if self.rotary_dim == self.head_dim else f", rotary_dim={self.rotary_dim}"
        return f"head_dim={self.head_dim}, base={self.base:g}{partial}"
