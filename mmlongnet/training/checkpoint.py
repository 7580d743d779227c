"""Checkpoints that survive a kill, in one folder per run.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file in the checkpoint's own folder and
  renames it into place (`os.replace`, atomic on one file system): a kill during the write leaves
  the previous checkpoint intact. Lightning's default writes through a temporary file under
  `$TMPDIR`, which is no atomic rename when `$TMPDIR` is on another file system (a copy, cut
  short by a kill). A temporary file left by a killed write is removed by the next save.
- `RunCheckpoint` is Lightning's `ModelCheckpoint` whose folder defaults to
  `<trainer.default_root_dir>/checkpoints`, the same for every run of a config (not one per logger
  version), so that `fit --ckpt_path last` finds the last checkpoint of the previous run, and
  `test`/`validate`/`predict --ckpt_path best` in a new process find its best one
  (`<dirpath>/<filename>.ckpt`, which a monitoring `RunCheckpoint` with a fixed `filename`
  overwrites on every improvement).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "atomic_save"]

TEMPORARY_SUFFIX = ".tmp"


def _temporaries(path: Path) -> list[Path]:
    """The temporary files a write of `path` may have left behind (`.<name>.<random>.tmp`)."""
    return sorted(path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)`, atomically: written to a temporary file in `path`'s folder, flushed
    to disk, then renamed over `path`. Temporary files of earlier, interrupted writes of `path` are
    removed first (one writer per path, as under Lightning, where rank 0 saves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temporaries(path):
        stale.unlink(missing_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic saves in the checkpoint's own folder (see the
    module docstring). Use it as `trainer.plugins: [mmlongnet.training.AtomicCheckpointIO]`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        atomic_save(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments) whose `dirpath` defaults to
    `<trainer.default_root_dir>/checkpoints`: one folder per run of a config, whatever the logger's
    version, so that `fit --ckpt_path last` resumes the previous run and the folder follows
    `--trainer.default_root_dir`."""

    def _default_dirpath(self, trainer: pl.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        self._default_dirpath(trainer)  # `--ckpt_path last` looks before `setup`
        return super()._find_last_checkpoints(trainer)

    def find_best(self, trainer: pl.Trainer) -> str:
        """The best checkpoint's path, also in a process that did not fit: `best_model_path` when
        this process saved one, else the file an earlier run of the same folder left, which then
        becomes `best_model_path` (Lightning's `ckpt_path="best"` reads it). Raises ValueError,
        saying what to pass instead, when there is none."""
        if self.best_model_path:
            return self.best_model_path
        self._default_dirpath(trainer)
        if self.monitor is None or not self.filename or "{" in self.filename:
            raise ValueError(
                'ckpt_path="best" needs a RunCheckpoint with a `monitor` and a fixed `filename` (such '
                f"as filename: best), got monitor={self.monitor!r}, filename={self.filename!r}; pass "
                "the checkpoint file instead (--ckpt_path path/to/file.ckpt)"
            )
        path = os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)
        if not os.path.isfile(path):
            raise ValueError(
                f'ckpt_path="best": no best checkpoint at {path}. Run `fit` with this config first '
                "(it writes the file there), pass the --trainer.default_root_dir of the run that "
                "did, or pass the checkpoint file (--ckpt_path path/to/file.ckpt)"
            )
        self.best_model_path = path
        return path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:  # a trial run leaves no checkpoint behind, at its end either
            super().on_train_end(trainer, pl_module)
