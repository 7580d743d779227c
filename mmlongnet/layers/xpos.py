"""XPOS: rotary embedding with a per-pair exponential decay (Sun et al. 2022, arXiv 2212.10554).

Legend: B batch, N tokens, H heads, D head dim, P = D/2 channel pairs, L block length.

Channel pair i (channels i and i + D/2, as in `mmlongnet.layers.rope`) gets the scale
zeta_i = (2i/D + gamma) / (1 + gamma), gamma = 0.4, so zeta_i lies in [gamma / (1 + gamma), 1).
After the rotary rotation the query at position m is multiplied by zeta_i^e(m) and the key at
position n by zeta_i^(-e(n)); pair i of the score q_m . k_n is thereby weighted by
zeta_i^(e(m) - e(n)), which decays with distance when e(m) - e(n) = (m - n) / scale_base.

Where the exponents are measured from: the published form takes e(p) = p / scale_base (centred at
0, or at the middle of the sequence), so zeta^(+-e(p)) outgrows float16 after some thousand
tokens. Here e(p) is measured from the centre of the aligned block of L tokens holding p:

    e(p) = (p - (p // L) * L - L / 2) / scale_base,   |e(p)| <= L / (2 * scale_base),

and two positions m, n of one block get exactly e(m) - e(n) = (m - n) / scale_base, whatever
their absolute position. Dilated attention only pairs positions inside one segment; when every
segment length divides the largest, L = the largest segment length makes XPOS exact for every
attended pair. block_length=None is the plain form, e(p) = p / scale_base (short sequences).

Overflow: the log-scale e(p) * log(zeta_i) is clamped to the float32 exponent range, the scale is
applied in float32 to the rotated values, and the result is clamped to +-finfo(x.dtype).max
before the cast back, so the output is finite for every position and dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmlongnet.layers.rope import apply_rotary, check_rotary, rotary_angles

GAMMA = 0.4


def xpos_exponent(positions: torch.Tensor, scale_base: float, block_length: int | None) -> torch.Tensor:
    """e(p), float64, same shape as the integer `positions` ((N,) or (B, N)).

    e(p) = (p mod L - L / 2) / scale_base with L = block_length, or p / scale_base when
    block_length is None.
    """
    if block_length is None:
        return positions.to(torch.float64) / scale_base
    within = torch.remainder(positions, block_length)  # integer, in [0, L)
    return (within.to(torch.float64) - block_length / 2) / scale_base


def xpos_log_zeta(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """log(zeta_i), i = 0..D/2-1, (D/2,) float64."""
    pair = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    return torch.log((2.0 * pair / head_dim + GAMMA) / (1.0 + GAMMA))


def xpos_factors(
    positions: torch.Tensor, head_dim: int, scale_base: float, block_length: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key factors zeta_i^e(p) and zeta_i^-e(p), each (N, P) or (B, N, P) in `dtype`
    (the rotation dtype) for integer positions (N,) or (B, N), their log clamped into the finite
    range of `dtype`. One opaque op (`torch.ops.mmlongnet.xpos_factors`): a compiler computes the
    table once per call, not its float64 logarithms for every element of q and k."""
    return torch.ops.mmlongnet.xpos_factors(positions, head_dim, float(scale_base), block_length, dtype)


@torch.library.custom_op("mmlongnet::xpos_factors", mutates_args=())
def xpos_factors_op(
    positions: torch.Tensor, head_dim: int, scale_base: float, block_length: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw op of `xpos_factors`."""
    exponent = xpos_exponent(positions, scale_base, block_length)  # (N,) or (B, N), float64
    log_scale = exponent.unsqueeze(-1) * xpos_log_zeta(head_dim, positions.device)  # (.., N, P)
    limit = math.log(torch.finfo(dtype).max)
    q_factor = log_scale.clamp(-limit, limit).to(dtype).exp()  # finite
    k_factor = (-log_scale).clamp(-limit, limit).to(dtype).exp()
    return q_factor, k_factor


@xpos_factors_op.register_fake
def _xpos_factors_fake(positions, head_dim, scale_base, block_length, dtype):
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def _scaled(rotated: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rotated (B, N, H, D) in its compute dtype, times `factor` (N, P) or (B, N, P) on both
    channels of every pair, clamped into the finite range of `dtype` and cast to it."""
    factor = torch.cat((factor, factor), dim=-1).unsqueeze(-2)  # (N, 1, D) or (B, N, 1, D)
    bound = torch.finfo(dtype).max
    return (rotated * factor).clamp(-bound, bound).to(dtype)  # inf from the product -> +-bound


class XPos(nn.Module):
    """XPOS position embedding of self-attention queries and keys.

    Args:
        head_dim: D, even.
        base: rotary frequency base.
        scale_base: the decay exponent is (m - n) / scale_base (512 in the paper).
        block_length: L, the exponents are measured from the centre of each aligned block of L
            tokens (see the module docstring); None: one block centred at 0 (plain XPOS).

    forward(q, k, positions=None, offset=0) -> (q, k):
        q, k: (B, N, H, D) (the head counts of q and k may differ).
        positions: integer (N,) or (B, N); default offset + arange(N).
        Returns q and k, (B, N, H, D) each, in their input dtypes, such that for m, n in one
        block the score q_m . k_n is sum_i zeta_i^((m - n) / scale_base) times the rotary
        contribution of pair i.

    Exact whenever the factors zeta^(+-e) times the values are representable in the input dtype:
    in float16 for block_length up to about 8K (with scale_base 512 and unit-scale inputs),
    in bfloat16 and float32 much further. Beyond that the values saturate at +-finfo.max (or
    flush towards 0) instead of becoming inf or NaN.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        scale_base: float = 512.0,
        block_length: int | None = None,
    ) -> None:
        super().__init__()
        check_rotary(head_dim, base)
        if not scale_base > 0:
            raise ValueError(f"scale_base must be positive, got {scale_base}")
        if block_length is not None and (not isinstance(block_length, int) or block_length <= 0):
            raise ValueError(f"block_length must be None or a positive integer, got {block_length!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.scale_base = float(scale_base)
        self.block_length = block_length

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor | None = None,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions, cos, sin = rotary_angles(q, k, self.head_dim, self.base, positions, offset)
        compute = cos.dtype  # the rotation dtype of q and k
        factors = xpos_factors(positions, self.head_dim, self.scale_base, self.block_length, compute)
        q_factor, k_factor = factors  # (N, P) or (B, N, P) each
        q_out = _scaled(apply_rotary(q.to(compute), cos, sin), q_factor, q.dtype)
        k_out = _scaled(apply_rotary(k.to(compute), cos, sin), k_factor, k.dtype)
        return q_out, k_out

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base:g}, scale_base={self.scale_base:g}, "
            f"block_length={self.block_length}"
        )
