"""Lightning data modules: the bundled AV digits task, users' JSONL manifests, byte-level text.

Each wraps a dataset of `mmlongnet.data` (which knows nothing of Lightning) and batches it with
`collate_samples` (multimodal, padded to length buckets by default, so that batch shapes repeat)
or by stacking (text windows, all of one length).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmlongnet.data.avdigits import AVDigitsConfig, AVDigitsDataset
from mmlongnet.data.collate import LengthBuckets, collate_samples
from mmlongnet.data.text_files import ByteWindows, split_text_files, stdlib_directory
from mmlongnet.models.multimodal import MMLongNetConfig

__all__ = [
    "AVDigitsDataModule", "ManifestDataModule", "ResumableLoader", "ResumableShuffle", "TextFilesDataModule",
]  # fmt: skip

DEFAULT_BUCKETS = LengthBuckets()
"""The multimodal data modules' default length buckets (frozen, so one instance serves all)."""


class ResumableShuffle(DistributedSampler):
    """The training order: a permutation per epoch drawn from (seed, epoch), split over the
    data-parallel ranks as `DistributedSampler` splits it, that can start part-way through an epoch.

    Lightning calls `set_epoch` at every epoch start; `ResumableLoader` sets `start` on resume.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0
        """Indices of this epoch to leave out (already trained on), for the next iteration only."""

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(indices)


class ResumableLoader(DataLoader):
    """A shuffling training `DataLoader` whose position in its epoch is saved with each checkpoint.

    Lightning saves `state_dict()` in every checkpoint and hands it back to `load_state_dict` when
    `fit` resumes, before the first batch is drawn: the sampler's seed and epoch, the batches of the
    epoch already trained (read from the trainer, since the loader runs ahead of training) and the
    random states of torch, numpy and Python, so that a resumed run draws the same batches, and the
    same random numbers, as an uninterrupted one. The loader has its own generator (worker seeds), so
    creating its iterators draws nothing from the global random state.

    Args:
        dataset: the training set.
        trained_batches: returns how many batches of the current epoch have been trained on.
        num_replicas, rank, seed: of the `ResumableShuffle` sampler.
        **kwargs: the other arguments of `DataLoader` (batch_size, num_workers, collate_fn, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        trained_batches: Callable[[], int],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        **kwargs,
    ) -> None:
        sampler = ResumableShuffle(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        super().__init__(dataset, sampler=sampler, generator=generator, **kwargs)
        self.trained_batches = trained_batches

    def state_dict(self) -> dict:
        return {
            "seed": self.sampler.seed,
            "epoch": self.sampler.epoch,
            "batches": self.trained_batches(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                "numpy": _numpy_state(),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed, self.sampler.epoch = state["seed"], state["epoch"]
        batches = state["batches"]
        if batches < len(self):  # else the epoch was over: Lightning starts the next one
            self.sampler.start = batches * self.batch_size
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["python"])


def _numpy_state() -> dict:
    """numpy's global random state in plain types (a checkpoint loads without unpickling arrays)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _set_numpy_state(state: dict) -> None:
    key = np.asarray(state["key"], dtype=np.uint32)
    np.random.set_state((state["name"], key, state["pos"], state["has_gauss"], state["gauss"]))


class _Loaders(pl.LightningDataModule):
    """Data loaders over `self.datasets[stage]`; training shuffles through a `ResumableLoader`, whose
    seed is torch's initial seed (`seed_everything`'s) and whose position is saved in checkpoints.

    The data module keeps the training loader's state in checkpoints as well and hands it to the
    loader it builds on resume: `trainer.estimated_stepping_batches` (the optimizer schedule's total)
    builds the loader before Lightning restores loader states, and Lightning does not restore them
    into a loader built that early. Applying the same state twice changes nothing."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, Dataset] = {}
        self.collate_fn = None
        self._train_loader: ResumableLoader | None = None
        self._resume: dict | None = None  # the training loader's state from a checkpoint, until used

    def _loader(self, stage: str) -> DataLoader:
        if stage not in self.datasets:
            raise ValueError(f"no {stage} data: configure it in the data module")
        options = dict(
            batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # non-blocking copies to the GPU
        )  # fmt: skip
        if stage != "train":  # its own generator: creating its iterators leaves the global RNG alone
            return DataLoader(self.datasets[stage], generator=torch.Generator().manual_seed(0), **options)
        split = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        split = {key: value for key, value in (split or {}).items() if key in ("num_replicas", "rank")}
        loader = ResumableLoader(
            self.datasets[stage], self._trained_batches, seed=torch.initial_seed() % 2**63, **split, **options
        )
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state.get("train_loader")

    def _trained_batches(self) -> int:
        """Batches of the current training epoch trained on (0 outside a fit)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

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

    The media settings left unset (None) follow the model being trained (`MultimodalClassifier`'s
    `MMLongNetConfig`): `sample_rate` its audio encoder's, `frame_size` its video encoder's
    `image_size`, `channels` its `in_chans`, `frame_rate` its `frame_rate`; without such a model
    they are 16000, 224, 3 and None. A value given that contradicts the model is an error.

    Args:
        train, val, test, predict: manifest paths (None = no such split).
        classes: class names, for string labels; predictions then carry the names too.
        sample_rate: audio is resampled to this rate (the audio encoder's).
        frame_size, channels, frame_rate, max_frames: video decoding (see `ManifestDataset`).
        on_error: "raise" on a missing or unreadable file, or "skip" such samples (and report them).
        num_classes: labels must be in -1..num_classes-1, checked per manifest line when the
            datasets are built; unset, it follows the model's (the output width of the
            classifier's head), so a label out of range is found before training.
        allow_outside_paths: read media paths outside each manifest's folder (see `ManifestDataset`).
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
        sample_rate: int | None = None,
        frame_size: int | tuple[int, int] | None = None,
        channels: Literal[1, 3] | None = None,
        frame_rate: float | None = None,
        max_frames: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        batch_size: int = 8,
        num_workers: int = 0,
        max_text_length: int | None = None,
        buckets: LengthBuckets | None = DEFAULT_BUCKETS,
        num_classes: int | None = None,
        allow_outside_paths: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.manifests = {"train": train, "val": val, "test": test, "predict": predict}
        if all(path is None for path in self.manifests.values()):
            raise ValueError("ManifestDataModule: give at least one of train, val, test, predict")
        self.classes = classes
        self.media = dict(
            sample_rate=sample_rate, frame_size=frame_size, channels=channels, frame_rate=frame_rate
        )
        self.options = dict(
            max_frames=max_frames, on_error=on_error, num_classes=num_classes,
            allow_outside_paths=allow_outside_paths,
        )  # fmt: skip
        self.collate_fn = partial(collate_samples, max_text_length=max_text_length, buckets=buckets)

    @property
    def class_names(self) -> list[str] | None:
        """The names of the class indices, when `classes` was given."""
        return self.classes

    def media_settings(self, model: MMLongNetConfig | None) -> dict:
        """`sample_rate`, `frame_size`, `channels`, `frame_rate` for the datasets: the given ones,
        the unset ones from `model`'s encoders (or the defaults without a model)."""
        settings = dict(self.media)
        wanted = dict(sample_rate=16000, frame_size=224, channels=3, frame_rate=None)
        if model is not None:
            if model.audio is not None:
                wanted["sample_rate"] = model.audio.sample_rate
            if model.video is not None:
                video = model.video
                wanted.update(
                    frame_size=video.image_size, channels=video.in_chans, frame_rate=video.frame_rate
                )
        fields = {"sample_rate": "audio.sample_rate", "frame_size": "video.image_size",
                  "channels": "video.in_chans", "frame_rate": "video.frame_rate"}  # fmt: skip
        for name, value in settings.items():
            if value is None:
                settings[name] = wanted[name]
            elif model is not None and wanted[name] is not None and _size(value) != _size(wanted[name]):
                raise ValueError(
                    f"ManifestDataModule: {name}={value!r}, but the model's {fields[name]} is "
                    f"{wanted[name]!r}; leave {name} unset to follow the model"
                )
        return settings

    def setup(self, stage: str | None = None) -> None:
        from mmlongnet.data.manifest import ManifestDataset  # needs the `media` extra

        module = self.trainer.lightning_module if self.trainer is not None else None
        config = getattr(getattr(module, "model", None), "config", None)
        media = self.media_settings(config if isinstance(config, MMLongNetConfig) else None)
        options = dict(self.options)
        if options["num_classes"] is None and module is not None:
            options["num_classes"] = module.hparams.get("num_classes")  # the classifier's K
        for split, path in self.manifests.items():
            if path is not None and split not in self.datasets:
                self.datasets[split] = ManifestDataset(path, classes=self.classes, **media, **options)


def _size(value):
    """A frame size (int or pair) or another setting, comparable with its equals."""
    return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value


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
