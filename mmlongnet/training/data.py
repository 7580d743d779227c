"""Lightning data modules: the bundled AV digits task, users' JSONL manifests, byte-level text.

Each wraps a dataset of `mmlongnet.data` (which knows nothing of Lightning) and batches it with
`collate_samples` (multimodal, padded to length buckets by default, so that batch shapes repeat)
or by stacking (text windows, all of one length). The AV digits module can train over a growing
number of digits (`DigitsCurriculum`: `CurriculumBatches` in the order of a `CurriculumOrder`).
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmlongnet.data.avdigits import AVDigitsConfig, AVDigitsDataset
from mmlongnet.data.collate import MEDIA_DTYPES, LengthBuckets, collate_samples
from mmlongnet.data.text_files import ByteWindows, split_text_files, stdlib_directory
from mmlongnet.models.multimodal import MMLongNetConfig
from mmlongnet.training.callbacks import AdvanceCurriculum

__all__ = [
    "AVDigitsDataModule", "CurriculumBatches", "CurriculumOrder", "DigitsCurriculum", "ManifestDataModule",
    "ResumableLoader", "ResumableShuffle", "TextFilesDataModule", "draw_stage",
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


@dataclass
class DigitsCurriculum:
    """AV digits training over a growing number of digits per example (`AVDigitsDataModule`).

    Stage s trains on the first s + 1 of the K values `num_digits` + [the dataset's num_digits],
    each batch of one K drawn among them (a batch's examples share K, so its shape is K's bucket):
    uniformly, or the newest K in a share `newest_share` of the batches. A stage ends, and the
    next K joins, once the mean training loss at its newest K over a `window` of steps has read
    below `advance_loss` `reads` times in a row, or after `max_stage_steps` steps, whichever comes
    first; the last stage lasts to the end of training.
    Validation, test and predict use the dataset's num_digits, the goal. `AdvanceCurriculum` (a
    callback) reads the losses and ends the stages.

    What it is for: counting questions are learned at a few digits within thousands of steps and
    then carry over to more digits, where training at the long K alone learns them slowly (README,
    "AV digits"; `benchmarks/quality.py avdigits --curriculum grow --advance-loss` is the same rule).
    """

    num_digits: list[int]
    """K of the stages before the dataset's num_digits, increasing and below it: [4] trains at 4
    digits first when the dataset's num_digits is 16."""
    batch_sizes: list[int] | None = None
    """Examples per batch at each K: one per `num_digits` entry, then one for the dataset's
    num_digits; None: the data module's batch_size at every K."""
    advance_loss: float | None = 0.3
    """A stage ends once the mean training loss at its newest K reads below this `reads` windows
    in a row (cross-entropy over 10 answers: chance is 2.30); None: stages end by steps only."""
    window: int = 25
    """Training steps per loss read (one host read of the loss each)."""
    reads: int = 3
    """Loss reads in a row below `advance_loss` that end a stage."""
    max_stage_steps: int | None = None
    """A stage ends after this many training steps at the latest; None: by the loss only."""
    newest_share: float | None = None
    """While two or more K are active, the share of batches at the newest (the others drawn
    uniformly among the earlier K), in (0, 1]; None: every active K alike. Long K cost more per
    batch and have the most to learn: 0.6 with K = 4, 16, 256 trains at 256 in 60% of the batches
    instead of a third."""

    def __post_init__(self) -> None:
        digits = self.num_digits
        if (
            not isinstance(digits, (list, tuple))
            or not digits
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in digits)
            or any(a >= b for a, b in zip(digits, digits[1:], strict=False))
        ):
            raise ValueError(f"num_digits must be a non-empty increasing list of positive ints, got {digits}")
        self.num_digits = list(digits)
        if self.batch_sizes is not None:
            sizes = self.batch_sizes
            if (
                not isinstance(sizes, (list, tuple))
                or len(sizes) != len(digits) + 1
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes)
            ):
                raise ValueError(
                    f"batch_sizes must hold {len(digits) + 1} positive ints (one per K of num_digits "
                    f"{digits}, then the dataset's), got {sizes!r}"
                )
            self.batch_sizes = list(sizes)
        if self.advance_loss is not None and not 0.0 < self.advance_loss < float("inf"):
            raise ValueError(f"advance_loss must be a positive loss or None, got {self.advance_loss!r}")
        for name in ("window", "reads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_stage_steps is not None and (
            isinstance(self.max_stage_steps, bool) or not isinstance(self.max_stage_steps, int)
            or self.max_stage_steps < 1
        ):  # fmt: skip
            raise ValueError(f"max_stage_steps must be a positive int or None, got {self.max_stage_steps!r}")
        share = self.newest_share
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1
        ):
            raise ValueError(f"newest_share must be a share in (0, 1] or None, got {share!r}")
        if self.advance_loss is None and self.max_stage_steps is None:
            raise ValueError("a curriculum's stages end by advance_loss, max_stage_steps or both: give one")


def draw_stage(rng: np.random.Generator, active: int, newest_share: float | None = None) -> int:
    """The stage of a batch among the `active` stages begun (0 .. active - 1): uniformly, or the
    newest (active - 1) with probability `newest_share` and the others uniformly. With one stage
    active, or without `newest_share`, it draws what `rng.integers(active)` draws."""
    if newest_share is None or active == 1:
        return int(rng.integers(active))
    return active - 1 if rng.random() < newest_share else int(rng.integers(active - 1))


class CurriculumBatches(Dataset):
    """Whole training batches of a curriculum: item (k, indices) is the batch of those examples of
    `datasets[k]`, collated by `collate_fns[k]` (in a loader worker, as a loader batches otherwise).

    Args:
        datasets: one dataset per stage, in order.
        collate_fns: per stage, list of samples -> batch.
    """

    def __init__(self, datasets: list[Dataset], collate_fns: list[Callable]) -> None:
        if len(datasets) != len(collate_fns):
            raise ValueError(f"one collate_fn per dataset: got {len(datasets)} and {len(collate_fns)}")
        self.datasets, self.collate_fns = datasets, collate_fns

    def __len__(self) -> int:
        return sum(len(dataset) for dataset in self.datasets)

    def __getitem__(self, item: tuple[int, list[int]]):
        k, indices = item
        return self.collate_fns[k]([self.datasets[k][i] for i in indices])


class CurriculumOrder(DistributedSampler):
    """The training order of a curriculum: item g (the g-th batch over all epochs) is (k, indices),
    the stage k of its K, drawn among the stages active at g (`draw_stage`), and `batch_sizes[k]`
    distinct examples of that K's dataset, all from `default_rng([seed, rank, g])`.

    `advance(trained)` makes the next stage active from item trained + 1 + `lookahead` on, the
    first item the loader cannot have drawn yet while item `trained` is in training: the stage
    begins at the same item whatever the timing of the loader's workers, on every rank (sequence
    peers draw the same batches). `stage_starts` (kept in checkpoints) holds the item at which
    each stage after the first began, so that the order replays on resume.

    Args:
        batches: the `CurriculumBatches` it orders.
        batch_sizes: examples per batch of each stage.
        batches_per_epoch: items per epoch (on each rank).
        lookahead: the most items a loader draws beyond the one in training (Lightning's one
            prefetched batch, plus prefetch_factor x num_workers with loader workers).
        newest_share: the share of items at the newest active stage (`draw_stage`); None: uniform.
        num_replicas, rank, seed: as `DistributedSampler`'s (ranks draw different items).
    """

    def __init__(
        self,
        batches: CurriculumBatches,
        batch_sizes: list[int],
        batches_per_epoch: int,
        lookahead: int = 1,
        newest_share: float | None = None,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batches, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lookahead, self.newest_share = lookahead, newest_share
        self.sizes = [len(dataset) for dataset in batches.datasets]
        if any(size < batch for size, batch in zip(self.sizes, batch_sizes, strict=True)):
            raise ValueError(f"a stage has fewer examples {self.sizes} than its batch size {batch_sizes}")
        self.batch_sizes, self.batches_per_epoch = list(batch_sizes), batches_per_epoch
        self.stage_starts: list[int] = []
        self.start = 0
        """Items of this epoch to leave out (already trained on), for the next iteration only."""
        self.drawn = 0  # the item drawn next

    @property
    def stage(self) -> int:
        """The newest active stage (of the items drawn from now on)."""
        return len(self.stage_starts)

    def stage_at(self, item: int) -> int:
        """The newest stage active at `item`."""
        return bisect.bisect_right(self.stage_starts, item)

    def stage_of(self, item: int) -> int:
        """The stage of item `item`'s batch."""
        return self._stage_and_rng(item)[0]

    def draw(self, item: int) -> tuple[int, list[int]]:
        """Item `item` of the order: (its stage, its example indices in that stage's dataset)."""
        k, rng = self._stage_and_rng(item)
        return k, rng.choice(self.sizes[k], self.batch_sizes[k], replace=False).tolist()

    def _stage_and_rng(self, item: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, self.rank, item])
        return draw_stage(rng, self.stage_at(item) + 1, self.newest_share), rng

    def advance(self, trained: int) -> None:
        """The next stage joins (nothing after the last stage), from the first item the loader
        cannot have drawn while item `trained` is in training."""
        if self.stage + 1 < len(self.sizes):
            self.stage_starts.append(max(self.drawn, trained + 1 + self.lookahead))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        first = self.epoch * len(self) + self.start
        self.start, self.drawn = 0, first
        return self._items(first, (self.epoch + 1) * len(self))

    def _items(self, first: int, end: int) -> Iterator[tuple[int, list[int]]]:
        for item in range(first, end):
            self.drawn = item + 1
            yield self.draw(item)


def _as_is(batch):
    """The loader's collate_fn for items that are batches already."""
    return batch


class ResumableLoader(DataLoader):
    """A shuffling training `DataLoader` whose position in its epoch is saved with each checkpoint.

    Lightning saves `state_dict()` in every checkpoint and hands it back to `load_state_dict` when
    `fit` resumes, before the first batch is drawn: the order's seed and epoch (and a curriculum's
    stages), the batches of the epoch already trained (read from the trainer, since the loader runs
    ahead of training) and the random states of torch, numpy and Python, so that a resumed run
    draws the same batches, and the same random numbers, as an uninterrupted one. The loader has its
    own generator (worker seeds), so creating its iterators draws nothing from the global random
    state.

    Args:
        dataset: the training set.
        trained_batches: returns how many batches of the current epoch have been trained on.
        order: the training order, `ResumableShuffle` (examples, batched by `batch_size`) or
            `CurriculumOrder` (whole batches: give `batch_size=None`).
        **kwargs: the other arguments of `DataLoader` (batch_size, num_workers, collate_fn, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        trained_batches: Callable[[], int],
        *,
        order: ResumableShuffle | CurriculumOrder,
        **kwargs,
    ) -> None:
        generator = torch.Generator().manual_seed(order.seed)
        super().__init__(dataset, sampler=order, generator=generator, **kwargs)
        self.trained_batches = trained_batches

    def state_dict(self) -> dict:
        state = {
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
        if isinstance(self.sampler, CurriculumOrder):
            state["stage_starts"] = list(self.sampler.stage_starts)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed, self.sampler.epoch = state["seed"], state["epoch"]
        if isinstance(self.sampler, CurriculumOrder):
            self.sampler.stage_starts = list(state.get("stage_starts", []))  # [] from a run without one
        batches = state["batches"]
        if batches < len(self):  # else the epoch was over: Lightning starts the next one
            self.sampler.start = batches * (self.batch_size or 1)  # the order's items to leave out
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
            batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self._collate_fn(stage),
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # non-blocking copies to the GPU
        )  # fmt: skip
        if stage != "train":  # its own generator: creating its iterators leaves the global RNG alone
            return DataLoader(self.datasets[stage], generator=torch.Generator().manual_seed(0), **options)
        split = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        split = {key: value for key, value in (split or {}).items() if key in ("num_replicas", "rank")}
        order = self._training_order(seed=torch.initial_seed() % 2**63, **split)
        if isinstance(order, CurriculumOrder):  # its items are whole batches, collated in the dataset
            options.update(batch_size=None, collate_fn=_as_is)
        loader = ResumableLoader(order.dataset, self._trained_batches, order=order, **options)
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def _collate_fn(self, stage: str) -> Callable | None:
        """How the loader of `stage` batches its samples (None: by stacking)."""
        return self.collate_fn

    def _training_order(self, seed: int, num_replicas: int = 1, rank: int = 0) -> DistributedSampler:
        """The training loader's order: shuffled examples (a data module with a curriculum has its own)."""
        return ResumableShuffle(self.datasets["train"], num_replicas=num_replicas, rank=rank, seed=seed)

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


def media_dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a data module's `media_dtype` (a key of `MEDIA_DTYPES`)."""
    if name not in MEDIA_DTYPES:
        raise ValueError(f"media_dtype must be one of {list(MEDIA_DTYPES)}, got {name!r}")
    return MEDIA_DTYPES[name]


class AVDigitsDataModule(_Loaders):
    """The bundled AV digits question-answering task (see data/README.md).

    Args:
        dataset: `AVDigitsConfig` (digits per example, question types, modality mix, ...).
        train_examples, val_examples, test_examples: examples drawn per split (with a curriculum:
            training examples per K).
        predict_examples: examples of the test split that `predict` answers.
        batch_size, num_workers: of the data loaders.
        max_text_length: truncate the questions to this many byte ids (None = keep all).
        buckets: pad each modality of a batch to a length bucket (`LengthBuckets`: geometric,
            4 per doubling; audio in multiples of 640 samples, one token of the default audio
            encoder), so that batch shapes repeat; "one_shape" = per dataset (per K) the buckets
            of `AVDigitsDataset.one_shape_buckets`, under which nearly every batch of it has one
            shape (one compiled graph per K with `compile: true`); None = pad to the batch's longest.
        data_dir: the built artifacts; None = the repository's data/avdigits.
        curriculum: train over growing numbers of digits first (`DigitsCurriculum`; needs the
            `AdvanceCurriculum` callback); None = train at the dataset's num_digits only. An
            epoch is then train_examples / (the last stage's batch size) batches of any K.
        train_question_mix: the training split's probabilities of the question types (as
            `AVDigitsConfig.question_mix`, e.g. more of a type learned last); validation, test
            and predict keep the dataset's mix. None = the dataset's mix everywhere.
        media_dtype: the batches' audio and video dtype, "float32" or "float16" (half the bytes
            the loaders write, pin and copy to the GPU: a batch of 31 examples at 256 digits holds
            ~280 MB of float32 audio; the encoders compute in their own dtype either way).
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
        buckets: LengthBuckets | Literal["one_shape"] | None = DEFAULT_BUCKETS,
        data_dir: str | None = None,
        curriculum: DigitsCurriculum | None = None,
        train_question_mix: dict[str, float] | None = None,
        media_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.media_dtype = media_dtype_named(media_dtype)
        self.config = dataset or AVDigitsConfig()
        self.train_config = self.config  # the training split's (and curriculum stages') config
        if train_question_mix is not None:
            try:  # checked as the dataset's own mix is
                self.train_config = dataclasses.replace(self.config, question_mix=train_question_mix)
            except ValueError as error:
                raise ValueError(f"train_question_mix: {error}") from error
        if curriculum is not None and curriculum.num_digits[-1] >= self.config.num_digits:
            raise ValueError(
                f"curriculum.num_digits {curriculum.num_digits} must stay below the dataset's "
                f"num_digits ({self.config.num_digits}), the last stage"
            )
        self.curriculum = curriculum
        self.stage_configs: list[AVDigitsConfig] = []  # the dataset's config at each earlier K
        for K in curriculum.num_digits if curriculum is not None else []:
            try:
                config = dataclasses.replace(self.train_config, num_digits=K, seed=self.config.seed + K)
            except ValueError as error:
                raise ValueError(f"curriculum stage of {K} digits: {error}") from error
            self.stage_configs.append(config)
        self.sizes = {"train": train_examples, "val": val_examples, "test": test_examples}
        self.predict_examples = predict_examples
        self.data_dir = data_dir
        if isinstance(buckets, str) and buckets != "one_shape":
            raise ValueError(f'buckets must be LengthBuckets, "one_shape" or None, got {buckets!r}')
        self.buckets, self.max_text_length = buckets, max_text_length
        self.collate_fns: dict[str, Callable] = {}  # per split, after setup
        if buckets != "one_shape":  # batches samples of any K alike (with one_shape: after setup)
            self.collate_fn = partial(
                collate_samples,
                max_text_length=max_text_length,
                buckets=buckets,
                media_dtype=self.media_dtype,
            )

    @property
    def num_classes(self) -> int:
        return AVDigitsDataset.num_classes

    def _collate_for(self, dataset: AVDigitsDataset) -> Callable:
        """Batches samples of `dataset`, padded to the configured buckets."""
        buckets = dataset.one_shape_buckets() if self.buckets == "one_shape" else self.buckets
        return partial(
            collate_samples,
            max_text_length=self.max_text_length,
            buckets=buckets,
            media_dtype=self.media_dtype,
        )

    def _collate_fn(self, stage: str) -> Callable | None:
        return self.collate_fns[stage]

    @property
    def stage_digits(self) -> list[int]:
        """K of each training stage: the curriculum's, then the dataset's num_digits."""
        return [*(self.curriculum.num_digits if self.curriculum else []), self.config.num_digits]

    @property
    def curriculum_order(self) -> CurriculumOrder | None:
        """The order of the training loader in use when it follows a curriculum, else None."""
        order = getattr(self._train_loader, "sampler", None)
        return order if isinstance(order, CurriculumOrder) else None

    def setup(self, stage: str | None = None) -> None:
        for split, size in self.sizes.items():
            config = self.train_config if split == "train" else self.config
            self.datasets[split] = AVDigitsDataset(split, size, config, data_dir=self.data_dir)
        self.datasets["predict"] = AVDigitsDataset(
            "test", self.predict_examples, self.config, data_dir=self.data_dir
        )
        self.collate_fns = {split: self._collate_for(dataset) for split, dataset in self.datasets.items()}
        self.collate_fn = self.collate_fns["val"]  # the configured K's
        if self.curriculum is not None:  # one training set per K; the last one is the goal's
            size, data_dir = self.sizes["train"], self.data_dir
            stages = [AVDigitsDataset("train", size, c, data_dir=data_dir) for c in self.stage_configs]
            stages.append(self.datasets["train"])
            self.datasets["train"] = CurriculumBatches(stages, [self._collate_for(stage) for stage in stages])

    def _training_order(self, seed: int, num_replicas: int = 1, rank: int = 0) -> DistributedSampler:
        if self.curriculum is None:
            return super()._training_order(seed, num_replicas, rank)
        callbacks = self.trainer.callbacks if self.trainer is not None else None
        if callbacks is not None and not any(isinstance(each, AdvanceCurriculum) for each in callbacks):
            raise ValueError(
                "AVDigitsDataModule(curriculum=...) needs the callback that ends its stages: add "
                "`- class_path: mmlongnet.training.AdvanceCurriculum` to trainer.callbacks"
            )
        sizes = self.curriculum.batch_sizes or [self.batch_size] * (len(self.curriculum.num_digits) + 1)
        batches = max(1, self.sizes["train"] // (sizes[-1] * num_replicas))
        lookahead = 1 + 2 * self.num_workers  # the DataLoader's prefetch_factor: 2
        return CurriculumOrder(
            self.datasets["train"], sizes, batches, lookahead, self.curriculum.newest_share,
            num_replicas=num_replicas, rank=rank, seed=seed,
        )  # fmt: skip


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
        media_dtype: the batches' audio and video dtype, "float32" or "float16" (half the bytes
            the loaders write, pin and copy to the GPU; the encoders compute in their own dtype).
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
        media_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.media_dtype = media_dtype_named(media_dtype)
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
        self.collate_fn = partial(
            collate_samples, max_text_length=max_text_length, buckets=buckets, media_dtype=self.media_dtype
        )

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
