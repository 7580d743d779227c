"""Vision: images and videos -> patch / tubelet tokens, with timm patch embeddings or a timm backbone.

Legend: B batch, T frames, T' = ceil(T / t) tubelets of t = tubelet_size frames, C channels,
H x W image size, p patch size, P patches per frame (tokens per frame for a backbone),
E embed dim, E_b backbone width.

Images are one-frame videos: (B, C, H, W) is encoded as (B, 1, C, H, W), so an image and a
one-frame clip give the same tokens. Videos give T' * P tokens in time-major order: token
k * P + j is patch j of tubelet k.

Patch embedding (backbone=None):
- tubelet_size == 1: timm's `PatchEmbed` (a p x p stride-p Conv2d) on every frame.
- tubelet_size > 1: a Conv3d with kernel and stride (t, p, p) (ViViT / VideoMAE tubelets):
  the t frames of a tubelet are embedded jointly. A tubelet that runs past a sample's last
  valid frame (T not a multiple of t, or lengths[b] not a multiple of t) is completed by
  repeating that last valid frame, so a static image is a static clip and the completed
  frames carry no padding content. A partial tubelet is valid when it holds at least one
  valid frame: a sample of l frames has ceil(l / t) valid tubelets.
Backbone (a timm model name): every valid frame goes through `forward_features`; prefix
tokens (class / register tokens) are dropped, CNN feature maps are flattened row-major, and
a Linear maps E_b to E when they differ. With tubelet_size > 1 the frame tokens of a tubelet
are averaged over its valid frames. Padded frames are never run through the backbone.

Positions: a spatial position embedding over the P positions of a frame (learned, or fixed
2-D sin-cos) is added to every tubelet's tokens; there is no temporal embedding, the
attention layers apply rotary positions along the token sequence. By default the patch
embedding path uses a learned embedding and a backbone none (it brings its own).

Batch invariance: frames beyond a sample's length never reach its valid tokens (they are
replaced by the last valid frame in a tubelet, or skipped), so a sample's valid tokens are
the same alone or in a padded batch. BatchNorm backbones in training mode are the exception
(batch statistics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import PatchEmbed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from mmlongnet._config import check_field_types
from mmlongnet.modalities._common import (
    ceil_div,
    check_dropout,
    check_finite,
    check_lengths,
    check_positive_int,
    padding_mask,
)
from mmlongnet.pretrained import Pretrained

__all__ = ["VisionEncoder", "VisionEncoderConfig"]

_RESERVED_BACKBONE_KWARGS = ("pretrained", "num_classes", "checkpoint_path", "in_chans")


@dataclass
class VisionEncoderConfig:
    """Patch / tubelet embedding of images and videos, or a timm backbone per frame."""

    embed_dim: int = 512
    """E, width of the output tokens."""
    image_size: int | tuple[int, int] = 224
    """(H, W) of the inputs, or one int for square inputs."""
    patch_size: int = 16
    """p, side of a square patch (patch embedding path); must divide H and W."""
    in_chans: int = 3
    """C, channels per frame."""
    tubelet_size: int = 1
    """t, frames per video token along time."""
    frame_rate: float | None = None
    """Frames per second of the input videos. Used for token time stamps (`tubelet_times`) and
    to reject videos declared at another rate; None = unknown (no time stamps)."""
    pos_embed: Literal["learned", "sincos", "none"] | None = None
    """Spatial position embedding per frame; None = learned without a backbone, none with one."""
    backbone: str | None = None
    """None = patch embedding; else a timm model name, built with pretrained=False, num_classes=0."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments, e.g. {"img_size": 32, "patch_size": 8} for a ViT."""
    checkpoint_path: str | None = None
    """Local backbone weights, loaded by timm (create_model(checkpoint_path=...)); nothing is downloaded."""
    dropout: float = 0.0
    """Dropout on the output tokens, in [0, 1)."""
    check_finite: bool = False
    """Raise if the pixels hold NaN or inf; costs a device sync."""

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive_int("embed_dim", self.embed_dim)
        size = self.image_size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if not (isinstance(size, Sequence) and len(size) == 2):
            raise ValueError(f"image_size must be an int or (H, W), got {self.image_size!r}")
        self.image_size = tuple(size)
        for value in self.image_size:
            check_positive_int("image_size", value)
        for name in ("patch_size", "in_chans", "tubelet_size"):
            check_positive_int(name, getattr(self, name))
        if self.frame_rate is not None and (
            isinstance(self.frame_rate, bool)
            or not isinstance(self.frame_rate, (int, float))
            or self.frame_rate <= 0
        ):
            raise ValueError(
                f"frame_rate must be a positive number of frames per second or None, got {self.frame_rate!r}"
            )
        if self.pos_embed not in (None, "learned", "sincos", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos', 'none' or None, got {self.pos_embed!r}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {self.embed_dim}")
        check_dropout("dropout", self.dropout)
        if self.backbone is None:
            height, width = self.image_size
            if height % self.patch_size or width % self.patch_size:
                raise ValueError(
                    f"patch_size={self.patch_size} must divide image_size={self.image_size} (patch embedding)"
                )
            if self.backbone_kwargs:
                raise ValueError(
                    "backbone_kwargs is only used with a backbone; set backbone or leave it empty"
                )
            if self.checkpoint_path is not None:
                raise ValueError(
                    "checkpoint_path loads backbone weights; set backbone, "
                    "or load the encoder's state_dict instead"
                )
            return
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            raise ValueError(
                f"backbone must be a timm model name (see timm.list_models()), got {self.backbone!r}"
            )
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"backbone_kwargs must be a dict, got {type(self.backbone_kwargs).__name__}")
        reserved = sorted(set(self.backbone_kwargs) & set(_RESERVED_BACKBONE_KWARGS))
        if reserved:
            raise ValueError(
                f"backbone_kwargs must not set {reserved}: the encoder sets them "
                "(use in_chans / checkpoint_path)"
            )

    @property
    def pos_embed_kind(self) -> Literal["learned", "sincos", "none"]:
        """The position embedding in effect (resolves None)."""
        if self.pos_embed is not None:
            return self.pos_embed
        return "learned" if self.backbone is None else "none"


class VisionEncoder(Pretrained, nn.Module):
    """Images (B, C, H, W) or videos (B, T, C, H, W) -> tokens (B, N, E) and padding mask (B, N).

    N = P for images and ceil(T / tubelet_size) * P for videos (time-major). See the module
    docstring for tubelets, backbones, positions and batch invariance.

    Args:
        config: `VisionEncoderConfig`.
        device, dtype: where and in which dtype the layers are created.

    Example::

        cfg = VisionEncoderConfig(embed_dim=64, image_size=32, patch_size=8, tubelet_size=2, frame_rate=4)
        enc = VisionEncoder(cfg)
        x, pad = enc(torch.randn(2, 5, 3, 32, 32), lengths=torch.tensor([5, 2]))
        # x: (2, 3 * 16, 64); pad[1] is True from token 16 on (1 valid tubelet of 16 patches)
    """

    config_class = VisionEncoderConfig

    def __init__(self, config: VisionEncoderConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, VisionEncoderConfig):
            raise ValueError(f"vision: config must be a VisionEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed_dim = config.embed_dim
        factory = {"device": device, "dtype": dtype}
        self.patch_embed: nn.Module | None = None
        self.backbone: nn.Module | None = None
        self.backbone_proj: nn.Module | None = None
        self.grid_size: tuple[int, int] | None = None  # (h, w) per frame; None: a backbone without a grid
        if config.backbone is None:
            height, width = config.image_size
            self.grid_size = (height // config.patch_size, width // config.patch_size)
            if config.tubelet_size == 1:
                self.patch_embed = PatchEmbed(
                    config.image_size, config.patch_size, config.in_chans, config.embed_dim, **factory
                )
            else:
                kernel = (config.tubelet_size, config.patch_size, config.patch_size)
                self.patch_embed = nn.Conv3d(
                    config.in_chans, config.embed_dim, kernel, stride=kernel, **factory
                )
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        else:
            self._build_backbone(factory)
        kind = config.pos_embed_kind
        self.pos_embed: nn.Parameter | None = None
        self.register_buffer("sincos_pos_embed", None, persistent=False)
        if kind == "learned":
            table = torch.empty(self.num_patches, config.embed_dim, **factory)  # (P, E)
            self.pos_embed = nn.Parameter(table)
        elif kind == "sincos":
            if self.grid_size is None:
                raise ValueError(
                    f"vision: pos_embed='sincos' needs a 2-D token grid, but backbone {config.backbone!r} "
                    "returns a sequence; use 'learned' or 'none'"
                )
            table = build_sincos2d_pos_embed(list(self.grid_size), config.embed_dim)  # (P, E)
            self.register_buffer("sincos_pos_embed", table.to(**factory), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def _build_backbone(self, factory: dict) -> None:
        cfg = self.config
        if cfg.checkpoint_path is not None and not Path(cfg.checkpoint_path).is_file():
            raise FileNotFoundError(f"vision: checkpoint_path {cfg.checkpoint_path!r} does not exist")
        backbone = timm.create_model(
            cfg.backbone,
            pretrained=False,
            num_classes=0,
            in_chans=cfg.in_chans,
            checkpoint_path=cfg.checkpoint_path,
            **cfg.backbone_kwargs,
        )
        self.backbone = backbone
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():  # one probe frame: the token count P, the width E_b and the grid
                features = backbone.forward_features(torch.zeros(1, cfg.in_chans, *cfg.image_size))
        except Exception as err:  # the backbone decides what it accepts; report it with the fix
            raise ValueError(
                f"vision: backbone {cfg.backbone!r} rejected a (1, {cfg.in_chans}, {cfg.image_size[0]}, "
                f"{cfg.image_size[1]}) input ({err}); match image_size to the model, e.g. "
                "backbone_kwargs={'img_size': ...}"
            ) from err
        finally:
            backbone.train(was_training)
        backbone.to(**factory)
        probe = self._feature_tokens(features)  # (1, P, E_b)
        self.num_patches, width = probe.shape[1], probe.shape[2]
        if features.dim() == 4:
            self.grid_size = tuple(features.shape[1:3] if self._channels_last else features.shape[2:4])
        else:
            grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
            if grid is not None and math.prod(grid) == self.num_patches:
                self.grid_size = tuple(grid)
        self.backbone_proj = (
            nn.Identity() if width == cfg.embed_dim else nn.Linear(width, cfg.embed_dim, **factory)
        )

    @property
    def _channels_last(self) -> bool:
        return str(getattr(self.backbone, "output_fmt", "NCHW")).upper() == "NHWC"

    def _feature_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features -> patch tokens (F, P, E_b): prefix tokens dropped, maps flattened row-major."""
        if features.dim() == 4:  # a feature map, (F, E_b, h, w) or (F, h, w, E_b)
            if self._channels_last:
                return features.flatten(1, 2)  # (F, h * w, E_b)
            return features.flatten(2).transpose(1, 2)  # (F, h * w, E_b)
        if features.dim() == 3:  # a token sequence (F, prefix + P, E_b)
            return features[:, getattr(self.backbone, "num_prefix_tokens", 0) :]  # (F, P, E_b)
        raise ValueError(
            f"vision: backbone {self.config.backbone!r} returned features of shape {tuple(features.shape)}; "
            "expected (F, N, E_b) tokens or an (F, E_b, h, w) feature map"
        )

    def reset_parameters(self) -> None:
        """Learned position embedding ~ truncated N(0, 0.02); patch / tubelet embedding and backbone keep
        their own initialisation (timm's, PyTorch's)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def output_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Valid tokens for valid frames: ceil(l / tubelet_size) * P; (B,) -> (B,) (or int -> int)."""
        if isinstance(lengths, int):
            return -(-lengths // self.config.tubelet_size) * self.num_patches
        return ceil_div(lengths.long(), self.config.tubelet_size) * self.num_patches

    def tubelet_times(self, num_frames: int) -> torch.Tensor:
        """Start time in seconds of each tubelet of a `num_frames` clip: (T',), k * tubelet_size / frame_rate.

        Token k * P + j (any patch j) starts at tubelet_times(T)[k].
        """
        if self.config.frame_rate is None:
            raise ValueError("vision: tubelet_times needs VisionEncoderConfig.frame_rate (frames per second)")
        tubelets = -(-num_frames // self.config.tubelet_size)
        return torch.arange(tubelets, dtype=torch.float64) * (
            self.config.tubelet_size / self.config.frame_rate
        )

    def forward(
        self, pixels: torch.Tensor, lengths: torch.Tensor | None = None, *, frame_rate: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images (rank 4) or videos (rank 5); see `encode_image` and `encode_video`."""
        if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
            if frame_rate is not None:
                raise ValueError(
                    "vision: frame_rate applies to videos (B, T, C, H, W), got images (B, C, H, W)"
                )
            return self.encode_image(pixels, lengths)
        if isinstance(pixels, torch.Tensor) and pixels.dim() == 5:
            return self.encode_video(pixels, lengths, frame_rate=frame_rate)
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"vision: expected images (B, C, H, W) or videos (B, T, C, H, W) float, got {got}")

    def encode_image(
        self, images: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images.

        Args:
            images: (B, C, H, W) float.
            lengths: (B,) integer in {0, 1}: 0 marks a sample without an image (all its tokens
                are padding); None = every sample has one.

        Returns:
            tokens: (B, P, E), zero where padded; padding_mask: (B, P) bool, True at padding.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"vision: expected images (B, C, H, W) float, got {got}")
        return self._encode(images[:, None], lengths, "images (B, C, H, W)")  # as (B, 1, C, H, W)

    def encode_video(
        self, video: torch.Tensor, lengths: torch.Tensor | None = None, *, frame_rate: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode videos into tubelet tokens, time-major.

        Args:
            video: (B, T, C, H, W) float; frames beyond a sample's length are ignored.
            lengths: (B,) integer, valid frames per sample in [0, T]; None = all T valid.
            frame_rate: frames per second of `video`; must equal config.frame_rate when both are set.

        Returns:
            tokens: (B, T' * P, E), T' = ceil(T / tubelet_size), zero where padded.
            padding_mask: (B, T' * P) bool, True at padding; row b has output_lengths(lengths[b]) False.
        """
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"vision: expected video (B, T, C, H, W) float, got {got}")
        expected = self.config.frame_rate
        if (
            frame_rate is not None
            and expected is not None
            and not math.isclose(frame_rate, expected, rel_tol=1e-6)
        ):
            raise ValueError(
                f"vision: video at frame_rate={frame_rate} fps, but the encoder expects {expected} fps "
                "(VisionEncoderConfig.frame_rate); resample the frames first"
            )
        return self._encode(video, lengths, "video (B, T, C, H, W)")

    def _check_pixels(self, video: torch.Tensor, layout: str) -> None:
        cfg = self.config
        if not video.is_floating_point():
            raise ValueError(
                f"vision: expected {layout} float, got dtype {video.dtype}; "
                "convert and normalise the pixels first"
            )
        channels, height, width = video.shape[2:]
        if channels != cfg.in_chans:
            raise ValueError(
                f"vision: expected {cfg.in_chans} channels (in_chans), got {channels} in {layout}"
            )
        if (height, width) != tuple(cfg.image_size):
            raise ValueError(
                f"vision: expected frames of image_size={tuple(cfg.image_size)}, got ({height}, {width}); "
                "resize the inputs or change VisionEncoderConfig.image_size"
            )
        if cfg.check_finite:
            check_finite("vision", "pixels", video)

    def _encode(self, video: torch.Tensor, lengths: torch.Tensor | None, layout: str):
        """(B, T, C, H, W), lengths in frames -> tokens (B, T' * P, E), padding mask (B, T' * P)."""
        cfg = self.config
        self._check_pixels(video, layout)
        batch, frames = video.shape[:2]
        lengths = check_lengths("vision", lengths, batch, frames, "frames", video.device)
        tubelets = -(-frames // cfg.tubelet_size)
        pad = padding_mask(self.output_lengths(lengths), tubelets * self.num_patches)  # (B, T' * P)
        if tubelets == 0:
            return video.new_zeros(batch, 0, self.embed_dim, dtype=self._weight_dtype()), pad
        if self.backbone is not None:
            x = self._embed_with_backbone(video, lengths, tubelets)
        else:
            x = self._embed_patches(video, lengths, tubelets)
        x = x.reshape(batch, tubelets, self.num_patches, self.embed_dim)  # (B, T', P, E)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        elif self.sincos_pos_embed is not None:
            x = x + self.sincos_pos_embed.to(x.dtype)
        x = self.dropout(x.flatten(1, 2))  # (B, T' * P, E), time-major
        return x.masked_fill(pad[..., None], 0.0), pad

    def _weight_dtype(self) -> torch.dtype:
        module = self.patch_embed if self.patch_embed is not None else self.backbone
        return next(module.parameters()).dtype

    def _embed_patches(self, video: torch.Tensor, lengths: torch.Tensor, tubelets: int) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T' * P, E) with the patch (t = 1) or tubelet (t > 1) embedding."""
        batch, frames = video.shape[:2]
        video = video.to(self._weight_dtype())
        if self.config.tubelet_size == 1:
            x = self.patch_embed(video.flatten(0, 1))  # (B * T, P, E)
            return x.reshape(batch, frames * self.num_patches, self.embed_dim)  # (B, T * P, E)
        # Complete every tubelet with the sample's last valid frame: frame index min(i, l - 1).
        slots = tubelets * self.config.tubelet_size
        last = (lengths - 1).clamp_min(0)[:, None]  # (B, 1)
        index = torch.arange(slots, device=video.device)[None].clamp_max(frames - 1)  # (1, T' * t)
        index = torch.minimum(index, last)  # (B, T' * t)
        clip = video[torch.arange(batch, device=video.device)[:, None], index]  # (B, T' * t, C, H, W)
        x = self.patch_embed(clip.transpose(1, 2))  # (B, E, T', h, w)
        return x.flatten(2).transpose(1, 2)  # (B, T' * h * w, E), time-major

    def _embed_with_backbone(self, video: torch.Tensor, lengths: torch.Tensor, tubelets: int) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, T' * P, E): backbone on valid frames, mean over a tubelet's valid frames."""
        cfg = self.config
        batch, frames = video.shape[:2]
        valid = ~padding_mask(lengths, frames)  # (B, T)
        weight_dtype = self._weight_dtype()
        tokens = video.new_zeros(batch, frames, self.num_patches, self.embed_dim, dtype=weight_dtype)
        if bool(valid.any()):
            frame_tokens = self._feature_tokens(self.backbone.forward_features(video[valid].to(weight_dtype)))
            tokens[valid] = self.backbone_proj(frame_tokens).to(weight_dtype)  # (B, T, P, E) at valid frames
        if cfg.tubelet_size == 1:
            return tokens.flatten(1, 2)  # (B, T * P, E)
        slots = tubelets * cfg.tubelet_size
        tokens = nn.functional.pad(tokens, (0, 0, 0, 0, 0, slots - frames))  # (B, T' * t, P, E)
        weights = nn.functional.pad(valid, (0, slots - frames)).to(weight_dtype)  # (B, T' * t)
        tokens = tokens.view(batch, tubelets, cfg.tubelet_size, self.num_patches, self.embed_dim)
        weights = weights.view(batch, tubelets, cfg.tubelet_size)  # (B, T', t)
        total = (tokens * weights[..., None, None]).sum(2)  # (B, T', P, E)
        count = weights.sum(2).clamp_min(1.0)  # (B, T'); an all-padding tubelet stays zero
        return (total / count[..., None, None]).flatten(1, 2)  # (B, T' * P, E)
