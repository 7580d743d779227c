"""Byte-level language-modelling windows over a directory of text files.

Legend: N window length (tokens the model reads), V vocabulary (259 byte ids).

The default corpus is the Python standard library's own sources (`*.py` under
`sysconfig.get_paths()["stdlib"]`): real text every machine with Python has.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmlongnet.modalities.text import ByteTokenizer

__all__ = ["ByteWindows", "split_text_files", "stdlib_directory"]

SPLITS = ("train", "val", "test")


def stdlib_directory() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_text_files(
    root: str | Path, pattern: str = "*.py", fractions: Sequence[float] = (0.9, 0.05, 0.05)
) -> dict[str, list[Path]]:
    """The files under `root` matching `pattern`, split into train / val / test.

    A file's split follows from a checksum of its path relative to `root`, so it is the same on
    every machine and run and no file is in two splits.

    Raises:
        FileNotFoundError: `root` is not a directory or holds no matching file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"text directory {str(root)!r} does not exist")
    files = sorted(path for path in root.rglob(pattern) if path.is_file())
    if not files:
        raise FileNotFoundError(f"no file matching {pattern!r} under {str(root)!r}")
    bounds = np.cumsum(fractions) / sum(fractions)
    splits = {name: [] for name in SPLITS}
    for path in files:
        position = zlib.crc32(str(path.relative_to(root)).encode()) / 2**32
        splits[SPLITS[int(np.searchsorted(bounds, position, side="right").clip(max=2))]].append(path)
    return splits


class ByteWindows(Dataset):
    """Random windows of N + 1 byte ids from the concatenated files (separated by eos).

    Window i starts at a position drawn from (seed, i): the same windows in every process.

    Args:
        files: the text files (read as UTF-8 bytes; undecodable bytes are kept as they are).
        window: N, tokens the model reads (a window holds N + 1 ids: inputs and shifted targets).
        num_windows: the dataset's length.
        seed: of the window positions.
        max_bytes: read at most this many bytes in all (files in order); None = all.

    `__getitem__(i) -> (N + 1,) long`.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        window: int,
        num_windows: int,
        seed: int = 0,
        max_bytes: int | None = None,
    ) -> None:
        if window < 1 or num_windows < 1:
            raise ValueError(f"window and num_windows must be >= 1, got {window} and {num_windows}")
        tokenizer = ByteTokenizer()
        chunks, total = [], 0
        for path in files:
            data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int16) + tokenizer.offset
            chunks.extend([data, np.array([tokenizer.eos_id], dtype=np.int16)])
            total += data.size + 1
            if max_bytes is not None and total >= max_bytes:
                break
        if total < window + 1:
            raise ValueError(f"the files hold {total} ids, fewer than one window of {window + 1}")
        self.ids = torch.from_numpy(np.concatenate(chunks)[:max_bytes])  # (total,) int16, ids < 259
        self.window, self.num_windows, self.seed = window, num_windows, seed

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(0, self.ids.numel() - self.window))
        return self.ids[start : start + self.window + 1].long()  # (N + 1,)
