"""Audio: waveform -> log-mel spectrogram -> convolutional subsampling -> tokens (+ optional Conformer).

Legend: B batch, S samples, F spectrogram frames, M mel bins, C conv channels, N tokens,
E embed dim.

Token arithmetic (exact; `AudioEncoder.output_lengths` implements it). A waveform of l valid
samples (l >= 1) gives

    F(l) = 1 + (l + 2 * (n_fft // 2) - n_fft) // hop_length       (= 1 + l // hop for even n_fft)

frames: the STFT is centred, each side of the waveform is padded with n_fft // 2 ZEROS and
frame f covers the padded samples [f * hop, f * hop + n_fft). Each of the k = log2(subsampling)
stride-2 convolutions (kernel 3, padding 1) maps n frames to ceil(n / 2) = (n + 1) // 2, so

    N(l) = ceil(F(l) / subsampling)    (k halvings, each rounding up);    N(0) = 0.

With the defaults (16 kHz, hop 160, subsampling 4) one token covers 40 ms: 25 tokens/s.

Batch invariance (a sample's valid tokens do not depend on what else is in its batch, exactly
up to float rounding): a sample of length l padded to S > l must see, wherever its valid
tokens look, exactly what it would see if it were alone with S = l.
- Samples beyond l are set to zero before the STFT. The STFT's centring pads with zeros
  (pad_mode="constant", not the usual "reflect", which would mirror the padding region), so
  the F(l) valid frames see the same samples alone or batched.
- Frames beyond F(l) may still hold signal (their windows overlap the last valid samples);
  they are set to zero after the log, which is what the first convolution's own zero padding
  supplies when the sample is alone. After every convolution the positions beyond the valid
  length are zeroed again, for the same reason.
- The Conformer trunk (torchaudio) masks padded keys in its attention; its depthwise
  convolution would read the padded positions, so a forward pre-hook zeroes them right
  before that convolution. Its BatchNorm is per-position in eval mode; in training mode its
  batch statistics include padded positions (as in any BatchNorm over a padded batch).
No valid sample is dropped: with n_fft // 2 >= hop_length (the defaults), centring puts the
last samples inside frame F(l) - 1, and a waveform shorter than one hop still gives one token.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torchaudio
from torch import nn
from torch.utils.checkpoint import checkpoint

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

__all__ = ["AudioEncoder", "AudioEncoderConfig", "ConformerConfig"]

_SUBSAMPLINGS = (1, 2, 4, 8)


@dataclass
class ConformerConfig:
    """Options of the Conformer trunk (Gulati et al. 2020, arXiv 2005.08100; torchaudio.models.Conformer)."""

    num_layers: int = 4
    """Conformer blocks."""
    num_heads: int = 4
    """Attention heads; must divide embed_dim."""
    ffn_dim: int = 1024
    """Hidden width of the two half-step feed-forward modules."""
    depthwise_conv_kernel_size: int = 31
    """Kernel of the depthwise convolution, odd (same padding)."""
    dropout: float = 0.0
    """Dropout inside the blocks, in [0, 1)."""
    convolution_first: bool = False
    """Run the convolution module before self-attention."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("num_layers", "num_heads", "ffn_dim", "depthwise_conv_kernel_size"):
            check_positive_int(f"conformer.{name}", getattr(self, name))
        if self.depthwise_conv_kernel_size % 2 == 0:
            raise ValueError(
                "conformer.depthwise_conv_kernel_size must be odd (same padding), "
                f"got {self.depthwise_conv_kernel_size}"
            )
        check_dropout("conformer.dropout", self.dropout)


@dataclass
class AudioEncoderConfig:
    """Log-mel front end, convolutional subsampling and optional Conformer trunk."""

    embed_dim: int = 512
    """E, width of the output tokens."""
    sample_rate: int = 16000
    """Rate (Hz) the encoder works at; inputs at another rate are resampled (see `resample`)."""
    n_fft: int = 400
    """STFT size (and window length) in samples; 400 = 25 ms at 16 kHz."""
    hop_length: int = 160
    """STFT hop in samples; 160 = 10 ms at 16 kHz."""
    n_mels: int = 80
    """Mel bins M."""
    f_min: float = 0.0
    """Lowest mel filter frequency (Hz)."""
    f_max: float | None = None
    """Highest mel filter frequency (Hz); None = sample_rate / 2."""
    log_floor: float = 1e-6
    """Mel power is clamped to at least this before the log."""
    subsampling: int = 4
    """Total time stride of the convolutions: 1, 2, 4 or 8 (log2 of it stride-2 Conv2d layers)."""
    conv_channels: int | None = None
    """Channels C of the subsampling convolutions; None = embed_dim."""
    conv_chunk_tokens: int | None = 4096
    """The subsampling runs over chunks of this many output tokens, each reading the few frames
    around it that it depends on (exact: the chunks join into what one pass would give). Bounds
    the convolutions' working memory to one chunk (C x 2 * chunk x M / 2 values at the first
    layer) and keeps each call far below 2^31 elements (one pass over 78 minutes of 16 kHz audio
    at C = 768 passes it); None = one pass."""
    dropout: float = 0.0
    """Dropout after the projection to embed_dim, in [0, 1)."""
    resample: bool = True
    """Resample inputs at another rate with torchaudio.functional.resample; False raises instead."""
    trunk: Literal["none", "conformer"] = "none"
    """Layers after the projection: none, or a Conformer configured by `conformer`."""
    conformer: ConformerConfig = field(default_factory=ConformerConfig)
    """Conformer options, used when trunk == "conformer"."""
    check_finite: bool = False
    """Raise if the waveform holds NaN or inf; costs a device sync."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if isinstance(self.conformer, dict):
            known = {f.name for f in fields(ConformerConfig)}
            unknown = sorted(set(self.conformer) - known)
            if unknown:
                raise ValueError(f"conformer has unknown keys {unknown}; allowed: {sorted(known)}")
            self.conformer = ConformerConfig(**self.conformer)
        if not isinstance(self.conformer, ConformerConfig):
            raise ValueError(f"conformer must be a ConformerConfig, got {type(self.conformer).__name__}")
        for name in ("embed_dim", "sample_rate", "n_fft", "hop_length", "n_mels"):
            check_positive_int(name, getattr(self, name))
        for name in ("conv_channels", "conv_chunk_tokens"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        nyquist = self.sample_rate / 2
        if not 0.0 <= self.f_min < nyquist:
            raise ValueError(f"f_min must be in [0, sample_rate / 2 = {nyquist}), got {self.f_min}")
        if self.f_max is not None and not self.f_min < self.f_max <= nyquist:
            raise ValueError(
                f"f_max must be in (f_min={self.f_min}, sample_rate / 2 = {nyquist}], got {self.f_max}"
            )
        if not self.log_floor > 0:
            raise ValueError(f"log_floor must be positive, got {self.log_floor}")
        if self.subsampling not in _SUBSAMPLINGS:
            raise ValueError(f"subsampling must be one of {_SUBSAMPLINGS}, got {self.subsampling!r}")
        check_dropout("dropout", self.dropout)
        if self.trunk not in ("none", "conformer"):
            raise ValueError(f"trunk must be 'none' or 'conformer', got {self.trunk!r}")
        if self.trunk == "conformer" and self.embed_dim % self.conformer.num_heads:
            raise ValueError(
                f"conformer.num_heads={self.conformer.num_heads} must divide embed_dim={self.embed_dim}"
            )


class AudioEncoder(Pretrained, nn.Module):
    """Waveforms (B, S) -> audio tokens (B, N, E) and padding mask (B, N).

    Pipeline: zero beyond each length -> (resample) -> MelSpectrogram (centred, zero padding)
    -> log(max(mel, log_floor)) -> zero padded frames -> [Conv2d(3, stride 2, pad 1) + GELU,
    zero padded frames] x log2(subsampling) over (time, mel) -> Linear(C * M', E) -> dropout
    -> optional Conformer. See the module docstring for the length formula and batch invariance.
    The convolutions and the projection run over chunks of `conv_chunk_tokens` output tokens.

    The STFT and mel filterbank run in float32 whatever dtype the rest of the encoder is in
    (module casts to half types leave them alone; `.double()` makes them float64).

    Args:
        config: `AudioEncoderConfig`.
        checkpoint_activations: while gradients are recorded, recompute each chunk of the
            subsampling in the backward instead of storing its activations (C channels per frame
            and mel bin: the largest of a long recording).
        device, dtype: where and in which dtype the layers are created.

    Example::

        enc = AudioEncoder(AudioEncoderConfig(embed_dim=64)).eval()
        wave = torch.randn(2, 16000)                         # 1 s at 16 kHz
        x, pad = enc(wave, lengths=torch.tensor([16000, 8000]))
        # x: (2, 25, 64); pad[1] is True from token 13 on (enc.output_lengths -> [25, 13])
    """

    config_class = AudioEncoderConfig

    def __init__(
        self, config: AudioEncoderConfig, *, checkpoint_activations: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        if not isinstance(config, AudioEncoderConfig):
            raise ValueError(f"audio: config must be an AudioEncoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed_dim = config.embed_dim
        self.checkpoint_activations = checkpoint_activations
        factory = {"device": device, "dtype": dtype}
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            center=True,
            pad_mode="constant",
        ).to(device=device)
        channels = config.conv_channels or config.embed_dim
        num_convs = int(math.log2(config.subsampling))
        convs, mels = [], config.n_mels
        for index in range(num_convs):
            # padding 1 over mels; over time the chunks bring their neighbouring rows (zero beyond the ends)
            convs.append(
                nn.Conv2d(1 if index == 0 else channels, channels, 3, stride=2, padding=(0, 1), **factory)
            )
            mels = (mels + 1) // 2
        self.convs = nn.ModuleList(convs)
        self.activation = nn.GELU()
        self.proj = nn.Linear((channels if num_convs else 1) * mels, config.embed_dim, **factory)
        self.dropout = nn.Dropout(config.dropout)
        self.trunk: nn.Module | None = None
        # thread id -> (B, 1, N) padding of the trunk's call running in that thread (an entry exists
        # only while it runs), so that concurrent forwards never read each other's mask
        self._trunk_padding: dict[int, torch.Tensor] = {}
        if config.trunk == "conformer":
            opts = config.conformer
            self.trunk = torchaudio.models.Conformer(
                input_dim=config.embed_dim,
                num_heads=opts.num_heads,
                ffn_dim=opts.ffn_dim,
                num_layers=opts.num_layers,
                depthwise_conv_kernel_size=opts.depthwise_conv_kernel_size,
                dropout=opts.dropout,
                convolution_first=opts.convolution_first,
            ).to(**factory)
            self._hook_depthwise_convolutions()

    def _hook_depthwise_convolutions(self) -> None:
        """Zero the padded positions right before each Conformer block's depthwise convolution."""
        for index, layer in enumerate(self.trunk.conformer_layers):
            depthwise = [m for m in layer.modules() if isinstance(m, nn.Conv1d) and m.groups > 1]
            if len(depthwise) != 1:
                raise RuntimeError(
                    f"audio: expected one depthwise Conv1d in Conformer block {index}, "
                    f"found {len(depthwise)}; "
                    "this torchaudio version lays out its Conformer differently"
                )
            depthwise[0].register_forward_pre_hook(self._zero_trunk_padding)

    def _zero_trunk_padding(self, module: nn.Module, args: tuple[torch.Tensor, ...]):
        padding = self._trunk_padding.get(threading.get_ident())
        if padding is None:
            return None
        return (args[0].masked_fill(padding, 0.0),)  # (B, C, N)

    def _apply(self, fn, recurse=True):
        """Module casts (`.half()`, `.to(dtype)`) leave the STFT window and filterbank in float32."""
        super()._apply(fn, recurse)
        for module in self.melspec.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float64:
                    module._buffers[name] = buffer.float()
        return self

    @property
    def tokens_per_second(self) -> float:
        """Token rate: sample_rate / (hop_length * subsampling)."""
        cfg = self.config
        return cfg.sample_rate / (cfg.hop_length * cfg.subsampling)

    def frame_lengths(self, lengths: torch.Tensor | int) -> torch.Tensor | int:
        """Valid STFT frames, (B,) -> (B,) (or int -> int): F(l) = 1 + (l + 2 * (n_fft // 2) - n_fft) // hop,
        F(0) = 0. Integer arithmetic that tensors and Python ints share (no host read for either)."""
        cfg = self.config
        frames = 1 + (lengths + 2 * (cfg.n_fft // 2) - cfg.n_fft) // cfg.hop_length
        return frames * (lengths > 0)

    def output_lengths(
        self, lengths: torch.Tensor | int, sample_rate: int | None = None
    ) -> torch.Tensor | int:
        """Valid tokens for valid samples: N(l) = ceil(F(l) / subsampling), N(0) = 0.

        Args:
            lengths: (B,) integer tensor or an int, valid samples at `sample_rate`.
            sample_rate: rate of `lengths`; None = config.sample_rate. At another rate the
                lengths are first mapped to ceil(l * sample_rate_config / sample_rate), the
                length resampling yields.

        Returns:
            (B,) long tensor (or an int for an int input).
        """
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.long()
        if sample_rate is not None and sample_rate != self.config.sample_rate:
            lengths = self._resampled_lengths(lengths, sample_rate)
        tokens = self.frame_lengths(lengths)
        for _ in self.convs:
            tokens = (tokens + 1) // 2  # ceil(tokens / 2)
        return tokens

    def _resampled_lengths(self, lengths: torch.Tensor | int, sample_rate: int) -> torch.Tensor | int:
        gcd = math.gcd(sample_rate, self.config.sample_rate)
        orig, new = sample_rate // gcd, self.config.sample_rate // gcd
        return (lengths * new + orig - 1) // orig  # ceil(l * new / orig)

    def mel_spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, M, F) power mel spectrogram: `self.melspec`'s computation (torchaudio's
        MelSpectrogram, whose window and filterbank it uses), written with `torch.stft` so that
        `torch.compile` traces it whole (torchaudio's version calls `torch.jit.isinstance`)."""
        spectrogram = self.melspec.spectrogram
        spec = torch.stft(
            wave,
            n_fft=spectrogram.n_fft,
            hop_length=spectrogram.hop_length,
            win_length=spectrogram.win_length,
            window=spectrogram.window,
            center=True,
            pad_mode="constant",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # (B, n_fft // 2 + 1, F) complex
        parts = torch.view_as_real(spec)  # (B, n_fft // 2 + 1, F, 2): real, imaginary
        power = parts[..., 0].square() + parts[..., 1].square()  # |spec|^2 without |spec|'s square root
        return torch.matmul(power.transpose(-1, -2), self.melspec.mel_scale.fb).transpose(-1, -2)

    def _check_input(self, waveform: torch.Tensor, sample_rate: int) -> None:
        if not isinstance(waveform, torch.Tensor):
            raise ValueError(f"audio: expected waveform (B, S) float tensor, got {type(waveform).__name__}")
        if waveform.dim() != 2 or not waveform.is_floating_point():
            hint = " (squeeze the channel axis: mono waveforms only)" if waveform.dim() == 3 else ""
            raise ValueError(
                f"audio: expected waveform (B, S) float, got shape {tuple(waveform.shape)} "
                f"dtype {waveform.dtype}{hint}"
            )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"audio: sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if sample_rate != self.config.sample_rate and not self.config.resample:
            raise ValueError(
                f"audio: expected waveforms at sample_rate={self.config.sample_rate} Hz, "
                f"got {sample_rate} Hz; "
                "resample them first (torchaudio.functional.resample) or set AudioEncoderConfig.resample=True"
            )
        if self.config.check_finite:
            check_finite("audio", "waveform", waveform)

    def forward(
        self,
        waveform: torch.Tensor,
        lengths: torch.Tensor | None = None,
        sample_rate: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode mono waveforms.

        Args:
            waveform: (B, S) float, mono, at `sample_rate`; what lies beyond each length is ignored.
            lengths: (B,) integer, valid samples per waveform in [0, S] (0 = no audio: all of
                that sample's tokens are padding); None = all S valid.
            sample_rate: rate of `waveform` in Hz; None = config.sample_rate.

        Returns:
            tokens: (B, N, E), N = output_lengths(S, sample_rate); zero at padded positions.
            padding_mask: (B, N) bool, True at padding; row b has output_lengths(lengths[b]) False.
        """
        cfg = self.config
        sample_rate = cfg.sample_rate if sample_rate is None else sample_rate
        self._check_input(waveform, sample_rate)
        batch, samples = waveform.shape
        lengths = check_lengths("audio", lengths, batch, samples, "samples", waveform.device)
        param_dtype = self.proj.weight.dtype
        if samples == 0:
            empty = waveform.new_zeros(batch, 0, self.embed_dim, dtype=param_dtype)  # (B, 0, E)
            return empty, torch.zeros(batch, 0, dtype=torch.bool, device=waveform.device)
        feat_dtype = self.melspec.spectrogram.window.dtype  # float32, float64 after .double()
        wave = waveform.to(feat_dtype).masked_fill(padding_mask(lengths, samples), 0.0)  # (B, S)
        if sample_rate != cfg.sample_rate:
            wave = torchaudio.functional.resample(wave, sample_rate, cfg.sample_rate)  # (B, S')
            lengths = self._resampled_lengths(lengths, sample_rate)
            samples = wave.shape[1]
            wave = wave.masked_fill(padding_mask(lengths, samples), 0.0)  # filter tails beyond l
        num_tokens = self.output_lengths(samples)
        token_lengths = self.output_lengths(lengths)  # (B,)
        pad = padding_mask(token_lengths, num_tokens)  # (B, N)

        frame_lengths = self.frame_lengths(lengths)  # (B,)
        with torch.autocast(wave.device.type, enabled=False):  # features in float32 under autocast too
            mel = self.mel_spectrogram(wave)  # (B, M, F)
            x = mel.clamp_min(cfg.log_floor).log().transpose(1, 2)  # (B, F, M)
        x = x.masked_fill(padding_mask(frame_lengths, x.shape[1])[..., None], 0.0)
        x = self.dropout(self._subsample(x.to(param_dtype), frame_lengths, num_tokens))  # (B, N, E)
        if self.trunk is not None:
            x = self._run_trunk(x, pad)
        return x.masked_fill(pad[..., None], 0.0), pad

    def _subsample(
        self, features: torch.Tensor, frame_lengths: torch.Tensor, num_tokens: int
    ) -> torch.Tensor:
        """Log-mel features (B, F, M), zero beyond each sample's frames -> tokens (B, N, E) before
        dropout, chunk by chunk of `conv_chunk_tokens` tokens."""
        chunk = self.config.conv_chunk_tokens or num_tokens
        checkpointing = self.checkpoint_activations and torch.is_grad_enabled()
        pieces = []
        for start in range(0, num_tokens, chunk):
            rows = (features, frame_lengths, start, min(start + chunk, num_tokens))
            if checkpointing:
                pieces.append(checkpoint(self._subsample_rows, *rows, use_reentrant=False))
            else:
                pieces.append(self._subsample_rows(*rows))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _subsample_rows(
        self, features: torch.Tensor, frame_lengths: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Tokens [start, stop) of the subsampling, (B, stop - start, E), from the frames they read.

        Output row j of a stride-2 convolution with kernel 3 reads its input rows 2j - 1, 2j and
        2j + 1, so rows [a, b) read [2a - 1, 2b). Going down from the tokens gives the rows every
        layer needs; rows before 0 or beyond a sample's valid length are zero, as the one-pass
        convolution's zero padding and masking make them.
        """
        spans = [(start, stop)]  # spans[i]: rows of the input of layer i; spans[-1]: the tokens
        for _ in self.convs:
            first, end = spans[0]
            spans.insert(0, (2 * first - 1, 2 * end))
        first, end = spans[0]
        num_frames = features.shape[1]
        x = features[:, max(first, 0) : min(end, num_frames)]  # (B, rows, M)
        x = nn.functional.pad(x, (0, 0, max(-first, 0), max(end - num_frames, 0)))[:, None]  # (B, 1, rows, M)
        valid = frame_lengths  # (B,) valid rows of the current layer
        for conv, (first, end) in zip(self.convs, spans[1:], strict=True):
            x = self.activation(conv(x))  # (B, C, end - first, ceil(M / 2))
            valid = ceil_div(valid, 2)
            index = torch.arange(first, end, device=x.device)  # the rows' positions in the whole layer
            outside = (index < 0) | (index >= valid[:, None])  # (B, end - first)
            x = x.masked_fill(outside[:, None, :, None], 0.0)
        return self.proj(x.transpose(1, 2).flatten(2))  # (B, stop - start, C * M') -> (..., E)

    def _run_trunk(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Conformer blocks with key padding; (B, N, E) -> (B, N, E).

        A sample without audio keeps its first position unmasked for the attention, so that no
        query sees only masked keys (NaN); its outputs are discarded by the caller.
        """
        if x.shape[1] == 0:
            return x
        key_padding = pad.clone()  # (B, N)
        key_padding[:, 0] = False
        thread = threading.get_ident()
        self._trunk_padding[thread] = key_padding[:, None, :]  # (B, 1, N), read by this thread's hooks
        try:
            x = x.transpose(0, 1)  # (N, B, E), the layout of torchaudio's Conformer blocks
            for layer in self.trunk.conformer_layers:
                x = layer(x, key_padding)
        finally:
            del self._trunk_padding[thread]
        return x.transpose(0, 1)  # (B, N, E)
