"""A callback for CLI tests: per training step and rank, how many tokens of one modality the batch
holds and how many of them lie in this rank's slice of the fused sequence (as the sharded fusion
stack splits it). One line per step, appended to `path`: step, rank, in batch, in this slice."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class FusedSliceProbe(Callback):
    def __init__(self, path: str, modality: str = "video") -> None:
        self.path, self.modality = path, modality

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        layout = model.plan_batch(batch.inputs, batch.lengths).layout  # unsharded: outside the step
        index = model.config.modalities.index(self.modality)
        tokens = (layout.modality_ids == index) & ~layout.padding_mask  # (B, L)
        rank, ranks = trainer.global_rank, trainer.world_size
        n = -(-layout.length // ranks)  # tokens of one rank's slice (the sequence padded to P * n)
        mine = tokens[:, rank * n : (rank + 1) * n]
        with open(self.path, "a") as out:
            out.write(f"{trainer.global_step} {rank} {int(tokens.sum())} {int(mine.sum())}\n")
