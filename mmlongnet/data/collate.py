"""Samples and their collation into padded batches with lengths per modality.

A sample is a dict, the common currency of every dataset in `mmlongnet.data`:

    {
        "id": str,                           # unique within its dataset
        "text": str | None,                  # raw text (tokenized by the collate)
        "audio": Tensor (S,) float32 | None, # mono waveform at the dataset's sample rate
        "video": Tensor (T, C, H, W) float32 | None,  # frames, already normalised
        "label": int,                        # class index; -1 when unknown (prediction)
    }

A missing modality is None (or an absent key). `collate_samples` turns a list of them into a
`Batch` the model takes as `model(batch.inputs, batch.lengths)`: each modality present in at
least one sample is padded to the batch's longest (or, with `LengthBuckets`, to that length
rounded up to a bucket), with lengths 0 for the samples that lack it; a modality no sample has
is left out, so its encoder does not run.

Length buckets: every new input shape costs a GPU kernel plan build or a `torch.compile`
recompile, and with padding to the longest nearly every batch has a new shape. Rounding each
padded length up to a few geometric buckets makes shapes repeat; the lengths stay exact and the
model masks the padding, so every sample's outputs are unchanged (tests/models/test_bucketing.py).

Legend: B batch, L text ids, S audio samples, T frames, C channels, H, W frame size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from mmlongnet.modalities import MODALITIES
from mmlongnet.modalities.text import ByteTokenizer

__all__ = ["MEDIA_DTYPES", "MODALITIES", "Batch", "LengthBuckets", "bucket_length", "collate_samples"]

MEDIA_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""The dtypes a batch's audio and video can be collated in, by name (`collate_samples`'
`media_dtype`; the data modules' and configs' `media_dtype` names one)."""


def bucket_length(n: int, steps_per_octave: int = 4, multiple: int = 1, minimum: int = 1) -> int:
    """The bucket of a padded length n: the smallest grid value >= max(n, minimum); 0 stays 0.

    The grid counts in units u of `multiple`: every u up to 2 * steps_per_octave, then
    `steps_per_octave` evenly spaced values per octave, each octave [2^e, 2^(e+1)) stepping by
    2^e / steps_per_octave. With 4 steps and multiple 8 the buckets are 8, 16, ..., 64, 80, 96,
    112, 128, 160, 192, ...: a length is padded by less than 25 % (at most one step) and n
    lengths up to L fall into about steps_per_octave * log2(L / multiple) buckets. The rule is
    monotone (n <= m gives bucket(n) <= bucket(m)) and every bucket is a multiple of `multiple`.

    Args:
        n: the length to pad, >= 0 (the longest in a batch).
        steps_per_octave: buckets per doubling; a power of two.
        multiple: every bucket is a multiple of it.
        minimum: lengths below it share its bucket.

    Raises:
        ValueError: n < 0, steps_per_octave not a power of two, multiple or minimum < 1.
    """
    if n < 0:
        raise ValueError(f"bucket_length: n must be >= 0, got {n}")
    if steps_per_octave < 1 or steps_per_octave & (steps_per_octave - 1):
        raise ValueError(f"steps_per_octave must be a power of two (1, 2, 4, 8, ...), got {steps_per_octave}")
    if multiple < 1 or minimum < 1:
        raise ValueError(f"multiple and minimum must be >= 1, got {multiple} and {minimum}")
    if n == 0:
        return 0
    units = -(-max(n, minimum) // multiple)  # ceil
    step = max(1, (1 << (units.bit_length() - 1)) // steps_per_octave)  # 2^e / steps, 2^e <= units
    return -(-units // step) * step * multiple


@dataclass(frozen=True)
class LengthBuckets:
    """Per-modality length buckets for `collate_samples` (see `bucket_length` for the grid).

    Text pads to the bucket of its longest ids, capped at `max_text_length`; audio and video to
    the bucket of their longest samples / frames. The defaults suit the default encoders.
    """

    steps_per_octave: int = 4
    """Buckets per doubling of the length, a power of two: 4 pads by less than 25 %."""
    text_multiple: int = 8
    """Text buckets are multiples of this many ids."""
    text_minimum: int = 64
    """Shorter texts share the bucket of this many ids: short texts (questions, captions) are
    cheap next to audio and video tokens, and one shape for all of them means fewer shapes in a
    run (fewer kernel plans and compilations)."""
    audio_multiple: int = 640
    """Audio buckets are multiples of this many samples; best the audio encoder's hop_length *
    subsampling (160 * 4 = 640 = one token, 40 ms at 16 kHz, by default), so that a bucket ends
    on a token boundary and each bucket has its own token count."""
    audio_minimum: int = 5120
    """Shorter waveforms share the bucket of this many samples (0.32 s at 16 kHz)."""
    video_multiple: int = 4
    """Video buckets are multiples of this many frames; best a multiple of the vision encoder's
    tubelet_size (4 covers tubelets of 1, 2 and 4 frames), so that padding adds whole tubelets."""
    video_minimum: int = 4
    """Shorter videos share the bucket of this many frames."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"buckets.{spec.name} must be an int >= 1, got {value!r}")
        if self.steps_per_octave & (self.steps_per_octave - 1):
            raise ValueError(f"buckets.steps_per_octave must be a power of two, got {self.steps_per_octave}")

    def length(self, modality: str, n: int) -> int:
        """The padded length of `modality` (one of MODALITIES) for a longest length n >= 0."""
        if modality not in MODALITIES:
            raise ValueError(f"LengthBuckets: unknown modality {modality!r}; allowed: {MODALITIES}")
        multiple, minimum = getattr(self, f"{modality}_multiple"), getattr(self, f"{modality}_minimum")
        return bucket_length(n, self.steps_per_octave, multiple, minimum)


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        ids: B sample ids.
        inputs: modality -> padded tensor: text (B, L) long, audio (B, S) float, video
            (B, T, C, H, W) float; zero (the pad id for text) beyond each sample's length. L, S
            and T are the longest lengths of the batch, or their buckets.
        lengths: modality -> (B,) long valid ids / samples / frames; 0 where a sample lacks it.
        labels: (B,) long class indices (-1 = unknown).
    """

    ids: list[str]
    inputs: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> Batch:
        """The batch with its inputs in page-locked memory (a DataLoader with `pin_memory=True`
        calls this), so that their copies to a GPU do not wait; lengths and labels stay as they are."""
        return Batch(
            self.ids, {name: x.pin_memory() for name, x in self.inputs.items()}, self.lengths, self.labels
        )

    def present(self) -> dict[str, list[bool]]:
        """modality -> per-sample presence (length > 0), for every modality of the batch."""
        return {name: (length > 0).tolist() for name, length in self.lengths.items()}


def _pad_stack(
    tensors: Sequence[torch.Tensor | None], like: torch.Tensor, pad_to: Callable[[int], int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length tensors along a new batch dim, zero-padding dim 0; None -> length 0.

    `pad_to` maps the longest length to the padded one (>= it). Returns (padded
    (B, pad_to(max_len), *rest), lengths (B,) long)."""
    lengths = [0 if t is None else t.shape[0] for t in tensors]
    padded = _batch_tensor(like, (len(tensors), pad_to(max(lengths)), *like.shape[1:]))
    for row, (tensor, length) in enumerate(zip(tensors, lengths, strict=True)):
        if length:
            padded[row, :length] = tensor
        padded[row, length:] = 0  # each element written once: no zero pass over the whole batch
    return padded, torch.tensor(lengths, dtype=torch.long)


def _batch_tensor(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of `shape` and like's dtype; in a DataLoader worker, in shared
    memory, so that sending the batch to the main process copies nothing (a batch of AV digits at
    16 digits holds ~50 MB of audio)."""
    if torch.utils.data.get_worker_info() is None:
        return like.new_empty(shape)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(shape)


def collate_samples(
    samples: Sequence[dict],
    tokenizer=None,
    max_text_length: int | None = None,
    buckets: LengthBuckets | None = None,
    media_dtype: torch.dtype = torch.float32,
) -> Batch:
    """Collate samples (see the module docstring) into a `Batch`.

    Args:
        samples: the samples of one batch.
        tokenizer: turns text into ids; anything with `encode(text) -> list[int]` and `pad_id`
            (`ByteTokenizer`, the default, or `HFTokenizer`).
        max_text_length: truncate text to this many ids; None = keep all. Text buckets never
            exceed it.
        buckets: pad each modality to the bucket of its longest length; None = to the longest.
        media_dtype: the floating dtype of the batch's audio and video. `torch.float16` halves
            the bytes each batch is written, pinned and copied to the GPU with (a batch of AV
            digits at 256 digits holds ~280 MB of float32 audio); the encoders cast their input to
            their own dtype (the audio features are computed in float32), so the only change is
            the inputs' rounding to float16 (a relative error of at most 2^-11, ~-66 dB).

    Raises:
        ValueError: an empty batch, a sample without any modality (naming its id), or
            audio / video of the wrong rank or inconsistent frame shapes.
    """
    if not samples:
        raise ValueError("collate_samples: empty batch")
    if not isinstance(media_dtype, torch.dtype) or not media_dtype.is_floating_point:
        raise ValueError(f"collate_samples: media_dtype must be a floating torch dtype, got {media_dtype!r}")
    tokenizer = tokenizer or ByteTokenizer()
    for sample in samples:
        if all(sample.get(name) is None for name in MODALITIES):
            raise ValueError(f"sample {sample.get('id')!r} has none of the modalities {MODALITIES}")

    def pad_to(name: str) -> Callable[[int], int]:
        """longest -> padded length of modality `name`: the longest or its bucket (text: capped)."""
        if buckets is None:
            return lambda longest: longest
        if name == "text" and max_text_length is not None:
            return lambda longest: min(buckets.length(name, longest), max_text_length)
        return lambda longest: buckets.length(name, longest)

    inputs, lengths = {}, {}
    texts = [sample.get("text") for sample in samples]
    if any(text is not None for text in texts):
        ids = [
            None if text is None else torch.tensor(tokenizer.encode(text)[:max_text_length], dtype=torch.long)
            for text in texts
        ]
        ids = [None if t is not None and t.numel() == 0 else t for t in ids]  # "" counts as no text
        if any(t is not None for t in ids):
            padded, lengths["text"] = _pad_stack(ids, torch.zeros(0, dtype=torch.long), pad_to("text"))
            inputs["text"] = padded.masked_fill(
                torch.arange(padded.shape[1]) >= lengths["text"][:, None], tokenizer.pad_id
            )
    for name, rank, shape in (("audio", 1, "(S,)"), ("video", 4, "(T, C, H, W)")):
        values = [sample.get(name) for sample in samples]
        given = [(sample, value) for sample, value in zip(samples, values, strict=True) if value is not None]
        if not given:
            continue
        for sample, value in given:
            if value.dim() != rank:
                raise ValueError(
                    f"sample {sample.get('id')!r}: {name} must be {shape}, got shape {tuple(value.shape)}"
                )
            first_sample, first = given[0]
            if value.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"sample {sample.get('id')!r}: {name} frames of shape {tuple(value.shape[1:])} differ "
                    f"from {tuple(first.shape[1:])} in sample {first_sample.get('id')!r}"
                    "; resize them to one size"
                )
        like = given[0][1][:0].to(media_dtype)  # (0, ...): the batch's dtype, device and frame shape
        inputs[name], lengths[name] = _pad_stack(values, like, pad_to(name))
    labels = torch.tensor([int(sample.get("label", -1)) for sample in samples], dtype=torch.long)
    return Batch([str(sample.get("id")) for sample in samples], inputs, lengths, labels)
