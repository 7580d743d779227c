"""mmlongnet: multimodal long-context models on exact LongNet dilated attention.

LongNet's dilated attention (Ding et al., arXiv 2307.02486) with an exact mixture
gradient, causal masking without leaks, key padding masks, any sequence length and
sequence parallelism. This module is the curated public API: everything in ``__all__``.

Example::

    from mmlongnet import dilated_attention

    # q, k, v: (B, N, H, D) -> out: (B, N, H, D)
    out = dilated_attention(q, k, v, segment_lengths=[2048, 4096], dilation_rates=[1, 2])
"""

from mmlongnet.attention import DilatedAttention, DilatedKVCache, MultiheadDilatedAttention, dilated_attention
from mmlongnet.layers import MultiwayNetwork, RelativePositionBias, RotaryEmbedding, XPos
from mmlongnet.models import (
    LongNet,
    LongNetConfig,
    LongNetDecoder,
    LongNetDecoderLayer,
    LongNetEncoder,
    LongNetEncoderLayer,
    LongNetLayerConfig,
    LongNetLM,
    LongNetLMConfig,
    MMLongNet,
    MMLongNetConfig,
    MMLongNetOutput,
)

__version__ = "0.1.0"

__all__ = [
    "DilatedAttention",
    "DilatedKVCache",
    "LongNet",
    "LongNetConfig",
    "LongNetDecoder",
    "LongNetDecoderLayer",
    "LongNetEncoder",
    "LongNetEncoderLayer",
    "LongNetLM",
    "LongNetLMConfig",
    "LongNetLayerConfig",
    "MMLongNet",
    "MMLongNetConfig",
    "MMLongNetOutput",
    "MultiheadDilatedAttention",
    "MultiwayNetwork",
    "RelativePositionBias",
    "RotaryEmbedding",
    "XPos",
    "__version__",
    "dilated_attention",
]
