"""The command line: `LightningCLI` with the model and data chosen by `class_path` in the config."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

__all__ = ["CLI"]


class CLI(LightningCLI):
    """`LightningCLI(LightningModule, LightningDataModule)` in subclass mode.

    `python train.py {fit,validate,test,predict} --config configs/X.yaml`; every option can be
    overridden on the command line (`--trainer.max_steps 10`); `--print_config` shows them all.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)
