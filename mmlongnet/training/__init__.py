"""Training with Lightning: modules, data modules, callbacks and the command line.

`python train.py fit --config configs/demo.yaml` runs `CLI`, a `LightningCLI` whose model is
any `LightningModule` (here `MultimodalClassifier` or `LanguageModel`) and whose data is any
`LightningDataModule` (here `AVDigitsDataModule`, `ManifestDataModule`, `TextFilesDataModule`),
each picked by `class_path` in the YAML. `SequenceParallelStrategy` (DDP with sequence sharding)
is picked the same way, as `trainer.strategy`. `RunCheckpoint` keeps a run's checkpoints in one
folder (so `fit --ckpt_path last` resumes it) and `AtomicCheckpointIO` writes them atomically.
`AVDigitsDataModule(curriculum=DigitsCurriculum(...))` with the `AdvanceCurriculum` callback
trains over growing numbers of digits.
"""

from mmlongnet.training.callbacks import AdvanceCurriculum, JSONLPredictionWriter, TokenThroughput
from mmlongnet.training.checkpoint import AtomicCheckpointIO, RunCheckpoint
from mmlongnet.training.cli import CLI
from mmlongnet.training.data import (
    AVDigitsDataModule,
    DigitsCurriculum,
    ManifestDataModule,
    TextFilesDataModule,
)
from mmlongnet.training.module import COMPILE_OPTIONS, LanguageModel, MultimodalClassifier, OptimizerConfig
from mmlongnet.training.strategy import SequenceParallelStrategy

__all__ = [
    "CLI",
    "COMPILE_OPTIONS",
    "AdvanceCurriculum",
    "AtomicCheckpointIO",
    "AVDigitsDataModule",
    "DigitsCurriculum",
    "JSONLPredictionWriter",
    "LanguageModel",
    "ManifestDataModule",
    "MultimodalClassifier",
    "OptimizerConfig",
    "RunCheckpoint",
    "SequenceParallelStrategy",
    "TextFilesDataModule",
    "TokenThroughput",
]
