"""LongNet models: layers and stacks, the encoder-decoder, the language model, the multimodal model."""

from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.models.blocks import LongNetDecoderLayer, LongNetEncoderLayer
from mmlongnet.models.longnet import (
    LongNet,
    LongNetConfig,
    LongNetDecoder,
    LongNetEncoder,
    LongNetLM,
    LongNetLMConfig,
)
from mmlongnet.models.multimodal import MMLongNet, MMLongNetConfig, MMLongNetOutput, StackConfig

__all__ = [
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
    "StackConfig",
]
