"""A causal token shift: each token adds a learned, per-channel mix of itself and its W - 1
predecessors (a depthwise convolution over the sequence, no bias).

Why a dilated model may want one: a branch of rate r pairs a query row only with key rows of the
same residue mod r (each head takes the rows of one offset), so in one layer a token reaches a
token r or more positions back only if their positions agree mod r. After a shift of width
W >= r + 1, each token also carries its W - 1 predecessors, so some token of every residue holds
a given pair of neighbours (a key and its value) and one dilated hop reaches it from any query.

Learned from zero, the shift does not get there: trained on associative recall, models used the
token just before (a key beside its value) and reached a pair only from queries of the value's
residue (accuracy by residue near 1 at one residue mod the rate, near chance at the others;
README, "Associative recall at 16K"). `window_share` fixes part of the channels to the plain sum
of the W tokens up to each one (not learned), which holds a pair the same way at every one of the
W - 1 positions after it; with it, and no position encoding, a dilated model reached pairs at
every residue alike.

Legend: B batch, N tokens, E channels, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenShift"]


class TokenShift(nn.Module):
    """y_t = x_t + sum_{j=0}^{W-1} kernel[:, j] * x_{t-j}; tokens before the first are the given
    history, or zeros. kernel = weight (learned) on the learned channels; on the window channels
    (`window_share`) kernel[:, j] = 1 for j >= 1 and 0 for j = 0, fixed: y_t is the sum of x_{t-W+1}
    .. x_t there.

    Args:
        dim: E, the channels.
        width: W >= 1, the tokens each output mixes (itself and W - 1 before it).
        window_share: the share of the channels that hold the fixed window sum, in [0, 1]
            (0: every channel learned); round(share * E) channels, spread evenly (channel
            floor(i / share) for each i, e.g. every other one at 0.5).

    forward(x (B, N, E), history (B, W - 1, E) or None) -> (B, N, E): history holds the W - 1
    inputs just before x (incremental decoding), None for none. `last_inputs(x, history)` gives
    the history of the next call.

    The weights start at zero: a new shift without window channels is the identity, and a model
    built with it starts as the model without.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        *,
        window_share: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if isinstance(window_share, bool) or not isinstance(window_share, (int, float)):
            raise ValueError(f"window_share must be a number in [0, 1], got {window_share!r}")
        if not 0.0 <= window_share <= 1.0:
            raise ValueError(f"window_share must be in [0, 1], got {window_share!r}")
        self.dim, self.width, self.window_share = dim, width, float(window_share)
        self.weight = nn.Parameter(torch.zeros(dim, width, device=device, dtype=dtype))
        """(E, W): weight[:, j] multiplies the token j positions back (on the learned channels)."""
        windowed = torch.zeros(dim, dtype=torch.bool)  # (E,)
        count = round(self.window_share * dim)
        if count:
            windowed[(torch.arange(count) / self.window_share).floor().long().clamp(max=dim - 1)] = True
        window = torch.zeros(dim, width, dtype=self.weight.dtype)
        window[windowed, 1:] = 1.0
        self.register_buffer("window", window.to(self.weight.device), persistent=False)
        """(E, W): the fixed kernel of the window channels, zeros elsewhere."""
        learned = (~windowed).to(window.dtype)[:, None]
        self.register_buffer("learned", learned.to(self.weight.device), persistent=False)
        """(E, 1): 1 on the learned channels, 0 on the window channels."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def kernel(self) -> torch.Tensor:
        """(E, W): kernel[:, j] multiplies the token j positions back."""
        if not self.window_share:
            return self.weight
        return self.weight * self.learned + self.window

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {tuple(x.shape)}")
        context = self._with_history(x, history)  # (B, W - 1 + N, E)
        kernel = self.kernel().flip(-1).unsqueeze(1).to(x.dtype)  # (E, 1, W): conv1d correlates
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
        window = f", window_share={self.window_share}" if self.window_share else ""
        return f"dim={self.dim}, width={self.width}{window}"
