"""A causal token shift: each token adds a learned, per-channel mix of itself and its W - 1
predecessors (a depthwise convolution over the sequence, no bias).

Why a dilated model may want one: a branch of rate r pairs a query row only with key rows of the
same residue mod r (each head takes the rows of one offset), so in one layer a token reaches a
token r or more positions back only if their positions agree mod r. After a shift of width
W >= r + 1, each token also carries its W - 1 predecessors, so some token of every residue holds
a given pair of neighbours (a key and its value) and one dilated hop reaches it from any query.

Legend: B batch, N tokens, E channels, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenShift"]


class TokenShift(nn.Module):
    """y_t = x_t + sum_{j=0}^{W-1} weight[:, j] * x_{t-j}; tokens before the first are the given
    history, or zeros.

    Args:
        dim: E, the channels.
        width: W >= 1, the tokens each output mixes (itself and W - 1 before it).

    forward(x (B, N, E), history (B, W - 1, E) or None) -> (B, N, E): history holds the W - 1
    inputs just before x (incremental decoding), None for none. `last_inputs(x, history)` gives
    the history of the next call.

    The weights start at zero: a new shift is the identity, and a model built with it starts as
    the model without.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.dim, self.width = dim, width
        self.weight = nn.Parameter(torch.zeros(dim, width, device=device, dtype=dtype))
        """(E, W): weight[:, j] multiplies the token j positions back."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        context = self._with_history(x, history)  # (B, W - 1 + N, E)
        kernel = self.weight.flip(-1).unsqueeze(1).to(x.dtype)  # (E, 1, W): conv1d correlates
        mixed = F.conv1d(context.transpose(1, 2), kernel, groups=self.dim)  # (B, E, N)
        return x + mixed.transpose(1, 2)

    def last_inputs(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """(B, W - 1, E): the inputs the next call's first token looks back on."""
        return self._with_history(x, history)[:, x.shape[1] :]

    def _with_history(self, x: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """(B, W - 1 + N, E): x after its W - 1 predecessors (the history, or zeros)."""
        before = self.width - 1
        if history is None:
            return F.pad(x, (0, 0, before, 0))
        if history.shape != (x.shape[0], before, self.dim):
            expected = (x.shape[0], before, self.dim)
            raise ValueError(f"history must be (B, W - 1, E) = {expected}, got {tuple(history.shape)}")
        return torch.cat([history.to(x.dtype), x], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}"
