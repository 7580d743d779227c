"""The position-wise feed-forward network of a transformer block, with MAGNETO sub-LayerNorm.

Legend: B batch, N tokens, E embed dim, F feed-forward dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmlongnet.layers.activation_norm import activation_layer_norm, kernels_take

# False: FeedForward runs its activation and sub-LayerNorm as the modules everywhere, not as
# `activation_layer_norm`'s kernels on a GPU (benchmarks/feedforward.py times the two).
FUSED_ACTIVATION_NORM = True
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
Activation = Literal["gelu", "relu", "silu"]


def make_activation(name: str) -> nn.Module:
    """An activation module from its name: one of `ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class FeedForward(nn.Module):
    """fc1 -> activation -> dropout -> sub-LayerNorm -> fc2 (MAGNETO, arXiv 2210.06423).

    Args:
        embed_dim: E; hidden_dim: F.
        activation: "gelu", "relu" or "silu".
        dropout: dropout on the hidden activations (training mode only).
        layer_norm: the MAGNETO sub-LayerNorm before fc2.
        layer_norm_eps: its epsilon.
        gamma_init: MAGNETO gain of fc1 and fc2 (Xavier-normal initialisation).
        bias: biases in fc1 and fc2.

    forward(x: (B, N, E)) -> (B, N, E); any leading shape works, e.g. (tokens, E).

    On a GPU with Triton, the activation and the sub-LayerNorm run as one kernel each way
    (`activation_layer_norm`: read the (B, N, F) hidden tensor once, computed in float32, written in
    fc1's output dtype) wherever dropout is inactive; elsewhere as the modules above
    (`FUSED_ACTIVATION_NORM = False` in this module runs the modules everywhere).
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        activation: Activation = "gelu",
        dropout: float = 0.0,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or hidden_dim <= 0:
            raise ValueError(f"embed_dim and hidden_dim must be positive, got {embed_dim}, {hidden_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.gamma_init = gamma_init
        self.activation_name = activation
        self.fc1 = nn.Linear(embed_dim, hidden_dim, bias=bias, **factory)
        self.activation = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.inner_norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_normal_(fc.weight, gain=self.gamma_init)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)
        if self.inner_norm is not None:
            self.inner_norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)  # (B, N, F)
        norm = self.inner_norm
        if self._fused(hidden):
            hidden = activation_layer_norm(hidden, norm.weight, norm.bias, norm.eps, self.activation_name)
        else:
            hidden = self.dropout(self.activation(hidden))
            if norm is not None:
                hidden = norm(hidden)
        return self.fc2(hidden)  # (B, N, E)

    def _fused(self, hidden: torch.Tensor) -> bool:
        """Whether activation, dropout and sub-LayerNorm run as `activation_layer_norm`'s kernels."""
        norm = self.inner_norm
        return (
            FUSED_ACTIVATION_NORM
            and norm is not None
            and norm.weight is not None
            and norm.bias is not None
            and not (self.training and self.dropout.p > 0)
            and kernels_take(hidden, norm.weight, norm.bias)
        )
