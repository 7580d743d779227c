"""Whole training steps replayed as CUDA graphs: one graph per batch signature.

A training step of the multimodal model on short inputs launches a few thousand small kernels from
Python; the GPU then waits for the host most of the step. `GraphedSteps` records the device work of
a step (forward, loss, backward, gradient clipping) once per batch signature (the shapes and the
host-side layout of a length bucket) and replays it for every later batch of that signature: one
launch instead of thousands, and nothing on the host inside the step but copying the batch's
tensors into the graph's input buffers.

The step function must be capturable: no host reads of device values, no host-dependent branching
on per-batch values (those belong in the signature), no host-to-device copies inside. Gradients
land in the parameters' `.grad` tensors, one tensor per parameter that every graph writes in place,
so that the optimizer, outside the graph, reads them as usual.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmlongnet.attention.kernels import SELECTOR


@dataclass
class _Recorded:
    """One signature's graph: the buffers it reads and the outputs it writes."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


class GraphedSteps:
    """Runs `step(tensors) -> list of tensors` as CUDA graphs, one per signature.

    Args:
        module: what is trained: its parameters that require a gradient (taken at the first step).
        warmup: eager runs of a signature before it is recorded (>= 1: lazy initialisation, kernel
            choice and caches happen there, outside the recording; the last one promotes every
            attention shape to its fastest kernel, `KernelSelector.promoting`). Every run is a real
            step.
        record: record graphs where the step's tensors are on a CUDA device; False runs every step
            eagerly through the same path (as on a CPU).

    `__call__(signature, tensors, step)`: `signature` is hashable and names everything of the batch
    that `step` reads on the host (shapes included); `tensors` are the batch's device tensors (one
    list per step, same shapes for a signature); `step(tensors)` does the step's device work,
    backward included, and returns its outputs (small tensors: the loss, counts). Returns fresh
    copies of the outputs.

    Gradients: each parameter has one gradient tensor, allocated at the first step that trains it
    and only written in place afterwards (every graph writes there). The first step of a signature
    finds which parameters it trains (a batch without some modality leaves that encoder out);
    before each later step of the signature those get their gradient tensor, zeroed inside the step,
    and the others `.grad = None`, so that the optimizer skips them, as after an eager step.

    Graphs share one memory pool (they never run concurrently and keep only their outputs); each
    also keeps a copy of its batch's tensors (its input buffers). A signature is recorded once, with
    the autocast state of that call (part of the signature the caller gives). A step that cannot be
    recorded (an operation CUDA graphs do not take) warns once, naming the error, and its signature
    runs eagerly from then on. `signatures` tells how many there are, `recorded` how many are
    graphs.
    """

    def __init__(self, module: nn.Module, *, warmup: int = 2, record: bool = True) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.module = module
        self.parameters: list[nn.Parameter] = []
        self.grads: list[torch.Tensor | None] = []  # each parameter's gradient tensor, once allocated
        self.trains: dict[Hashable, tuple[bool, ...]] = {}  # per signature: which parameters it trains
        self.warmup, self.record = warmup, record
        self.runs: dict[Hashable, int] = {}  # eager runs so far, per signature not yet recorded
        self.graphs: dict[Hashable, _Recorded] = {}
        self.unrecordable: set[Hashable] = set()  # signatures whose recording failed: eager
        self.pool = None
        self.stream: torch.cuda.Stream | None = None  # where eager GPU steps and recordings run

    def __getstate__(self) -> dict:
        """A copy (`copy.deepcopy`, pickling with its module) starts afresh: graphs, gradient
        tensors and streams belong to the original and are recorded anew where the copy trains."""
        return {"module": self.module, "warmup": self.warmup, "record": self.record}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["module"], warmup=state["warmup"], record=state["record"])

    @property
    def signatures(self) -> int:
        return len(self.runs) + len(self.graphs)  # an unrecordable one counts among the eager runs

    @property
    def recorded(self) -> int:
        return len(self.graphs)

    def __call__(
        self,
        signature: Hashable,
        tensors: Sequence[torch.Tensor],
        step: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        tensors = list(tensors)
        if not self.parameters:
            self.parameters = [p for p in self.module.parameters() if p.requires_grad]
            self.grads = [None] * len(self.parameters)
        recorded = self.graphs.get(signature)
        if recorded is not None:
            self._bind(signature)
            for buffer, x in zip(recorded.inputs, tensors, strict=True):
                buffer.copy_(x, non_blocking=True)
            recorded.graph.replay()
            return [out.clone() for out in recorded.outputs]
        runs = self.runs.get(signature, 0)
        on_gpu = bool(tensors) and tensors[0].device.type == "cuda"
        if not (self.record and on_gpu):
            self.runs[signature] = runs + 1
            return self._eager(signature, tensors, step)
        # Eager GPU steps run on the stream the recordings use: autograd's gradient accumulators
        # then belong to that stream in both, and a recording waits on no other stream.
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensors[0].device)
        caller = torch.cuda.current_stream(tensors[0].device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            outputs = recorded = None
            if runs >= self.warmup and signature not in self.unrecordable:
                recorded = self._try_record(signature, tensors, step)
            if recorded is None:
                self.runs[signature] = runs + 1
                # The last eager step before the recording chooses each attention call's fastest
                # kernel now (cuDNN plans included), which the graph then keeps.
                last = runs == self.warmup - 1 and signature not in self.unrecordable
                with SELECTOR.promoting() if last else contextlib.nullcontext():
                    outputs = self._eager(signature, tensors, step)
        caller.wait_stream(self.stream)
        if outputs is None:
            recorded.graph.replay()
            outputs = [out.clone() for out in recorded.outputs]
        return outputs

    def _bind(self, signature: Hashable) -> None:
        """Give the parameters `signature` trains their gradient tensors, and the others None."""
        for p, grad, trained in zip(self.parameters, self.grads, self.trains[signature], strict=True):
            p.grad = grad if trained else None

    def _zero_grads(self, signature: Hashable) -> None:
        """Zero, in place, the gradients of the parameters `signature` trains."""
        grads = [grad for grad, trained in zip(self.grads, self.trains[signature], strict=True) if trained]
        if grads:
            torch._foreach_zero_(grads)

    def _eager(self, signature: Hashable, tensors: list[torch.Tensor], step) -> list[torch.Tensor]:
        if signature in self.trains:
            self._bind(signature)
            self._zero_grads(signature)
            return [out.detach() for out in step(tensors)]
        # The first step of a signature: from no gradients, as after an eager optimizer step; the
        # gradients it makes become the parameters' gradient tensors (or are copied into them).
        for p in self.parameters:
            p.grad = None
        outputs = [out.detach() for out in step(tensors)]
        for index, p in enumerate(self.parameters):
            if p.grad is not None and self.grads[index] is None:
                self.grads[index] = p.grad
            elif p.grad is not None:
                p.grad = self.grads[index].copy_(p.grad)
        self.trains[signature] = tuple(p.grad is not None for p in self.parameters)
        return outputs

    def _try_record(self, signature: Hashable, tensors: list[torch.Tensor], step) -> _Recorded | None:
        """`_record`, or None (with a warning) when the step cannot be recorded."""
        try:
            recorded = self._record(signature, tensors, step)
        except RuntimeError as error:  # the CUDA error of the first operation a recording refuses
            self.unrecordable.add(signature)
            warnings.warn(
                f"a training step could not be recorded as a CUDA graph ({type(error).__name__}: "
                f"{str(error).splitlines()[0]}); batches of its signature run eagerly from now on",
                stacklevel=3,
            )
            return None
        del self.runs[signature]
        self.graphs[signature] = recorded
        return recorded

    def _record(self, signature: Hashable, tensors: list[torch.Tensor], step) -> _Recorded:
        """Record `step` over copies of `tensors` (the graph's input buffers), on `self.stream`."""
        inputs = [x.clone() for x in tensors]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self._bind(signature)
        # Autocast's cache of cast weights would outlive the recording; within it, every cast is
        # recorded where it is used.
        autocast, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            torch.cuda.synchronize()
            # Only this thread's calls are held to the recording's rules: the data loader's threads
            # (pinning batches) go on meanwhile.
            with torch.cuda.graph(
                graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                self._zero_grads(signature)
                outputs = [out.detach() for out in step(inputs)]
        return _Recorded(graph, inputs, outputs)
