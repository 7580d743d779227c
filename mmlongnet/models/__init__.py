"""LongNet models: encoder/decoder layers and stacks, the encoder-decoder and the language model."""

from mmlongnet.models.blocks import LongNetDecoderLayer, LongNetEncoderLayer
from mmlongnet.models.longnet import LongNet, LongNetDecoder, LongNetEncoder, LongNetLM

__all__ = [
    "LongNet",
    "LongNetDecoder",
    "LongNetDecoderLayer",
    "LongNetEncoder",
    "LongNetEncoderLayer",
    "LongNetLM",
]
