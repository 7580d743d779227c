"""`LongNetLayerConfig`: the options of one LongNet layer, validated once, where they enter.

`MultiheadDilatedAttention.from_config` reads its attention fields (width, heads, schedule,
attention dropout, positions, attention kind, backend); the blocks and stacks of
`mmlongnet.models` read the rest (FFN, residual dropout, activation, checkpointing). The models'
own configs (`LongNetLMConfig`, `LongNetConfig`) extend it; a module built from a config checks
nothing of it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmlongnet._config import check_field_types
from mmlongnet.attention.dilated import BACKENDS, check_schedule
from mmlongnet.layers.feedforward import ACTIVATIONS, Activation
from mmlongnet.layers.length_scale import check_reference_length
from mmlongnet.layers.rope import rotary_dims

LONGNET_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
LONGNET_DILATION_RATES = (1, 2, 4, 6, 12)  # the LongNet paper's language-model schedule
POSITIONS = ("rope", "xpos", "relative")


def xpos_block_length(segment_lengths: list[int]) -> int:
    """The block XPOS measures its exponents in: the largest segment length, which every other one
    must divide (ValueError otherwise)."""
    block = max(segment_lengths)
    if any(block % w for w in segment_lengths):
        raise ValueError(
            f"positions='xpos' needs every segment length to divide the largest (XPOS is computed "
            f"relative to blocks of {block} tokens), got segment_lengths={segment_lengths}"
        )
    return block


@dataclass(kw_only=True)
class LongNetLayerConfig:
    """One LongNet layer: dilated self-attention and FFN, pre-LN with MAGNETO sub-LN (Wang et al.
    2022, arXiv 2210.06423). Keyword-only; every field is checked in `__post_init__`."""

    d_model: int
    """E, the width."""
    nhead: int
    """Attention heads (a divisor of d_model)."""
    dim_feedforward: int = 2048
    """FFN hidden size."""
    segment_lengths: list[int] = field(default_factory=lambda: list(LONGNET_SEGMENT_LENGTHS))
    """Segment length w_i of each dilated-attention branch (the LongNet paper's: 2K..32K)."""
    dilation_rates: list[int] = field(default_factory=lambda: list(LONGNET_DILATION_RATES))
    """Dilation rate r_i <= w_i of each branch (the paper's: 1, 2, 4, 6, 12)."""
    dropout: float = 0.1
    """Residual and FFN-hidden dropout."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (runs the dense reference attention: keep 0 for long
    inputs)."""
    activation: Activation = "gelu"
    """FFN activation."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    positions: Literal["rope", "xpos", "relative"] | None = None
    """Positions of the self-attention: "rope" (arXiv 2104.09864), "xpos" (arXiv 2212.10554,
    relative to blocks of the largest segment length, which the others must divide), "relative"
    (T5 bias, dense reference backend only) or None."""
    rotary_fraction: float = 1.0
    """With positions="rope": the share of each head's channels that are rotated (the first ones,
    rounded to whole pairs, at least one); the rest carry no position, so a query matches a key's
    content the same at every distance. 1.0: all (the paper's)."""
    checkpoint_activations: bool = False
    """Recompute each layer in the backward instead of storing its activations."""
    attention: Literal["dilated", "dense"] = "dilated"
    """Self-attention: "dilated", or "dense" (full attention, the baseline LongNet is compared with)."""
    backend: Literal["auto", "reference", "sdpa", "flash_attn"] = "auto"
    """The `dilated_attention` backend."""
    scalable_softmax: int | None = None
    """None: plain softmax. n0 >= 2: Scalable-Softmax (SSMax, arXiv 2501.19399) in the
    self-attention: each head's scores times s_h * log(n), n the keys of the query's context, s_h
    learned from 1 / log(n0), so a score margin keeps a key's weight as contexts grow
    (`mmlongnet.layers.length_scale`)."""
    global_read: bool = False
    """With global queries (`mmlongnet.attention.GlobalQueries`) in the forward, the other rows also
    read the global rows: a softmax over their keys alone, added through a learned per-head gate
    that starts at 0 (`MultiheadDilatedAttention`'s `global_read`). Needs attention="dilated"."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("d_model", "dim_feedforward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        nhead = self.nhead
        if isinstance(nhead, bool) or not isinstance(nhead, int) or nhead <= 0 or self.d_model % nhead:
            raise ValueError(
                f"nhead must be a positive divisor of d_model={self.d_model}, got nhead={self.nhead!r}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.attention not in ("dilated", "dense"):
            raise ValueError(f"attention must be 'dilated' or 'dense', got {self.attention!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        self.segment_lengths, self.dilation_rates = check_schedule(self.segment_lengths, self.dilation_rates)
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS} or None, got {self.positions!r}")
        if self.positions == "xpos":
            xpos_block_length(self.segment_lengths)
        rotary_dims(self.d_model // self.nhead, self.rotary_fraction)  # ValueError outside (0, 1]
        if self.scalable_softmax is not None:
            check_reference_length(self.scalable_softmax)
        if self.global_read and self.attention != "dilated":
            raise ValueError("global_read serves dilated self-attention (attention='dilated')")
        if self.rotary_fraction != 1.0 and self.positions != "rope":
            raise ValueError(
                f"rotary_fraction applies to positions='rope' only, got {self.rotary_fraction} with "
                f"positions={self.positions!r}"
            )
