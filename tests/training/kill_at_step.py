"""A callback for the resume tests: SIGKILLs its own process after a given optimizer step."""

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """Kills the process (SIGKILL: no cleanup, as a preempted job) once `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
