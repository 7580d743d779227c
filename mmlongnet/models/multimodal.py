"""The multimodal LongNet: modality encoders, modality stacks, cross-modal multiway fusion.

Legend: B batch, N_m tokens of modality m, L fused tokens, E embed dim (d_model), M modalities.

    inputs {"text": (B, L_t) ids, "audio": (B, S) waveform, "video": (B, T, C, H, W) frames}
      -> encoder of each present modality -> tokens (B, N_m, E) + padding mask (B, N_m)
      -> modality stack (dilated self-attention layers, own schedule per modality)
      -> + modality type embedding (and, with `boundary_embeddings`, a start / end embedding on
         each sample's first / last token of the modality); each sample's valid tokens packed one
         modality after the other at the start of the fused sequence (its positions never depend on
         the batch)
      -> fusion stack: dilated self-attention over all modalities, whose projections, FFNs and
         norms are multiway experts chosen per token by its modality id
      -> fused tokens (B, L, E), padding mask, modality ids, pooled embeddings.

A modality absent from `inputs` (or None) is missing for the whole batch: its encoder and stack
do not run. A length of 0 marks one sample as lacking the modality.

Sequence parallel (after `mmlongnet.distributed.parallelize_sequence(model, group)`, P ranks that
hold the SAME batch): the encoders, modality stacks and packing run replicated, unsharded, on every
rank (packing moves tokens per sample and needs the whole sequence); the parallelized fusion stack
pads the fused sequence to a multiple of P with padding tokens, runs on this rank's slice of L/P
tokens (the dilated attention exchanging keys and values), and gathers the slices back,
differentiably, before pooling. The model itself holds no process group: its fusion stack names the
slice it runs on (`sequence_shard`, (index, P)), from which the batch plan routes the slice. The
outputs are those of the unsharded model; each rank's parameter gradients hold its slice's share, and
summed over the P ranks they are P times the unsharded gradients of a loss computed on every rank
alike (the gather's backward sums over ranks), so averaging over the P ranks gives them exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmlongnet._config import check_field_types
from mmlongnet._tracing import traced
from mmlongnet.attention.config import LongNetLayerConfig
from mmlongnet.attention.dilated import check_schedule
from mmlongnet.attention.global_queries import GlobalQueries
from mmlongnet.modalities import MODALITIES
from mmlongnet.modalities._common import check_lengths
from mmlongnet.modalities.audio import AudioEncoder, AudioEncoderConfig
from mmlongnet.modalities.text import TextEncoder, TextEncoderConfig
from mmlongnet.modalities.vision import VisionEncoder, VisionEncoderConfig
from mmlongnet.models.longnet import LongNetEncoder
from mmlongnet.models.packing import FusedLayout, to_device_at_once
from mmlongnet.pretrained import Pretrained

_ENCODERS = {"text": (TextEncoder, TextEncoderConfig), "audio": (AudioEncoder, AudioEncoderConfig),
             "video": (VisionEncoder, VisionEncoderConfig)}  # fmt: skip


@dataclass
class StackConfig:
    """A stack of dilated-attention encoder layers (one modality's, or the fusion's)."""

    num_layers: int = 2
    """Layers in the stack (0: none, the tokens pass through)."""
    segment_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    """Segment length of each dilated-attention branch."""
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Dilation rate of each branch."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"num_layers must be an int >= 0, got {self.num_layers!r}")
        self.segment_lengths, self.dilation_rates = check_schedule(self.segment_lengths, self.dilation_rates)


def _sub_config(cls, value, name: str):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise ValueError(f"{name} must be a {cls.__name__}, a dict of its fields, or None; got {value!r}")


@dataclass
class MMLongNetConfig:
    """Configuration of `MMLongNet` (every field validated; nested configs may be given as dicts)."""

    d_model: int = 512
    """E, the width of every token (the encoders' embed_dim must equal it)."""
    nhead: int = 8
    """Attention heads of every layer."""
    dim_feedforward: int = 2048
    """FFN hidden size of every layer."""
    dropout: float = 0.0
    """Residual and FFN dropout."""
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    """FFN activation."""
    positions: Literal["rope", "xpos"] | None = "rope"
    """Positions of every self-attention (rotary by default)."""
    rotary_fraction: float = 1.0
    """With positions="rope": the share of each head's channels rotated (whole pairs, at least one);
    the rest carry no position, so a query matches a key's content alike at every distance, also at
    distances longer than any seen in training. 1.0: all."""
    text: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    """Text encoder; None: the model has no text modality."""
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    """Audio encoder; None: no audio modality."""
    video: VisionEncoderConfig | None = field(default_factory=VisionEncoderConfig)
    """Image/video encoder; None: no video modality."""
    text_stack: StackConfig = field(default_factory=StackConfig)
    """Dilated-attention layers over the text tokens."""
    audio_stack: StackConfig = field(default_factory=StackConfig)
    """Dilated-attention layers over the audio tokens."""
    video_stack: StackConfig = field(default_factory=StackConfig)
    """Dilated-attention layers over the video tokens."""
    fusion_stack: StackConfig = field(
        default_factory=lambda: StackConfig(4, [2048, 4096, 8192, 16384], [1, 2, 4, 8])
    )
    """Cross-modal layers over the fused sequence (multiway experts per modality)."""
    fusion: Literal["sequence", "feature"] = "sequence"
    """"sequence": concatenate the modalities along the sequence (any lengths, any subset).
    "feature": time-aligned streams of equal token length per sample, concatenated along the
    feature dimension and projected to E (every configured modality must be present)."""
    checkpoint_activations: bool = False
    """Recompute each encoder and each layer in the backward instead of storing their activations
    (in training, with gradients enabled); inside the audio encoder, each chunk of its subsampling
    convolutions, whose C channels per frame and mel bin are the model's largest activations on
    long recordings."""
    backend: Literal["auto", "reference", "sdpa"] = "auto"
    """The dilated-attention backend."""
    scalable_softmax: int | None = None
    """None: plain softmax. n0 >= 2: Scalable-Softmax in every self-attention (each head's scores
    times s_h * log(n), n the valid tokens of the sample in that stack, s_h learned from
    1 / log(n0)): a score margin that singles out a few tokens keeps their weight at every length
    (`LongNetLayerConfig.scalable_softmax`)."""
    boundary_embeddings: bool | Literal["shared"] = False
    """Add a learned start embedding to each sample's first valid token of every modality and an end
    embedding to its last, before the fusion: where a modality begins and ends in the fused sequence
    is then in the tokens' content, which attention finds at any distance (rotary positions say only
    how far apart two tokens are, and the length of a modality varies from sample to sample).
    True: one start / end pair per modality; "shared": one pair for every modality, so a query that
    learned to find one modality's end (e.g. the audio's, for "the last digit") finds every other's
    too (the type embedding still tells the modalities apart); False: none."""
    global_modalities: list[str] = field(default_factory=list)
    """Modalities whose tokens attend to every fused token in the fusion layers, densely, while the
    others keep dilated attention (`mmlongnet.attention.GlobalQueries`): e.g. ["text"], so that a
    question weighs every frame and word alike (a dilated branch shows a query the far tokens of
    one residue in one head per branch). Costs G * L scores per head and layer, G the batch's
    padded token width of these modalities. Needs fusion="sequence"; empty (none) by default."""
    global_read: bool = False
    """With global_modalities: every other fused token also reads their tokens in every fusion
    layer, a softmax over their keys alone added through a learned per-head gate that starts at 0
    (`LongNetLayerConfig.global_read`): each frame can see the question, as the question sees
    every frame. Costs L * G scores per head and layer."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("d_model", "nhead", "dim_feedforward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.nhead:
            raise ValueError(f"nhead must divide d_model={self.d_model}, got nhead={self.nhead}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name, (_, cls) in _ENCODERS.items():
            setattr(self, name, _sub_config(cls, getattr(self, name), name))
            config = getattr(self, name)
            if config is not None and config.embed_dim != self.d_model:
                raise ValueError(
                    f"{name}.embed_dim must equal d_model={self.d_model}, got {config.embed_dim}"
                )
            stack = f"{name}_stack"
            setattr(self, stack, _sub_config(StackConfig, getattr(self, stack), stack))
        self.fusion_stack = _sub_config(StackConfig, self.fusion_stack, "fusion_stack")
        if not self.modalities:
            raise ValueError("at least one of text, audio, video must be configured (not None)")
        if self.fusion not in ("sequence", "feature"):
            raise ValueError(f"fusion must be 'sequence' or 'feature', got {self.fusion!r}")
        if not (isinstance(self.boundary_embeddings, bool) or self.boundary_embeddings == "shared"):
            raise ValueError(
                f"boundary_embeddings must be False, True (one pair per modality) or 'shared', got "
                f"{self.boundary_embeddings!r}"
            )
        if self.positions not in ("rope", "xpos", None):
            raise ValueError(f"positions must be 'rope', 'xpos' or None, got {self.positions!r}")
        unknown = [name for name in self.global_modalities if name not in self.modalities]
        if unknown or len(set(self.global_modalities)) != len(self.global_modalities):
            raise ValueError(
                f"global_modalities must name configured modalities {self.modalities} once each, got "
                f"{self.global_modalities}"
            )
        if self.global_modalities and self.fusion != "sequence":
            raise ValueError("global_modalities needs fusion='sequence' (rows of the fused sequence)")
        if self.global_read and not self.global_modalities:
            raise ValueError("global_read reads the tokens of global_modalities: name them, e.g. ['text']")
        # the layers' own checks (rotary_fraction, xpos segment lengths) now rather than at build
        for stack in [f"{name}_stack" for name in self.modalities] + ["fusion_stack"]:
            try:
                self.layer_config(getattr(self, stack))
            except ValueError as error:
                raise ValueError(f"{stack}: {error}") from None

    def layer_config(self, stack: StackConfig) -> LongNetLayerConfig:
        """The layers of `stack`: its schedule, and this config's width, heads, FFN, dropout,
        activation, positions (and rotary fraction), checkpointing, backend and scalable softmax."""
        return LongNetLayerConfig(
            d_model=self.d_model, nhead=self.nhead, dim_feedforward=self.dim_feedforward,
            segment_lengths=stack.segment_lengths, dilation_rates=stack.dilation_rates, dropout=self.dropout,
            activation=self.activation, positions=self.positions, rotary_fraction=self.rotary_fraction,
            checkpoint_activations=self.checkpoint_activations, backend=self.backend,
            scalable_softmax=self.scalable_softmax,
        )  # fmt: skip

    @property
    def modalities(self) -> list[str]:
        """The configured modalities, in fusion order (their index is the modality id)."""
        return [name for name in MODALITIES if getattr(self, name) is not None]

    @classmethod
    def tiny(cls, **overrides) -> MMLongNetConfig:
        """A small model for tests and CPU demos: E=32, 4 heads, 1-layer stacks, 2 fusion layers."""
        schedule = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
        fields = dict(
            d_model=32, nhead=4, dim_feedforward=64,
            text=TextEncoderConfig(embed_dim=32),
            audio=AudioEncoderConfig(embed_dim=32, n_fft=256, hop_length=160, n_mels=16, conv_channels=8),
            video=VisionEncoderConfig(embed_dim=32, image_size=16, patch_size=8, tubelet_size=2),
            text_stack=StackConfig(1, **schedule), audio_stack=StackConfig(1, **schedule),
            video_stack=StackConfig(1, **schedule), fusion_stack=StackConfig(2, [16, 32], [1, 2]),
        )  # fmt: skip
        return cls(**(fields | overrides))


@dataclass
class MMLongNetOutput:
    """What `MMLongNet` returns (B batch, L fused tokens, E width)."""

    tokens: torch.Tensor
    """(B, L, E) fused tokens."""
    padding_mask: torch.Tensor
    """(B, L) bool, True = padding."""
    modality_ids: torch.Tensor
    """(B, L) long, index into `MMLongNetConfig.modalities` (padding: the first present one)."""
    pooled: torch.Tensor
    """(B, E) mean of each sample's fused tokens."""
    modality_pooled: dict[str, torch.Tensor]
    """Per present modality, (B, E) mean of its stack's tokens (zeros where a sample lacks it)."""
    modality_present: dict[str, torch.Tensor]
    """Per present modality, (B,) bool: which samples carry it."""


@dataclass(frozen=True)
class BatchPlan:
    """What `MMLongNet` derives from a batch's lengths on the host, once (`MMLongNet.plan_batch`).

    The forward reads no value of a tensor back on the host when it is given a plan: every
    length-dependent decision (masks or none, the fused layout, the multiway routing) is made here,
    from lengths on the CPU, and the plan's tensors reach the device in one non-blocking copy.
    """

    order: tuple[str, ...]
    """The present modalities, in the model's order."""
    sizes: dict[str, int]
    """Per present modality, the padded raw size S_m of its input (ids, samples or frames)."""
    widths: dict[str, int]
    """Per present modality, N_m, the tokens its encoder makes of S_m."""
    lengths: dict[str, torch.Tensor]
    """Per present modality, (B,) long valid raw lengths, checked, on the CPU."""
    device_lengths: dict[str, torch.Tensor]
    """The same lengths on the model's device (what a compiled forward reads)."""
    stack_padding: dict[str, bool]
    """Per present modality, whether its stack runs masked: its tokens hold padding, or the plan
    was made `always_masked`."""
    layout: FusedLayout | None
    """The fused sequence: packing, padding mask, modality ids, multiway routing (on the device);
    None in a plan for encoding modalities alone."""
    fused_padding: bool
    """Whether the fusion stack runs masked: the fused sequence holds padding, or the plan was made
    `always_masked`."""
    valid_tokens: int
    """Valid fused tokens of the batch."""
    audio_sample_rate: int | None = None
    """The waveforms' rate (None: the audio encoder's)."""

    def tensors(self) -> list[torch.Tensor]:
        """The plan's device tensors, in a fixed order: the fused layout's, then the lengths."""
        layout = self.layout.tensors() if self.layout is not None else []
        return [*layout, *(self.device_lengths[name] for name in self.order)]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> BatchPlan:
        """The same plan over `tensors` (as `tensors()` lists them), e.g. a recorded step's buffers."""
        count = len(tensors) - len(self.order)
        layout = self.layout.with_tensors(tensors[:count]) if self.layout is not None else None
        lengths = dict(zip(self.order, tensors[count:], strict=True))
        return dataclasses.replace(self, layout=layout, device_lengths=lengths)

    def signature(self) -> tuple:
        """What a forward given this plan decides on the host, beside the tensors' shapes: equal
        for every batch of a length bucket planned `always_masked` (the lengths themselves, the
        valid token count and the host copies are not in it)."""
        layout, routing = self.layout, self.layout and self.layout.routing
        return (
            self.order, tuple(self.sizes.items()), tuple(self.widths.items()),
            tuple(self.stack_padding.items()), self.fused_padding, self.audio_sample_rate,
            layout and layout.length, routing and (routing.shape, routing.capacities),
        )  # fmt: skip


# Per modality, the names the encoder's own checks use: (modality in messages, unit of a length).
_LENGTH_UNITS = {"text": ("text", "tokens"), "audio": ("audio", "samples"), "video": ("vision", "frames")}


def _masked_mean(tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """(B, N, E), (B, N) -> (B, E): mean over valid tokens, zeros for a sample without any."""
    keep = (~padding).to(tokens.dtype)[..., None]  # (B, N, 1)
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def boundary_marks(padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) padding (True = padding, each sample's valid tokens first) -> first, last (B, N) bool:
    True on each sample's first / last valid token (one token may be both; none without a valid
    token). Elementwise on the device, no host sync."""
    valid = ~padding
    first = torch.zeros_like(valid)
    first[:, :1] = valid[:, :1]
    last = valid.clone()
    last[:, :-1] &= padding[:, 1:]  # valid, and the next token padding (or none)
    return first, last


class MMLongNet(Pretrained, nn.Module):
    """The multimodal long-context model; see the module docstring for the data flow.

    forward(inputs, lengths=None, *, audio_sample_rate=None, plan=None) -> MMLongNetOutput
        inputs: {"text": (B, L_t) long, "audio": (B, S) float, "video": (B, T, C, H, W) or
            images (B, C, H, W)}; a missing key or None = the modality is absent for the batch.
        lengths: {name: (B,) long} valid raw lengths (tokens, samples, frames); 0 = this sample
            lacks the modality; a missing entry = all valid. Best on the CPU (no device sync).
        audio_sample_rate: the waveforms' rate if it is not the encoder's.
        plan: instead of lengths and audio_sample_rate, `plan_batch(inputs, lengths, ...)` made
            beforehand; then the forward reads no tensor back on the host and compiles whole.
    """

    config_class = MMLongNetConfig

    def __init__(self, config: MMLongNetConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, MMLongNetConfig):
            raise TypeError(f"config must be an MMLongNetConfig, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.encoders = nn.ModuleDict()
        self.stacks = nn.ModuleDict()
        for name in config.modalities:
            encoder_cls, _ = _ENCODERS[name]
            options = {"checkpoint_activations": config.checkpoint_activations} if name == "audio" else {}
            self.encoders[name] = encoder_cls(getattr(config, name), **options, **factory)
            stack = getattr(config, f"{name}_stack")
            if stack.num_layers:
                self.stacks[name] = LongNetEncoder(stack.num_layers, config.layer_config(stack), **factory)
        num_ways = len(config.modalities) if config.fusion == "sequence" else 1
        self.type_embedding = nn.Embedding(len(config.modalities), config.d_model, **factory)
        self.boundary_embedding = None  # rows 2 m and 2 m + 1: start and end of modality m (shared: m = 0)
        if config.boundary_embeddings:
            pairs = 1 if config.boundary_embeddings == "shared" else len(config.modalities)
            self.boundary_embedding = nn.Embedding(2 * pairs, config.d_model, **factory)
        self.feature_proj = None
        if config.fusion == "feature":
            self.feature_proj = nn.Linear(len(config.modalities) * config.d_model, config.d_model, **factory)
        fusion = config.fusion_stack
        self.fusion = None
        if fusion.num_layers:
            layers = dataclasses.replace(config.layer_config(fusion), global_read=config.global_read)
            self.fusion = LongNetEncoder(fusion.num_layers, layers, num_ways=num_ways, **factory)
        for embedding in (self.type_embedding, self.boundary_embedding):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=config.d_model**-0.5)

    # --- single modalities -------------------------------------------------------------------

    def _encode(self, name: str, x: torch.Tensor, plan: BatchPlan):
        """Encoder and stack of one modality -> tokens (B, N_m, E), padding (B, N_m)."""
        encoder = self.encoders[name]
        # Compiled or recorded, the encoder reads the lengths on the device (the plan has checked
        # them); eager, it checks them on the CPU and copies them without waiting.
        lengths = plan.device_lengths[name] if traced() else plan.lengths[name]
        kwargs = {"sample_rate": plan.audio_sample_rate} if name == "audio" else {}
        try:
            if self.config.checkpoint_activations and self.training and torch.is_grad_enabled():
                tokens, padding = checkpoint(encoder, x, lengths, use_reentrant=False, **kwargs)
            else:
                tokens, padding = encoder(x, lengths, **kwargs)  # (B, N_m, E), (B, N_m)
        except (TypeError, ValueError) as error:  # name the modality as the caller named it
            raise type(error)(f"inputs[{name!r}]: {error}") from error
        if tokens.shape[1] != plan.widths[name]:
            raise ValueError(
                f"inputs[{name!r}]: the encoder made {tokens.shape[1]} tokens, the plan expects "
                f"{plan.widths[name]}; plan the batch with the inputs it is run on"
            )
        if name in self.stacks:
            tokens = self.stacks[name](tokens, padding if plan.stack_padding[name] else None)
        return tokens, padding

    def _encode_alone(
        self,
        name: str,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        audio_sample_rate: int | None = None,
        pooled: bool = False,
    ):
        if name not in self.encoders:
            raise ValueError(f"this model has no {name} modality (configured: {self.config.modalities})")
        plan = self._plan(
            {name: x}, None if lengths is None else {name: lengths}, audio_sample_rate, fuse=False
        )
        tokens, padding = self._encode(name, x, plan)
        return _masked_mean(tokens, padding) if pooled else (tokens, padding)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None, *, pooled: bool = False):
        """Text ids (B, L) -> (tokens (B, L, E), padding_mask (B, L)) after the text stack; with
        `pooled=True` the mean of each sample's valid tokens instead, (B, E)."""
        return self._encode_alone("text", tokens, lengths, pooled=pooled)

    def encode_audio(
        self, waveform: torch.Tensor, lengths: torch.Tensor | None = None, sample_rate=None, *, pooled=False
    ):
        """Waveform (B, S) -> (tokens (B, N_a, E), padding_mask (B, N_a)) after the audio stack; with
        `pooled=True` the mean of each sample's valid tokens instead, (B, E)."""
        return self._encode_alone("audio", waveform, lengths, audio_sample_rate=sample_rate, pooled=pooled)

    def encode_video(
        self, frames: torch.Tensor, lengths: torch.Tensor | None = None, *, pooled: bool = False
    ):
        """Video (B, T, C, H, W) or images (B, C, H, W) -> (tokens (B, N_v, E), padding_mask) after
        the video stack; with `pooled=True` the mean of each sample's valid tokens instead, (B, E)."""
        return self._encode_alone("video", frames, lengths, pooled=pooled)

    def modality_model(self, name: str) -> MMLongNet:
        """One modality's encoder and its modality stack as a model of their own (weights copied),
        whose `encode_<name>` gives what this model's does: export an encoder with
        `model.modality_model("audio").save_pretrained(dir)`, reload it with
        `MMLongNet.from_pretrained(dir)`."""
        if name not in self.encoders:
            raise ValueError(f"this model has no {name} modality (configured: {self.config.modalities})")
        fusion = self.config.fusion_stack
        config = dataclasses.replace(
            self.config, **{other: None for other in MODALITIES if other != name},
            fusion_stack=StackConfig(0, fusion.segment_lengths, fusion.dilation_rates), fusion="sequence",
        )  # fmt: skip
        reference = next(self.parameters())
        single = MMLongNet(config, device=reference.device, dtype=reference.dtype)
        single.encoders[name].load_state_dict(self.encoders[name].state_dict())
        if name in self.stacks:
            single.stacks[name].load_state_dict(self.stacks[name].state_dict())
        index = self.config.modalities.index(name)
        with torch.no_grad():
            single.type_embedding.weight.copy_(self.type_embedding.weight[index : index + 1])
        return single.train(self.training)

    # --- the multimodal forward --------------------------------------------------------------

    def _check_inputs(self, inputs, lengths) -> tuple[dict, dict, int]:
        if not isinstance(inputs, dict):
            raise TypeError(f"inputs must be a dict of modality name -> tensor, got {type(inputs).__name__}")
        lengths = dict(lengths or {})
        for name in list(inputs) + list(lengths):
            if name not in self.config.modalities:
                raise ValueError(
                    f"unknown modality {name!r}; this model takes {self.config.modalities} (missing ones may "
                    "be left out or set to None)"
                )
        present = {name: x for name, x in inputs.items() if x is not None}
        if not present:
            raise ValueError(f"inputs hold no modality: pass at least one of {self.config.modalities}")
        for name in lengths:
            if name not in present:
                raise ValueError(f"lengths given for {name!r}, which is missing from inputs")
        batch = {
            name: x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None
            for name, x in present.items()
        }
        if len(set(batch.values())) != 1 or None in batch.values():
            raise ValueError(f"every modality must have the same batch size B, got {batch}")
        size = next(iter(batch.values()))
        for name, value in lengths.items():
            if not isinstance(value, torch.Tensor) or value.shape != (size,) or value.dtype != torch.long:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: lengths must be a (B,) = ({size},) long tensor, got {shape}")
        return present, lengths, size

    def plan_batch(
        self,
        inputs: dict[str, torch.Tensor | None],
        lengths: dict[str, torch.Tensor] | None = None,
        *,
        audio_sample_rate: int | None = None,
        always_masked: bool = False,
    ) -> BatchPlan:
        """Check a batch and derive, on the host, everything its lengths decide (see `BatchPlan`).

        Takes what `forward` takes. Lengths on the CPU (as `collate_samples` leaves them) are read
        without a device sync; lengths on a device are copied back once. When the fusion stack runs
        sequence-sharded (`parallelize_sequence`), the multiway routing is of this rank's slice.
        `always_masked`: every stack runs with its padding mask even where the batch holds no
        padding (outputs unchanged), so that every batch of a length bucket takes the same path:
        one compiled graph per bucket instead of one per combination of padded stacks.
        """
        return self._plan(inputs, lengths, audio_sample_rate, fuse=True, always_masked=always_masked)

    def _plan(
        self, inputs, lengths, audio_sample_rate: int | None, fuse: bool, always_masked: bool = False
    ) -> BatchPlan:
        """`plan_batch`; without `fuse`, only the modalities' part (for encoding them alone)."""
        present, lengths, batch = self._check_inputs(inputs, lengths)
        order = tuple(name for name in self.config.modalities if name in present)
        sizes, widths, host, token_lengths = {}, {}, {}, []
        for name in order:
            x, encoder = present[name], self.encoders[name]
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"inputs[{name!r}]: expected a batch (B, ...) with a length axis, got {got}")
            sizes[name] = 1 if name == "video" and x.dim() == 4 else x.shape[1]  # images are 1 frame
            given = lengths.get(name)
            modality, unit = _LENGTH_UNITS[name]
            try:
                given = None if given is None else given.cpu()
                host[name] = check_lengths(modality, given, batch, sizes[name], unit, torch.device("cpu"))
            except ValueError as error:
                raise ValueError(f"inputs[{name!r}]: {error}") from error
            kwargs = {"sample_rate": audio_sample_rate} if name == "audio" else {}
            widths[name] = encoder.output_lengths(sizes[name], **kwargs)
            token_lengths.append(encoder.output_lengths(host[name], **kwargs))  # (B,)
        stack_padding = {
            name: always_masked or bool((n.numpy() < widths[name]).any())
            for name, n in zip(order, token_lengths, strict=True)
        }
        device = self.type_embedding.weight.device
        if not fuse:
            moved = to_device_at_once([host[name] for name in order], device)
            return BatchPlan(
                order=order, sizes=sizes, widths=widths, lengths=host,
                device_lengths=dict(zip(order, moved, strict=True)), stack_padding=stack_padding, layout=None,
                fused_padding=False, valid_tokens=0, audio_sample_rate=audio_sample_rate,
            )  # fmt: skip
        sequence = self.config.fusion == "sequence"
        layout = FusedLayout.build(
            token_lengths, [widths[name] for name in order], [self.config.modalities.index(m) for m in order],
            num_ways=len(self.config.modalities) if sequence and self.fusion is not None else 1,
            shard=getattr(self.fusion, "sequence_shard", None),  # (index, P) of a sharded fusion stack
        )  # fmt: skip
        if sequence:
            fused_padding, valid_tokens = always_masked or layout.has_padding, layout.valid_tokens
        else:
            self._check_aligned(order, widths, token_lengths)
            fused_padding, valid_tokens = stack_padding[order[0]], int(token_lengths[0].numpy().sum())
        moved = to_device_at_once([*layout.tensors(), *(host[name] for name in order)], device)
        count = len(layout.tensors())
        return BatchPlan(
            order=order, sizes=sizes, widths=widths, lengths=host,
            device_lengths=dict(zip(order, moved[count:], strict=True)), stack_padding=stack_padding,
            layout=layout.with_tensors(moved[:count]), fused_padding=fused_padding, valid_tokens=valid_tokens,
            audio_sample_rate=audio_sample_rate,
        )  # fmt: skip

    def forward(
        self,
        inputs: dict[str, torch.Tensor | None],
        lengths: dict[str, torch.Tensor] | None = None,
        *,
        audio_sample_rate: int | None = None,
        plan: BatchPlan | None = None,
    ) -> MMLongNetOutput:
        """See the class docstring. `plan`: `plan_batch(inputs, lengths, ...)` made beforehand (then
        leave `lengths` and `audio_sample_rate` out): the forward reads no tensor on the host, and
        `torch.compile(model, fullgraph=True, options=mmlongnet.training.COMPILE_OPTIONS)` traces it
        whole (the options keep the backward's norm gradients right on long batches)."""
        if plan is None:
            plan = self.plan_batch(inputs, lengths, audio_sample_rate=audio_sample_rate)
        elif lengths is not None or audio_sample_rate is not None:
            raise ValueError("pass either lengths (and audio_sample_rate) or a plan made from them, not both")
        present = {name: inputs.get(name) for name in plan.order}
        for name, x in present.items():
            size = 1 if name == "video" and x.dim() == 4 else x.shape[1]
            if size != plan.sizes[name]:
                raise ValueError(
                    f"inputs[{name!r}] has size {size}, the plan {plan.sizes[name]}: plan this batch"
                )
        streams = {name: self._encode(name, present[name], plan) for name in plan.order}
        layout = plan.layout
        modality_pooled = {name: _masked_mean(*streams[name]) for name in plan.order}
        modality_present = {name: layout.present[i] for i, name in enumerate(plan.order)}
        if self.config.fusion == "sequence":
            typed = [self._typed(name, *streams[name]) for name in plan.order]  # M x (B, N_m, E)
            tokens, padding, ids = layout.pack(typed), layout.padding_mask, layout.modality_ids  # (B, L, ...)
        else:
            tokens, padding, ids = self._concat_features(streams, plan.order)
        if self.fusion is not None:
            routing = layout.routing if self.config.fusion == "sequence" else None
            tokens = self.fusion(
                tokens, padding if plan.fused_padding else None, modality_ids=routing,
                global_queries=self._global_queries(plan, ids, padding),
            )  # fmt: skip
        return MMLongNetOutput(
            tokens=tokens, padding_mask=padding, modality_ids=ids, pooled=_masked_mean(tokens, padding),
            modality_pooled=modality_pooled, modality_present=modality_present,
        )  # fmt: skip

    def _check_aligned(self, order: tuple[str, ...], widths: dict[str, int], token_lengths: list) -> None:
        """fusion="feature" needs every modality, with equal token widths and lengths (on the host)."""
        if list(order) != self.config.modalities:
            missing = sorted(set(self.config.modalities) - set(order))
            raise ValueError(f"fusion='feature' needs every modality in the batch; missing {missing}")
        lengths = [n.tolist() for n in token_lengths]
        if len(set(widths.values())) != 1 or any(n != lengths[0] for n in lengths[1:]):
            raise ValueError(
                "fusion='feature' needs time-aligned streams with equal token lengths per sample; got "
                f"token widths {widths} and lengths {dict(zip(order, lengths, strict=True))}; use "
                "fusion='sequence' otherwise"
            )

    def _global_queries(
        self, plan: BatchPlan, ids: torch.Tensor, padding: torch.Tensor
    ) -> GlobalQueries | None:
        """The fused rows of `global_modalities` (ids, padding (B, L)), G their padded widths' sum;
        None where the batch holds none of them."""
        names = [name for name in self.config.global_modalities if name in plan.order]
        if not names:
            return None
        mask = torch.zeros_like(padding)
        for name in names:
            mask |= ids == self.config.modalities.index(name)
        return GlobalQueries(mask & ~padding, sum(plan.widths[name] for name in names))

    def _typed(self, name: str, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """A modality's tokens (B, N_m, E) as the fusion takes them: plus the modality's type embedding
        and, with boundary embeddings, its start / end embedding on each sample's first / last valid
        token (padding (B, N_m), True = padding, valid tokens first; a sample without the modality gets
        neither)."""
        index = self.config.modalities.index(name)
        tokens = tokens + self.type_embedding.weight[index]
        if self.boundary_embedding is None:
            return tokens
        first, last = boundary_marks(padding)  # 2 x (B, N_m)
        pair = 0 if self.config.boundary_embeddings == "shared" else index
        start, end = self.boundary_embedding.weight[2 * pair : 2 * pair + 2]  # 2 x (E,)
        return tokens + first[..., None].to(tokens.dtype) * start + last[..., None].to(tokens.dtype) * end

    def _concat_features(self, streams: dict, order: tuple[str, ...]):
        """Time-aligned streams of equal length (checked by the plan), concatenated along E and
        projected: (B, N, E), padding (B, N), ids (B, N)."""
        features = torch.cat([self._typed(name, *streams[name]) for name in order], dim=-1)  # (B, N, M*E)
        padding = streams[order[0]][1]
        ids = torch.zeros(padding.shape, dtype=torch.long, device=padding.device)
        return self.feature_proj(features), padding, ids

    # --- inputs for docs, tests and benchmarks ----------------------------------------------

    def example_inputs(self, batch_size: int = 2, seed: int = 0, *, scale: int = 1):
        """Valid random inputs of every configured modality, with varied lengths.

        Returns (inputs, lengths) for `forward`. `scale` multiplies every length (longer inputs for
        benchmarks). Text: up to 24 * scale ids; audio: up to 0.5 * scale seconds; video: up to
        6 * scale frames.
        """
        generator = torch.Generator().manual_seed(seed)
        device = self.type_embedding.weight.device
        inputs, lengths = {}, {}

        def varied(limit: int) -> torch.Tensor:
            low = max(1, limit // 2)
            return torch.randint(low, limit + 1, (batch_size,), generator=generator)

        if "text" in self.encoders:
            cfg = self.config.text
            n = 24 * scale if cfg.max_length is None else min(24 * scale, cfg.max_length)
            lengths["text"] = varied(n)
            inputs["text"] = torch.randint(3, cfg.vocab_size, (batch_size, n), generator=generator)
        if "audio" in self.encoders:
            n = self.config.audio.sample_rate * scale // 2
            lengths["audio"] = varied(n)
            inputs["audio"] = 0.1 * torch.randn(batch_size, n, generator=generator)
        if "video" in self.encoders:
            cfg = self.config.video
            height, width = (
                (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
            )
            n = 6 * scale
            lengths["video"] = varied(n)
            inputs["video"] = torch.randn(batch_size, n, cfg.in_chans, height, width, generator=generator)
        for name in list(lengths):  # padding beyond each length is zero, as a collate would leave it
            mask = torch.arange(inputs[name].shape[1])[None, :] >= lengths[name][:, None]
            inputs[name] = inputs[name].masked_fill(
                mask.view(*mask.shape, *[1] * (inputs[name].dim() - 2)), 0
            )
        return {k: v.to(device) for k, v in inputs.items()}, {k: v.to(device) for k, v in lengths.items()}


__all__ = ["MMLongNet", "MMLongNetConfig", "MMLongNetOutput", "StackConfig"]
