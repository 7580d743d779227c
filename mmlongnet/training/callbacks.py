"""Callbacks: predictions as JSON lines, and training throughput (tokens/s, peak memory)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["JSONLPredictionWriter", "TokenThroughput"]


class JSONLPredictionWriter(BasePredictionWriter):
    """Writes each record `predict_step` returns as one JSON line of `output_path`.

    Every sample is written once: with several data-parallel ranks, rank group k writes
    `<stem>.part<k>.jsonl` beside it; under `SequenceParallelStrategy` only the first rank of
    each sequence-parallel group writes (its peers predicted the same samples).

    Args:
        output_path: the JSONL file (its folder is created).
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self._file = None

    def path_for(self, trainer: pl.Trainer) -> Path | None:
        """This rank's file, or None when a sequence-parallel peer writes its samples."""
        sp = getattr(trainer.strategy, "sequence_parallel_size", 1)
        if trainer.global_rank % sp:
            return None
        if trainer.world_size == sp:
            return self.output_path
        return self.output_path.with_name(f"{self.output_path.stem}.part{trainer.global_rank // sp}.jsonl")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.path_for(trainer)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w")

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        if self._file is not None:
            for record in prediction:
                self._file.write(json.dumps(record) + "\n")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
