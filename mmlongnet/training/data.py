"""Lightning data modules: the bundled AV digits task, users' JSONL manifests, byte-level text.

Each wraps a dataset of `mmlongnet.data` (which knows nothing of Lightning) and batches it with
`collate_samples` (multimodal, padded to length buckets by default, so that batch shapes repeat)
or by stacking (text windows, all of one length).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmlongnet.data.avdigits import AVDigitsConfig, AVDigitsDataset
from mmlongnet.data.collate import LengthBuckets, collate_samples
from mmlongnet.data.text_files import ByteWindows, split_text_files, stdlib_directory

__all__ = ["AVDigitsDataModule", "ManifestDataModule", "TextFilesDataModule"]

DEFAULT_BUCKETS = LengthBuckets()
"""The multimodal data modules' default length buckets (frozen, so one instance serves all)."""


class _Loaders(pl.LightningDataModule):
    """Data loaders over `self.datasets[stage]`, shuffled for training."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, Dataset] = {}
        self.collate_fn = None

    def _loader(self, stage: str, shuffle: bool = False) -> DataLoader:
        if stage not in self.datasets:
            raise ValueError(f"no {stage} data: configure it in the data module")
        return DataLoader(
            self.datasets[stage], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=self.collate_fn, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # non-blocking copies to the GPU
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class AVDigitsDataModule(_Loaders):
    """The bundled AV digits question-answering task (see data/README.md).

    Args:
        dataset: `AVDigitsConfig` (digits per example, question types, modality mix, ...).
        train_examples, val_examples, test_examples: examples drawn per split.
        predict_examples: examples of the test split that `predict` answers.
        batch_size, num_workers: of the data loaders.
        max_text_length: truncate the questions to this many byte ids (None = keep all).
        buckets: pad each modality of a batch to a length bucket (`LengthBuckets`: geometric,
            4 per doubling; audio in multiples of 640 samples, one token of the default audio
            encoder), so that batch shapes repeat; None = pad to the batch's longest.
        data_dir: the built artifacts; None = the repository's data/avdigits.
    """

    def __init__(
        self,
        dataset: AVDigitsConfig | None = None,
        train_examples: int = 4000,
        val_examples: int = 500,
        test_examples: int = 1000,
        predict_examples: int = 16,
        batch_size: int = 32,
        num_workers: int = 0,
        max_text_length: int | None = None,
        buckets: LengthBuckets | None = DEFAULT_BUCKETS,
        data_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.config = dataset or AVDigitsConfig()
        self.sizes = {"train": train_examples, "val": val_examples, "test": test_examples}
        self.predict_examples = predict_examples
        self.data_dir = data_dir
        self.collate_fn = partial(collate_samples, max_text_length=max_text_length, buckets=buckets)

    @property
    def num_classes(self) -> int:
        return AVDigitsDataset.num_classes

    def setup(self, stage: str | None = None) -> None:
        for split, size in self.sizes.items():
            self.datasets[split] = AVDigitsDataset(split, size, self.config, data_dir=self.data_dir)
        self.datasets["predict"] = AVDigitsDataset(
            "test", self.predict_examples, self.config, data_dir=self.data_dir
        )


class ManifestDataModule(_Loaders):
    """Users' own data: one JSONL manifest per split (format in data/example_manifest/README.md).

    Args:
        train, val, test, predict: manifest paths (None = no such split).
        classes: class names, for string labels.
        sample_rate: audio is resampled to this rate (the audio encoder's).
        frame_size, channels, frame_rate, max_frames: video decoding (see `ManifestDataset`).
        on_error: "raise" on a missing or unreadable file, or "skip" such samples (and report them).
        batch_size, num_workers: of the data loaders.
        max_text_length: truncate text to this many byte ids (None = keep all).
        buckets: pad each modality of a batch to a length bucket (`LengthBuckets`: geometric,
            4 per doubling; audio in multiples of 640 samples, one token of the default audio
            encoder: set `audio_multiple` to hop_length * subsampling of yours, `video_multiple`
            to a multiple of the tubelet size), so that batch shapes repeat; None = pad to the
            batch's longest.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        classes: list[str] | None = None,
        sample_rate: int = 16000,
        frame_size: int | tuple[int, int] = 224,
        channels: Literal[1, 3] = 3,
        frame_rate: float | None = None,
        max_frames: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        batch_size: int = 8,
        num_workers: int = 0,
        max_text_length: int | None = None,
        buckets: LengthBuckets | None = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.manifests = {"train": train, "val": val, "test": test, "predict": predict}
        if all(path is None for path in self.manifests.values()):
            raise ValueError("ManifestDataModule: give at least one of train, val, test, predict")
        self.options = dict(
            classes=classes, sample_rate=sample_rate, frame_size=frame_size, channels=channels,
            frame_rate=frame_rate, max_frames=max_frames, on_error=on_error,
        )  # fmt: skip
        self.collate_fn = partial(collate_samples, max_text_length=max_text_length, buckets=buckets)

    def setup(self, stage: str | None = None) -> None:
        from mmlongnet.data.manifest import ManifestDataset  # needs the `media` extra

        for split, path in self.manifests.items():
            if path is not None and split not in self.datasets:
                self.datasets[split] = ManifestDataset(path, **self.options)


class TextFilesDataModule(_Loaders):
    """Byte-level windows of the text files under a directory, split by file.

    Args:
        root: the directory; None = the running interpreter's standard library sources.
        pattern: file name pattern (glob, searched recursively).
        window: N, tokens per window the model reads.
        train_windows, val_windows, test_windows: windows drawn per split.
        max_bytes: bytes read per split at most (None = all).
        seed: of the window positions.
        batch_size, num_workers: of the data loaders.
    """

    def __init__(
        self,
        root: str | None = None,
        pattern: str = "*.py",
        window: int = 2048,
        train_windows: int = 20000,
        val_windows: int = 200,
        test_windows: int = 200,
        max_bytes: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.root = Path(root) if root is not None else stdlib_directory()
        self.pattern, self.window, self.max_bytes, self.seed = pattern, window, max_bytes, seed
        self.sizes = {"train": train_windows, "val": val_windows, "test": test_windows}

    def setup(self, stage: str | None = None) -> None:
        files = split_text_files(self.root, self.pattern)
        for split, size in self.sizes.items():
            if split not in self.datasets:
                self.datasets[split] = ByteWindows(files[split], self.window, size, self.seed, self.max_bytes)
