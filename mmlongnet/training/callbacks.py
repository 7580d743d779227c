"""Callbacks: predictions as JSON lines, training throughput (tokens/s, peak memory), and the
stages of a curriculum."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["AdvanceCurriculum", "JSONLPredictionWriter", "TokenThroughput"]


class JSONLPredictionWriter(BasePredictionWriter):
    """Writes each record `predict_step` returns as one JSON line of `output_path`, and says where.

    A relative `output_path` is taken under `trainer.default_root_dir` (the run's folder). When the
    data module names its classes (`class_names`, e.g. a manifest's `classes`), a record's
    "prediction" and "label" indices get their names beside them ("prediction_name", "label_name").

    Every sample is written once: with several data-parallel ranks, rank group k writes
    `<stem>.part<k>.jsonl` beside it; under `SequenceParallelStrategy` only the first rank of
    each sequence-parallel group writes (its peers predicted the same samples).

    Args:
        output_path: the JSONL file (its folder is created); relative: under the run's folder.
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self._file = None
        self._class_names: list[str] | None = None
        self.written: Path | None = None
        """The file of the last `predict` (on the ranks that write)."""

    def resolved_path(self, trainer: pl.Trainer) -> Path:
        """`output_path`, under `trainer.default_root_dir` when it is relative."""
        if self.output_path.is_absolute():
            return self.output_path
        return Path(trainer.default_root_dir) / self.output_path

    def path_for(self, trainer: pl.Trainer) -> Path | None:
        """This rank's file, or None when a sequence-parallel peer writes its samples."""
        sp = getattr(trainer.strategy, "sequence_parallel_size", 1)
        if trainer.global_rank % sp:
            return None
        path = self.resolved_path(trainer)
        if trainer.world_size == sp:
            return path
        return path.with_name(f"{path.stem}.part{trainer.global_rank // sp}.jsonl")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = getattr(trainer.datamodule, "class_names", None)
        self._class_names = list(names) if names else None
        path = self.path_for(trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w")
            self.written = path

    def _named(self, record: dict) -> dict:
        names = self._class_names
        if names is None:
            return record
        for key in ("prediction", "label"):
            if isinstance(record.get(key), int) and 0 <= record[key] < len(names):
                record[f"{key}_name"] = names[record[key]]
        return record

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        if self._file is not None:
            for record in prediction:
                self._file.write(json.dumps(self._named(record)) + "\n")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"predictions: {self.written}")


class TokenThroughput(pl.Callback):
    """Logs training tokens per second over the last `window` steps (the tokens the module counted
    in `last_batch_tokens`: valid fused tokens, or the LM's input tokens) and the peak CUDA
    memory in GiB.

    Args:
        window: optimizer steps per measurement.
    """

    def __init__(self, window: int = 20) -> None:
        super().__init__()
        self.window = window
        self._tokens, self._started = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._started, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += pl_module.last_batch_tokens
        if (batch_idx + 1) % self.window:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            pl_module.log("peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
        pl_module.log("tokens_per_s", self._tokens / (time.perf_counter() - self._started))
        self._started = None


class AdvanceCurriculum(pl.Callback):
    """Ends the stages of an `AVDigitsDataModule`'s curriculum (`DigitsCurriculum`): sums the
    training loss of the batches at the newest stage's K on the device, reads its mean once per
    `window` steps (summed over the data-parallel ranks, so that all of them decide alike) and
    lets the next K join after `reads` reads in a row below `advance_loss`, or after
    `max_stage_steps` steps. Logs `curriculum_digits` (the newest K) and `curriculum_loss` (the
    window's mean training loss at it) at every read and prints a line when a stage begins. Its
    counts are saved in checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0  # training steps since the current stage began
        self.below = 0  # reads in a row below advance_loss
        self._sum: torch.Tensor | float = 0.0  # loss summed over this window's batches at the newest K
        self._count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        order = getattr(trainer.datamodule, "curriculum_order", None)
        if order is None:
            raise ValueError(
                "AdvanceCurriculum ends the stages of a curriculum; this run's data module has none "
                "(give AVDigitsDataModule a curriculum, or remove the callback)"
            )
        curriculum = trainer.datamodule.curriculum
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # this one included
        item = order.epoch * len(order) + processed - 1  # this batch's place in the order
        if order.stage_of(item) == order.stage == order.stage_at(item):  # the newest K, drawn as such
            self._sum = self._sum + outputs["loss"].detach().float()
            self._count += 1
        self.steps += 1
        if self.steps % curriculum.window == 0:
            self._read(trainer, pl_module, order, curriculum, item)
        if curriculum.max_stage_steps is not None and self.steps >= curriculum.max_stage_steps:
            self._advance(trainer, order, item, "after max_stage_steps")

    def _read(self, trainer, pl_module, order, curriculum, item: int) -> None:
        """One read of the window's mean loss at the newest K (the window's one host sync)."""
        total = torch.stack([torch.as_tensor(self._sum, device=pl_module.device, dtype=torch.float32),
                             torch.tensor(float(self._count), device=pl_module.device)])  # fmt: skip
        loss_sum, count = trainer.strategy.reduce(total, reduce_op="sum").tolist()
        self._sum, self._count = 0.0, 0
        newest = trainer.datamodule.stage_digits[order.stage]
        pl_module.log("curriculum_digits", float(newest), rank_zero_only=True)
        if count == 0:
            return
        pl_module.log("curriculum_loss", loss_sum / count, rank_zero_only=True)  # at the newest K
        if curriculum.advance_loss is None:
            return
        self.below = self.below + 1 if loss_sum / count < curriculum.advance_loss else 0
        if self.below >= curriculum.reads:
            self._advance(
                trainer,
                order,
                item,
                f"mean training loss at K = {newest} below {curriculum.advance_loss}"
                + (f", {curriculum.reads} reads in a row" if curriculum.reads > 1 else ""),
            )

    def _advance(self, trainer, order, item: int, why: str) -> None:
        if order.stage + 1 >= len(order.sizes):
            return
        order.advance(item)
        self.steps = self.below = 0
        self._sum, self._count = 0.0, 0
        joined = trainer.datamodule.stage_digits[order.stage]
        rank_zero_info(f"curriculum: K = {joined} joins at step {trainer.global_step} ({why})")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "below": self.below, "sum": float(self._sum), "count": self._count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.below = state_dict["steps"], state_dict["below"]
        self._sum, self._count = state_dict["sum"], state_dict["count"]
