"""Small composable layers: positions (RoPE, XPOS, relative bias), feed-forward, multiway routing,
the causal token shift, the scalable softmax's query scale."""

from mmlongnet.layers.activation_norm import activation_layer_norm
from mmlongnet.layers.feedforward import FeedForward, make_activation
from mmlongnet.layers.length_scale import LengthScale, context_lengths
from mmlongnet.layers.multiway import MultiwayNetwork, MultiwayRouting
from mmlongnet.layers.relative_bias import RelativePositionBias, relative_position_bucket
from mmlongnet.layers.rope import RotaryEmbedding, apply_rotary, rotary_cos_sin
from mmlongnet.layers.token_shift import TokenShift
from mmlongnet.layers.xpos import XPos

__all__ = [
    "FeedForward",
    "LengthScale",
    "MultiwayNetwork",
    "MultiwayRouting",
    "RelativePositionBias",
    "RotaryEmbedding",
    "TokenShift",
    "XPos",
    "activation_layer_norm",
    "apply_rotary",
    "context_lengths",
    "make_activation",
    "relative_position_bucket",
    "rotary_cos_sin",
]
