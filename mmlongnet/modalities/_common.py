"""Checks and masks shared by the modality encoders.

Legend: B batch, S raw size along the variable axis (bytes, samples, frames), N tokens.

Every error names the modality first ("audio: ...") so that a failure inside the multimodal
model points at the encoder whose input was wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmlongnet._tracing import traced


def check_positive_int(name: str, value: object) -> None:
    """ValueError unless `value` is a positive int (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_dropout(name: str, value: object) -> None:
    """ValueError unless `value` is a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def check_lengths(
    modality: str,
    lengths: torch.Tensor | Sequence[int] | None,
    batch: int,
    size: int,
    unit: str,
    device: torch.device,
) -> torch.Tensor:
    """Validate valid lengths in raw units and return them as a long tensor.

    Args:
        modality: name used in error messages ("text", "audio", "vision").
        lengths: (B,) integer tensor or sequence of ints, each in [0, size]; None means
            every sample is `size` long.
        batch: B, the batch size of the input.
        size: S, the padded size of the input along its variable axis.
        unit: what one length unit is ("tokens", "samples", "frames"), for messages.
        device: where the returned tensor lives.

    Returns:
        (B,) long tensor on `device`.

    Lengths given on the CPU are checked there and copied to `device` without waiting for it;
    lengths given on an accelerator are read back for the check (one host sync). Under
    `torch.compile` the values are not checked (the caller checks them before).
    """
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{modality}: lengths must be a (B,) integer tensor of valid {unit}, got {lengths!r}"
            ) from err
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(
            f"{modality}: lengths must be an integer tensor of valid {unit}, got dtype {lengths.dtype}"
        )
    if lengths.shape != (batch,):
        raise ValueError(
            f"{modality}: lengths must have shape (B,) = ({batch},) to match the batch, "
            f"got {tuple(lengths.shape)}"
        )
    # Checked where the lengths live: on the CPU (the usual case) this reads no device. Traced or
    # recorded, the caller has checked them (MMLongNet.plan_batch does, on the host).
    if batch and not traced():
        low, high = torch.stack([lengths.min(), lengths.max()]).tolist()
        if low < 0 or high > size:
            raise ValueError(
                f"{modality}: lengths must be in [0, {size}] (valid {unit}, at most the padded size), "
                f"got values in [{low}, {high}]"
            )
    return lengths.to(device=device, dtype=torch.long, non_blocking=True)


def padding_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Padding mask from valid lengths.

    Args:
        lengths: (B,) long, each in [0, size].
        size: N, the padded length.

    Returns:
        (B, N) bool, True at padding (position >= length).
    """
    return torch.arange(size, device=lengths.device) >= lengths[:, None]  # (B, N)


def check_finite(modality: str, name: str, tensor: torch.Tensor) -> None:
    """ValueError naming the modality and tensor if `tensor` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{modality}: {name} holds {bad} non-finite value(s) (NaN or inf); clean the input "
            "or set check_finite=False to skip this check"
        )


def ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    """Exact integer ceil(a / b) for a long tensor `a` >= 0 and an int b > 0."""
    return torch.div(a + (b - 1), b, rounding_mode="floor")
