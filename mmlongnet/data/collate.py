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
least one sample is padded to the batch's longest, with lengths 0 for the samples that lack it;
a modality no sample has is left out, so its encoder does not run.

Legend: B batch, L text ids, S audio samples, T frames, C channels, H, W frame size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmlongnet.modalities.text import ByteTokenizer

__all__ = ["MODALITIES", "Batch", "collate_samples"]

MODALITIES = ("text", "audio", "video")


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        ids: B sample ids.
        inputs: modality -> padded tensor: text (B, L) long, audio (B, S) float, video
            (B, T, C, H, W) float; zero (the pad id for text) beyond each sample's length.
        lengths: modality -> (B,) long valid ids / samples / frames; 0 where a sample lacks it.
        labels: (B,) long class indices (-1 = unknown).
    """

    ids: list[str]
    inputs: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def present(self) -> dict[str, list[bool]]:
        """modality -> per-sample presence (length > 0), for every modality of the batch."""
        return {name: (length > 0).tolist() for name, length in self.lengths.items()}


def _pad_stack(
    tensors: Sequence[torch.Tensor | None], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length tensors along a new batch dim, zero-padding dim 0; None -> length 0.

    Returns (padded (B, max_len, *rest), lengths (B,) long)."""
    lengths = torch.tensor([0 if t is None else t.shape[0] for t in tensors], dtype=torch.long)
    padded = like.new_zeros(len(tensors), int(lengths.max()), *like.shape[1:])
    for row, tensor in enumerate(tensors):
        if tensor is not None:
            padded[row, : tensor.shape[0]] = tensor
    return padded, lengths


def collate_samples(samples: Sequence[dict], tokenizer=None, max_text_length: int | None = None) -> Batch:
    """Collate samples (see the module docstring) into a `Batch`.

    Args:
        samples: the samples of one batch.
        tokenizer: turns text into ids; anything with `encode(text) -> list[int]` and `pad_id`
            (`ByteTokenizer`, the default, or `HFTokenizer`).
        max_text_length: truncate text to this many ids; None = keep all.

    Raises:
        ValueError: an empty batch, a sample without any modality (naming its id), or
            audio / video of the wrong rank or inconsistent frame shapes.
    """
    if not samples:
        raise ValueError("collate_samples: empty batch")
    tokenizer = tokenizer or ByteTokenizer()
    for sample in samples:
        if all(sample.get(name) is None for name in MODALITIES):
            raise ValueError(f"sample {sample.get('id')!r} has none of the modalities {MODALITIES}")
    inputs, lengths = {}, {}
    texts = [sample.get("text") for sample in samples]
    if any(text is not None for text in texts):
        ids = [
            None if text is None else torch.tensor(tokenizer.encode(text)[:max_text_length], dtype=torch.long)
            for text in texts
        ]
        ids = [None if t is not None and t.numel() == 0 else t for t in ids]  # "" counts as no text
        if any(t is not None for t in ids):
            padded, lengths["text"] = _pad_stack(ids, torch.zeros(0, dtype=torch.long))
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
        inputs[name], lengths[name] = _pad_stack(values, given[0][1].float())
    labels = torch.tensor([int(sample.get("label", -1)) for sample in samples], dtype=torch.long)
    return Batch([str(sample.get("id")) for sample in samples], inputs, lengths, labels)
