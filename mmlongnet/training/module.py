"""Lightning modules: a multimodal classifier on `MMLongNet` and a byte-level `LongNetLM`.

Legend: B batch, L fused tokens, N text tokens, E embed dim, K classes, V vocabulary.

Both take an `OptimizerConfig` (AdamW, linear warm-up, then cosine or linear decay, stepped
every optimizer step); gradient clipping is the Trainer's (`gradient_clip_val`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch._dynamo import config as dynamo_config
from torch._inductor import config as inductor_config

from mmlongnet.attention.kernels import SELECTOR
from mmlongnet.data.collate import Batch
from mmlongnet.distributed.collectives import Group
from mmlongnet.distributed.groups import split_sequence
from mmlongnet.distributed.parallelize import parallelize_sequence
from mmlongnet.layers.multiway import MultiwayNetwork
from mmlongnet.models import LongNetLM, MMLongNet, MMLongNetConfig
from mmlongnet.models.multimodal import BatchPlan
from mmlongnet.training.graphed import GraphedSteps

__all__ = ["LanguageModel", "MultimodalClassifier", "OptimizerConfig"]


@dataclass
class OptimizerConfig:
    """AdamW with a warm-up and a decay (Loshchilov & Hutter 2019, arXiv 1711.05101)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of the warm-up."""
    weight_decay: float = 0.01
    """Decoupled weight decay of the matrices (not of biases, norms and embeddings)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's moment decay rates."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up, over the run's remaining optimizer steps."""
    min_lr_ratio: float = 0.1
    """The decay ends at lr * min_lr_ratio."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def factor(self, step: int, total_steps: int) -> float:
        """The learning-rate multiplier at optimizer step `step` of `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    def build(self, module: nn.Module, total_steps: int) -> dict:
        """AdamW over `module`'s parameters and its per-step scheduler, in Lightning's format."""
        decay, no_decay = [], []
        multiway = [m for m in module.modules() if isinstance(m, MultiwayNetwork)]
        stacked = {id(p) for m in multiway for p in m.experts.parameters()}
        for name, parameter in module.named_parameters():
            # Matrices decay; biases, norms' gains and embeddings do not. A multiway stack
            # (K, *S) of the experts' parameters goes by the shape S of one expert's.
            dim = parameter.dim() - (id(parameter) in stacked)
            if parameter.requires_grad:
                (decay if dim >= 2 and "embedding" not in name else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel updates every parameter in one pass: one launch on a GPU instead of
        # several per parameter, and ~25x faster than the per-parameter loop on a CPU.
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


RECOMPILE_LIMIT = 64  # compiled shapes kept per function (one per combination of length buckets)

# The options `CompiledModel` compiles with. Inductor's "mix-order" reductions (torch 2.10 and later,
# pytorch/pytorch#193061 and #190796) fuse a norm's per-row and per-feature backward sums into one
# kernel and, over more than ~16K rows, can leave parts of a gradient unwritten: compiled on an
# H200, the AV model's final norms (audio stack, fusion) got NaN weight and bias gradients in
# float32 on a batch of 44K fused tokens (K = 256, 18 samples), and right ones with the option off.
# Compiling `MMLongNet` or `LongNetLM` by hand, pass them too: `torch.compile(model, options=...)`.
COMPILE_OPTIONS = (
    {"triton.mix_order_reduction": False} if hasattr(inductor_config.triton, "mix_order_reduction") else {}
)


class CompiledModel:
    """A model's forward under `torch.compile(fullgraph=True, dynamic=False)`, built on first use.

    One static graph is compiled per input shape, so bucketed lengths matter (up to
    `RECOMPILE_LIMIT` shapes; beyond, torch runs the forward eagerly). On CUDA the forward and
    backward replay as CUDA graphs (what mode "reduce-overhead" does), each call marked as a new
    iteration. Compiled with `COMPILE_OPTIONS`. Not with sequence sharding, whose collectives run
    eagerly (the modules' `parallelize` refuses it).

    Compiling takes a while (~1-2 minutes per shape for the AV models on an H200), so the first
    call with each input shape, in training or in inference, says so and how long its forward
    took to compile (on rank 0; Lightning's info log, which `train.py` prints).

    The first call of a shape runs eagerly (CUDA graphs record from the second) inside
    `SELECTOR.promoting()`, and so does its backward where the caller runs it inside
    `backward_context()` (the modules' `backward` does): every attention call then runs on its
    fastest kernel, flash-attn at any size where installed, and the recording that follows takes
    the same kernels (LongNet-base at 8K on an H200: 0.90 -> 0.99 of the dense model's speed).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forward = None
        self.graphs = False
        self.shapes: set[tuple] = set()  # (input shapes and dtypes, grad enabled) of the calls so far
        self.first_of_shape = False  # whether the latest call was its shape's first

    def __call__(self, *args, **kwargs):
        if self.forward is None:
            self.graphs = next(self.model.parameters()).device.type == "cuda"
            options = {**COMPILE_OPTIONS, "triton.cudagraphs": self.graphs}
            # One static graph per input shape: what CUDA graphs record anyway, and length buckets
            # keep the shapes few, but more than torch's default of 8 graphs per function.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            self.forward = torch.compile(self.model.forward, fullgraph=True, dynamic=False, options=options)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        shape = (tuple((tuple(x.shape), x.dtype) for x in tensors), torch.is_grad_enabled())
        self.first_of_shape = shape not in self.shapes and len(self.shapes) < RECOMPILE_LIMIT
        if not self.first_of_shape:
            return self.forward(*args, **kwargs)
        self.shapes.add(shape)
        name, mode = type(self.model).__name__, "training" if shape[1] else "inference"
        sizes = f"#{len(self.shapes)}: " + ", ".join("x".join(map(str, x.shape)) for x in tensors)
        rank_zero_info(f"compiling {name} for a new input shape ({sizes}; {mode}), once per shape")
        start = time.perf_counter()
        with SELECTOR.promoting():
            out = self.forward(*args, **kwargs)
        rank_zero_info(f"compiled {name}'s forward for that shape in {time.perf_counter() - start:.0f} s")
        return out

    def backward_context(self) -> contextlib.AbstractContextManager:
        """Where to run the backward of the latest call: inside `SELECTOR.promoting()` when that call
        was its shape's first (see the class)."""
        return SELECTOR.promoting() if self.first_of_shape else contextlib.nullcontext()


def _parallelize(module: pl.LightningModule, group: Group, validate: bool) -> None:
    """Shard `module.model`'s sequence over `group`, once (later calls keep the first group)."""
    if module.sequence_parallel:
        return
    if module.compiled is not None:
        raise ValueError("compile=True does not run with sequence sharding; leave compile off there")
    if getattr(module, "graphed_steps", None) is not None:
        raise ValueError("graphed=True does not run with sequence sharding; leave graphed off there")
    parallelize_sequence(module.model, group, validate=validate)
    module.sequence_parallel = True


def _total_steps(module: pl.LightningModule) -> int:
    """Optimizer steps of the run (for the decay), or 1 outside a fit."""
    trainer = module._trainer
    if trainer is None:
        return 1
    steps = trainer.estimated_stepping_batches
    return int(steps) if math.isfinite(steps) else max(1, trainer.max_steps)


class _Trained(pl.LightningModule):
    """What the modules share: the optimizer from their `optimizer_config`, gradient clipping that
    works with it, training steps recorded as CUDA graphs (`graphed_steps`, or None) and the
    backward of a compiled model (`compiled`, or None)."""

    optimizer_config: OptimizerConfig
    graphed_steps: GraphedSteps | None = None
    compiled: CompiledModel | None = None

    def _graphed_training(self) -> tuple[float | None, str | None]:
        """The Trainer's clipping (value, algorithm) for a graphed step, after checking that the run
        is one graphed steps support (ValueError otherwise)."""
        trainer = self.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("graphed=True does not run fp16's loss scaling; use precision bf16-mixed or 32")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("graphed=True steps the optimizer every batch; set accumulate_grad_batches: 1")
        if trainer.world_size > 1:
            raise ValueError("graphed=True runs on one device; leave it off with several")
        return trainer.gradient_clip_val, trainer.gradient_clip_algorithm

    def _run_graphed(
        self, signature: tuple, tensors: list[torch.Tensor], step, sizes: str
    ) -> list[torch.Tensor]:
        """`graphed_steps(signature, tensors, step)`, announcing each new recording (`sizes`: the
        batch's shapes, for the message)."""
        if self.graphed_steps is None:
            raise ValueError(f"graphed steps need a {type(self).__name__} made with graphed=True")
        recorded = self.graphed_steps.recorded
        outputs = self.graphed_steps(signature, tensors, step)
        if self.graphed_steps.recorded > recorded:
            rank_zero_info(
                f"recorded a training step as a CUDA graph for a new batch signature "
                f"(#{self.graphed_steps.recorded}: {sizes}), once per signature"
            )
        return outputs

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self.graphed_steps is not None:
            return  # a graphed step has run its backward itself
        compiled = self.compiled
        with compiled.backward_context() if compiled is not None else contextlib.nullcontext():
            super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self.graphed_steps is None:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)
        # A graphed step sets the gradients itself: its graphs write into one tensor per parameter.

    def configure_optimizers(self) -> dict:
        return self.optimizer_config.build(self, _total_steps(self))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """The Trainer's `gradient_clip_val` / `gradient_clip_algorithm` ("norm", the default, or
        "value"), applied here because Lightning's mixed-precision plugins refuse to clip for an
        optimizer that unscales gradients itself, as the fused AdamW does. bf16 has no loss scale;
        with fp16's the gradients are unscaled first, and the optimizer step then knows they are."""
        if not gradient_clip_val or self.graphed_steps is not None:
            return  # a graphed step has clipped its gradients itself
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # fp16: Lightning leaves them scaled for such an optimizer
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        _clip(parameters, gradient_clip_val, gradient_clip_algorithm)


def _clip(parameters: list[nn.Parameter], value: float | None, algorithm: str | None) -> None:
    """Clip the gradients of `parameters` by their norm (algorithm None or "norm") or by value,
    on the device (no host read); nothing when `value` is 0 or None."""
    if not value:
        return
    if algorithm == "value":
        nn.utils.clip_grad_value_(parameters, value, foreach=True)
    else:
        nn.utils.clip_grad_norm_(parameters, value, foreach=True)


class MultimodalClassifier(_Trained):
    """`MMLongNet` with a classification head, for `Batch`es from `mmlongnet.data`.

    Args:
        model: the `MMLongNetConfig` of the network.
        num_classes: K.
        pooling: what the head reads. "mean": the mean of all valid fused tokens; "text": the
            mean of the fused text tokens (the question, after it has attended to the other
            modalities), falling back to "mean" for samples without text.
        optimizer: `OptimizerConfig`.
        label_smoothing: of the cross-entropy.
        compile: run `MMLongNet` compiled whole (`torch.compile(fullgraph=True)`; CUDA graphs on
            a GPU). Pair it with length buckets: every new input shape compiles (and records) anew,
            ~80-110 s per bucket for `configs/avdigits_long.yaml`'s model on an H200; batches are
            planned `always_masked`, so one graph serves every batch of a bucket.
        graphed: record each training step (forward, loss, backward, gradient clipping) as one CUDA
            graph per batch signature (`GraphedSteps`: the length bucket and which modalities the
            batch holds) and replay it for the later batches of that signature: one launch a step
            instead of thousands, for short inputs whose step the host bounds. The first
            `graph_warmup` steps of each signature run eagerly. Outputs equal the eager step's; on a
            CPU the steps run eagerly through the same path. One device, bf16 or fp32 (not fp16's
            loss scaling), `accumulate_grad_batches` 1; not with `compile` (the graphed eager steps
            ran faster than the compiled ones on an H200, README) nor with sequence sharding.
        graph_warmup: eager steps of a signature before it is recorded (>= 1).

    Samples labelled -1 (unknown) are left out of the loss and the accuracy.

    `forward(batch) -> logits (B, K)`; `predict_step` returns one record per sample
    (id, modalities present, predicted class, its probability, and the label when known).
    """

    def __init__(
        self,
        model: MMLongNetConfig,
        num_classes: int = 10,
        pooling: Literal["mean", "text"] = "mean",
        optimizer: OptimizerConfig | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        graphed: bool = False,
        graph_warmup: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if pooling not in ("mean", "text"):
            raise ValueError(f"pooling must be 'mean' or 'text', got {pooling!r}")
        if compile and graphed:
            raise ValueError("graphed=True records the eager model's steps; leave compile off with it")
        if pooling == "text" and "text" not in model.modalities:
            raise ValueError("pooling='text' needs a text modality (model.text is None)")
        self.save_hyperparameters()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.pooling = pooling
        self.label_smoothing = label_smoothing
        self.model = MMLongNet(model)
        self.compiled = CompiledModel(self.model) if compile else None
        self.sequence_parallel = False  # whether `parallelize` has sharded the model
        self.last_batch_tokens = 0  # valid fused tokens of the last batch (for throughput)
        self.head = nn.Sequential(nn.LayerNorm(model.d_model), nn.Linear(model.d_model, num_classes))
        self.graphed_steps = GraphedSteps(self, warmup=graph_warmup) if graphed else None

    def parallelize(self, group: Group, *, validate: bool = True) -> None:
        """Shard the fusion stack's sequence over `group` (`parallelize_sequence`; the other ranks
        of the group hold the same batch). `SequenceParallelStrategy` calls it once, at setup."""
        _parallelize(self, group, validate)

    def features(self, batch: Batch) -> torch.Tensor:
        """The pooled representation the head reads, (B, E)."""
        return self._pooled(batch.inputs, self._plan(batch))

    def _plan(self, batch: Batch) -> BatchPlan:
        """The batch's plan, on the host from CPU lengths; compiled or graphed, one graph per length
        bucket (masks always on)."""
        always_masked = self.compiled is not None or self.graphed_steps is not None
        plan = self.model.plan_batch(batch.inputs, batch.lengths, always_masked=always_masked)
        self.last_batch_tokens = plan.valid_tokens
        return plan

    def _pooled(self, inputs: dict[str, torch.Tensor], plan: BatchPlan) -> torch.Tensor:
        """(B, E): what the head reads of the model's output over `inputs` planned by `plan`."""
        out = (self.compiled or self.model)(inputs, plan=plan)
        if self.pooling == "mean":
            return out.pooled
        text = self.model.config.modalities.index("text")
        weights = ((out.modality_ids == text) & ~out.padding_mask).to(out.tokens.dtype)  # (B, L)
        count = weights.sum(1, keepdim=True)  # (B, 1)
        text_mean = torch.einsum("bl,ble->be", weights, out.tokens) / count.clamp_min(1)  # (B, E)
        return torch.where(count > 0, text_mean, out.pooled)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.features(batch))  # (B, K)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Inputs to the device in non-blocking copies; lengths and labels stay on the CPU, where
        the model derives the batch's layout and the step counts labelled samples without
        reading the device."""
        if not isinstance(batch, Batch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        inputs = {name: x.to(device, non_blocking=True) for name, x in batch.inputs.items()}
        return Batch(batch.ids, inputs, batch.lengths, batch.labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) logits, (B,) labels on the device -> the mean cross-entropy over the labelled
        samples (0 without any; label -1 takes no part) and how many of them are predicted right,
        both () on the device."""
        labelled = labels >= 0  # (B,)
        losses = F.cross_entropy(
            logits.float(), labels.clamp_min(0), reduction="none", label_smoothing=self.label_smoothing
        )  # (B,)
        weights = labelled.to(losses.dtype)
        loss = (losses * weights).sum() / weights.sum().clamp_min(1.0)
        correct = ((logits.argmax(-1) == labels) & labelled).sum()
        return loss, correct

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        logits = self(batch)  # (B, K)
        labels = batch.labels.to(logits.device, non_blocking=True)  # (B,)
        loss, correct = self._loss(logits, labels)
        self._log_metrics(stage, loss, correct, batch)
        return loss

    def _log_metrics(self, stage: str, loss: torch.Tensor, correct: torch.Tensor, batch: Batch) -> None:
        """Log the loss and the accuracy, weighted by the labelled samples (counted on the host)."""
        size = int((batch.labels.cpu().numpy() >= 0).sum())
        if size == 0:
            return
        self.log(f"{stage}_loss", loss, batch_size=size, prog_bar=True, sync_dist=stage != "train")
        # The epoch value is the mean weighted by batch_size: correct / labelled over the epoch.
        self.log(
            f"{stage}_acc", correct / size, batch_size=size, prog_bar=True, on_epoch=True, on_step=False,
            sync_dist=stage != "train",
        )  # fmt: skip
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.graphed_steps is None:
            return self._step(batch, "train")
        loss, correct = self.graphed_step(batch, self._graphed_training())
        self._log_metrics("train", loss, correct, batch)
        return loss

    def graphed_step(
        self, batch: Batch, clipping: tuple[float | None, str | None] = (None, None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of a `graphed=True` module through its `graphed_steps`: forward, loss,
        backward and gradient clipping, replayed as a CUDA graph once its signature is recorded.

        Args:
            batch: with its inputs on the module's device (`transfer_batch_to_device`).
            clipping: (value, "norm" or "value"), as the Trainer's `gradient_clip_val` and
                `gradient_clip_algorithm`; (None, None) clips nothing.

        Returns (loss, labelled samples predicted right), () each, on the device, detached. The
        optimizer step is the caller's; the next step sets the gradients itself (`GraphedSteps`).
        `training_step` calls it with the Trainer's clipping; a loop of one's own may too.
        """
        if self.graphed_steps is None:
            raise ValueError("graphed_step needs a MultimodalClassifier made with graphed=True")
        plan = self._plan(batch)
        labels = batch.labels.to(self.device, non_blocking=True)  # (B,)
        tensors = [*(batch.inputs[name] for name in plan.order), *plan.tensors(), labels]
        device = labels.device.type
        signature = (
            plan.signature(), tuple((tuple(x.shape), x.dtype) for x in tensors), clipping,
            torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
        )  # fmt: skip

        def step(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            count = len(plan.order)
            inputs = dict(zip(plan.order, tensors[:count], strict=True))
            logits = self.head(self._pooled(inputs, plan.with_tensors(tensors[count:-1])))  # (B, K)
            loss, correct = self._loss(logits, tensors[-1])
            loss.backward()
            _clip(self.graphed_steps.parameters, *clipping)
            return [loss, correct]

        inputs = zip(plan.order, tensors, strict=False)  # the inputs come first
        sizes = ", ".join(f"{name} " + "x".join(map(str, x.shape)) for name, x in inputs)
        loss, correct = self._run_graphed(signature, tensors, step, sizes)
        return loss, correct

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        probabilities = self(batch).float().softmax(-1)  # (B, K)
        confidence, predicted = probabilities.max(-1)
        present = batch.present()
        return [
            {
                "id": sample_id,
                "modalities": [name for name in present if present[name][row]],
                "prediction": int(predicted[row]),
                "probability": round(float(confidence[row]), 6),
                **({"label": int(batch.labels[row])} if batch.labels[row] >= 0 else {}),
            }
            for row, sample_id in enumerate(batch.ids)
        ]


class LanguageModel(_Trained):
    """Next-token prediction with a `LongNetLM` (causal dilated attention).

    Args:
        model: the `LongNetLM` (given in a config as class_path / init_args).
        optimizer: `OptimizerConfig`.
        compile: run the model compiled whole (`torch.compile(fullgraph=True)`; CUDA graphs on a
            GPU); not with sequence sharding.
        graphed: record each training step (forward, loss, backward, gradient clipping) as one CUDA
            graph per window shape (`GraphedSteps`) and replay it for the later batches: one launch
            a step instead of the dilated attention's hundreds of kernel calls a layer, with no
            compiling. The first `graph_warmup` steps of a shape run eagerly; on a CPU every step
            does, through the same path. One device, bf16 or fp32 (not fp16's loss scaling),
            `accumulate_grad_batches` 1; not with `compile` nor with sequence sharding.
        graph_warmup: eager steps of a window shape before it is recorded (>= 1).

    Batches are (B, N + 1) long token windows: the model reads tokens [:-1] and predicts [1:].
    Logs loss (nats per token) and bits per token.

    Sequence parallel (after `parallelize(group)`, which `SequenceParallelStrategy` calls at setup):
    every rank of a group holds the same windows and takes its slice of the N inputs and the N
    targets (N must be a multiple of the group size); the loss is the token mean over that slice, so
    the mean of the loss over the group's equal slices is the full-sequence loss (see the strategy).
    """

    def __init__(
        self,
        model: LongNetLM,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        graphed: bool = False,
        graph_warmup: int = 2,
    ) -> None:
        super().__init__()
        if compile and graphed:
            raise ValueError("graphed=True records the eager model's steps; leave compile off with it")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.compiled = CompiledModel(model) if compile else None
        self.optimizer_config = optimizer or OptimizerConfig()
        self.sequence_parallel = False  # whether `parallelize` has sharded the model
        self.last_batch_tokens = 0  # input tokens of the last batch (for throughput)
        self.graphed_steps = GraphedSteps(self, warmup=graph_warmup) if graphed else None

    def parallelize(self, group: Group, *, validate: bool = True) -> None:
        """Shard the LM's sequence over `group` (`parallelize_sequence`): each rank then runs its slice
        of the windows. `SequenceParallelStrategy` calls it once, at setup."""
        _parallelize(self, group, validate)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.last_batch_tokens = tokens.numel()
        return (self.compiled or self.model)(tokens)  # (B, N, V)

    def _loss(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, N + 1) windows -> () mean next-token cross-entropy (nats), over this rank's slice of
        the positions once parallelized."""
        inputs, targets = windows[:, :-1], windows[:, 1:]  # (B, N), (B, N)
        shard = getattr(self.model.decoder, "sequence_shard", None)  # (p, P) once parallelized
        if shard is not None:  # this rank's slice of positions: (B, n), (B, n)
            index, num_shards = shard
            inputs = split_sequence(inputs, num_shards, index)
            targets = split_sequence(targets, num_shards, index)
        logits = self(inputs)  # (B, N or n, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def _log_loss(self, stage: str, loss: torch.Tensor, windows: torch.Tensor) -> None:
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=stage != "train", batch_size=len(windows))
        self.log(
            f"{stage}_bits_per_token", loss / math.log(2), sync_dist=stage != "train", batch_size=len(windows)
        )

    def _step(self, windows: torch.Tensor, stage: str) -> torch.Tensor:
        loss = self._loss(windows)
        self._log_loss(stage, loss, windows)
        return loss

    def training_step(self, windows: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.graphed_steps is None:
            return self._step(windows, "train")
        loss = self.graphed_step(windows, self._graphed_training())
        self._log_loss("train", loss, windows)
        return loss

    def graphed_step(
        self, windows: torch.Tensor, clipping: tuple[float | None, str | None] = (None, None)
    ) -> torch.Tensor:
        """One training step of a `graphed=True` LM through its `graphed_steps`: forward, loss,
        backward and gradient clipping, replayed as a CUDA graph once its window shape is recorded.

        Args:
            windows: (B, N + 1) token windows on the module's device.
            clipping: (value, "norm" or "value"), as the Trainer's `gradient_clip_val` and
                `gradient_clip_algorithm`; (None, None) clips nothing.

        Returns the loss, (), on the device, detached. The optimizer step is the caller's.
        """
        device = windows.device.type
        signature = (
            tuple(windows.shape), windows.dtype, clipping,
            torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
        )  # fmt: skip

        def step(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            loss = self._loss(tensors[0])
            loss.backward()
            _clip(self.graphed_steps.parameters, *clipping)
            return [loss]

        self.last_batch_tokens = windows[:, :-1].numel()  # (a replayed step does not run forward)
        sizes = "windows " + "x".join(map(str, windows.shape))
        return self._run_graphed(signature, [windows], step, sizes)[0]

    def validation_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        self._step(windows, "val")

    def test_step(self, windows: torch.Tensor, batch_idx: int) -> None:
        self._step(windows, "test")
