"""Sequence parallelism under Lightning's DDP: `SequenceParallelStrategy`.

Legend: W world size (all ranks), P sequence-parallel size, D = W / P data-parallel size,
B batch, N tokens.

The W ranks form a (D x P) mesh: ranks [d*P, (d+1)*P) are sequence-parallel group d, and rank r has
data-parallel rank r // P and sequence rank r % P (`sequence_parallel_layout`). The distributed
sampler runs over the D data-parallel ranks, so the P ranks of one group receive the SAME batch. At
setup, before DDP wraps it, the strategy calls the LightningModule's `parallelize(group)` once, which
shards its model's sequence with `mmlongnet.distributed.parallelize_sequence`: the package's models
then compute on their slice of the sequence (`LanguageModel` slices its inputs and targets,
`MMLongNet` shards its fusion stack) with the collective dilated attention.

Why DDP's gradient average is right. Let L_d be the loss of group d's batch on one device and the
global loss L = (1/D) sum_d L_d. Within group d, rank p computes a loss l_{d,p} with
(1/P) sum_p l_{d,p} = L_d: for the LM, the token mean over its slice of N/P positions (equal slices,
so the mean of the slice means is the full token mean); for the classifier, the full L_d itself
(the fused tokens are gathered before pooling, so every rank of the group computes the same loss).
Backward sends gradients across the group (the all-gather of keys / values and of the fused slices
has a reduce-scatter as backward), so rank p's parameter gradient g_{d,p} is its share of the group's
total, and sum_p g_{d,p} = d(sum_p l_{d,p})/dtheta = P dL_d/dtheta. DDP all-reduces the mean over
all W = D * P ranks: (1/W) sum_{d,p} g_{d,p} = (1/(D*P)) sum_d P dL_d/dtheta = dL/dtheta, the
gradient of the global batch on one device. No rescaling is needed.

Metrics: a value logged with `sync_dist=True` is averaged over all W ranks; for the LM, the mean of
the group's equal-slice losses is the full loss; for the classifier, all P copies are equal, so the
mean is unchanged (nothing is double counted). Values logged without sync (the train loss in the
progress bar) are rank 0's: the LM's shows the loss of the first slice only. The classifier's
accuracy is logged per batch as correct / labelled with the labelled count as batch size; synced,
Lightning sums both over all ranks, so each sample counts P times in numerator and denominator alike.
`predict_step` outputs are written by every rank, P copies of each sample.
"""

from __future__ import annotations

import datetime
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from mmlongnet.distributed.groups import new_sequence_parallel_groups, sequence_parallel_layout

__all__ = ["SequenceParallelStrategy", "sequence_parallel_layout"]


class SequenceParallelStrategy(DDPStrategy):
    """DDP over a (data-parallel x sequence-parallel) mesh; see the module docstring.

    Args:
        sequence_parallel_size: P, the ranks that share one batch and split its sequences; must
            divide the world size (devices x nodes). 1 is plain DDP.
        validate: let each sharded attention call check that the ranks agree on shapes and options
            (one small all_gather; False saves it once a setup is known to be right). With it, an
            input that one rank rejects raises on every rank of the group, with that rank's message.
        timeout_s: seconds a collective waits for its peers before it fails, on every process group
            (replaces DDPStrategy's `timeout`, 30 minutes by default). A rank that fails outside a
            checked call and stays alive (a notebook, a retry loop) holds its peers this long at most.
        **kwargs: `DDPStrategy`'s arguments (process_group_backend, start_method, ...).
    """

    strategy_name = "sequence_parallel"

    def __init__(
        self,
        sequence_parallel_size: int = 1,
        validate: bool = True,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        sequence_parallel_layout(sequence_parallel_size, sequence_parallel_size)  # checks the type
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool, got {validate!r}")
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
                raise TypeError(f"timeout_s must be a number of seconds or None, got {timeout_s!r}")
            if not 0 < timeout_s < float("inf"):
                raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        super().__init__(**kwargs)
        self.sequence_parallel_size = sequence_parallel_size
        self.validate = validate
        self.sequence_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_processes

    @property
    def data_parallel_size(self) -> int:
        """D = W / P, the number of distinct batches per step."""
        return self.world_size // self.sequence_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        """This rank's row of the mesh (which batch it receives)."""
        return self.global_rank // self.sequence_parallel_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the sampler splits the data over the D data-parallel ranks: sequence peers get the same indices
        return {"num_replicas": self.data_parallel_size, "rank": self.data_parallel_rank}

    def setup_distributed(self) -> None:
        sequence_parallel_layout(self.world_size, self.sequence_parallel_size)  # fail before any collective
        super().setup_distributed()
        # every rank creates every group (dist.new_group is collective over the default group)
        self.sequence_group, _ = new_sequence_parallel_groups(self.sequence_parallel_size)

    def teardown(self) -> None:
        self.sequence_group = None
        super().teardown()

    def setup(self, trainer: pl.Trainer) -> None:
        """Shard the module's model over this rank's sequence group (P > 1), then DDP's setup."""
        if self.sequence_parallel_size > 1:
            if self.sequence_group is None:
                raise RuntimeError("SequenceParallelStrategy: the process groups are not set up yet")
            module = self.lightning_module
            if not callable(getattr(module, "parallelize", None)):
                raise TypeError(
                    f"SequenceParallelStrategy needs a LightningModule with parallelize(group, *, validate) "
                    f"that shards its model (as LanguageModel and MultimodalClassifier have); "
                    f"{type(module).__name__} has none"
                )
            module.parallelize(self.sequence_group, validate=self.validate)
        super().setup(trainer)
