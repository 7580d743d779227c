"""LongNet models: layers and stacks, the encoder-decoder, the language model, the multimodal model."""

from mmlongnet.models.blocks import LongNetDecoderLayer, LongNetEncoderLayer
from mmlongnet.models.longnet import LongNet, LongNetDecoder, LongNetEncoder, LongNetLM
from mmlongnet.models.multimodal import MMLongNet, MMLongNetConfig, MMLongNetOutput, StackConfig

__all__ = [
    "LongNet",
    "LongNetDecoder",
    "LongNetDecoderLayer",
    "LongNetEncoder",
    "LongNetEncoderLayer",
    "LongNetLM",
    "MMLongNet",
    "MMLongNetConfig",
    "MMLongNetOutput",
    "StackConfig",
]
