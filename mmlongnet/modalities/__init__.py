"""Per-modality encoders: raw text / audio / images and video -> tokens (B, N_m, E) + padding mask (B, N_m).

Every encoder takes valid lengths in raw units (token ids, samples, frames), returns a padding
mask that is True at padding, and gives a sample the same valid tokens whatever else is in its
batch. Positions are left to the attention layers (rotary), except the spatial position of a
patch within a frame.

The names below are imported on first use, so that `from mmlongnet.modalities import TextEncoder`
does not import torchaudio or timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

MODALITIES = ("text", "audio", "video")  # the modality names, in the order the fused sequence holds them

if TYPE_CHECKING:
    from mmlongnet.modalities.audio import AudioEncoder, AudioEncoderConfig, ConformerConfig
    from mmlongnet.modalities.text import ByteTokenizer, HFTokenizer, TextEncoder, TextEncoderConfig
    from mmlongnet.modalities.vision import VisionEncoder, VisionEncoderConfig

_MODULE_OF = {
    "AudioEncoder": "audio",
    "AudioEncoderConfig": "audio",
    "ConformerConfig": "audio",
    "ByteTokenizer": "text",
    "HFTokenizer": "text",
    "TextEncoder": "text",
    "TextEncoderConfig": "text",
    "VisionEncoder": "vision",
    "VisionEncoderConfig": "vision",
}

__all__ = [
    "MODALITIES",
    "AudioEncoder",
    "AudioEncoderConfig",
    "ByteTokenizer",
    "ConformerConfig",
    "HFTokenizer",
    "TextEncoder",
    "TextEncoderConfig",
    "VisionEncoder",
    "VisionEncoderConfig",
]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
