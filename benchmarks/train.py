"""End-to-end training benchmark on one GPU: real steps of the Lightning modules on their data.

Each row trains a module built from a repository config for a few steps on batches from its data
module, once with dilated attention and once with dense attention, in the same run:

- AV digits (`MultimodalClassifier` on `AVDigitsDataModule`, configs/avdigits_long.yaml) at
  16, 256 and 1024 digits per example (batch 16, 8, 4); the fused sequence grows to ~17K tokens
  per sample at 1024 digits. Dense = every stack (text, audio, video and fusion) given one branch
  whose segment (2^24 tokens) covers any sequence at dilation 1: each token attends to all valid
  tokens of its stack, through the same fused op (`StackConfig` takes any segment length; a
  sequence shorter than its segment is one segment).
- Byte LM (`LanguageModel` with `LongNetLM` on `TextFilesDataModule`, configs/lm_bytes.yaml) at
  windows of 8K, 32K and 128K bytes (batch 16, 4, 1: 128K tokens a step). Dense =
  `LongNetLM(attention="dense")`, full causal attention.

Modules and data modules come from `mmlongnet.training.CLI` (LightningCLI) with `run=False`
on the YAML plus command-line overrides (digits, window, batch, loader workers, the dense
schedule); they are the objects `train.py fit` would train. The Trainer the CLI builds is not
used for the steps: its logger and callbacks are switched off and only its `gradient_clip_val`
is read. One step, driven here as Lightning's loop would drive it:

    batch = module.transfer_batch_to_device(batch, device, 0)   # the module's hook
    with torch.autocast("cuda", torch.bfloat16):                 # bf16-mixed; fp32 on the CPU
        loss = module.training_step(batch, i)
    loss.backward()
    clip_grad_norm_(module.parameters(), gradient_clip_val)      # when the config clips
    optimizer.step(); scheduler.step(); optimizer.zero_grad()    # from configure_optimizers()

`self.log` in `training_step` runs Lightning's path for a module without a Trainer: it checks
the value and returns without logging (Lightning supports this for calling steps directly, and
warns once; the benchmark filters that one warning). So logging costs nothing here, as with
`Trainer(barebones=True)`; everything else in `training_step` (the metric update, the token
count) runs as in a fit.

Per row and kind: `--warmup` untimed steps, then `--steps` timed steps, each timed on the host
between two `torch.cuda.synchronize()` (fetching the next batch from the loader is outside the
timed step and reported apart as `data_ms`); then `--profile-steps` steps under
`torch.profiler` (CPU and CUDA activities), each marked by `record_function`, from which come
the GPU-busy share, the kernel and launch counts and the host syncs of a step. The synchronisation
after every step leaves the GPU idle while the host prepares the next one (in a fit, nothing
synchronises between steps and that host work overlaps the GPU's); `--pipelined-steps N` also runs
N steps back to back as a fit does, batches fetched from the loader in between and one
synchronisation at the end, under the profiler.

Columns of the table (JSON fields in brackets):
- tokens/step [tokens_per_step]: mean over the timed steps of `module.last_batch_tokens`, the
  fused valid tokens of the batch (AV digits) or its B * N inputs (LM);
- steps/s [steps_per_s]: 1000 / the median timed step in ms [step_ms];
- tokens/s [tokens_per_s]: tokens/step * steps/s;
- ms/step, seen shapes [step_ms_repeated]: the median over the timed steps whose input shape
  ran in an earlier step (warm-up included); the others [new_shape_steps] may build kernel plans
  or compile and record CUDA graphs, once per shape in a run;
- peak GiB [peak_gib]: `torch.cuda.max_memory_allocated` over the timed steps;
- GPU busy [gpu_busy_share]: the union of the CUDA kernel intervals of a profiled step over its
  span (from the step's start to the end of the synchronisation after it); median over steps;
- pipelined: ms/step, tokens/s, GPU busy [pipelined_step_ms, pipelined_tokens_per_s,
  pipelined_gpu_busy_share]: with `--pipelined-steps`, the span of the N back-to-back steps (from
  the first one's batch fetch to the end of the final synchronisation) over N, their tokens over
  that span, and the union of the kernel intervals over it;
- kernels/step, launches/step: kernels run on the GPU, and kernel launch calls on the host
  (`cudaLaunchKernel`, `cuLaunchKernel*`, graph launches), per profiled step;
- syncs/step [syncs_per_step, by name in syncs]: host syncs inside a profiled step's own code:
  `cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize` and synchronous
  `cudaMemcpy` (`.item()`, `int(tensor)`, a blocking copy...), the benchmark's own
  synchronisation after the step left out;
- [gpu_gaps]: the longest stretches of the profiled steps in which no kernel ran on the GPU
  (`GAPS_KEPT`, longest first): the step, where the gap began (ms after the step's start), its
  length, and the host events that overlapped it most (CPU ops, CUDA runtime calls, library
  annotations): what the GPU waited for; `--trace DIR` also writes each row's profiled steps as
  a Chrome trace (`DIR/trace_<row>_<kind>.json.gz`, for chrome://tracing or Perfetto);
- shapes [distinct_shapes, shapes]: distinct input shapes over every step run (warm-up, timed,
  profiled); each new shape may cost kernel plans or compilation;
- data ms [data_ms]: median host time to take the next batch from the loader;
- [warmup_steps, passed_over]: untimed steps run first, and loader batches passed over;
- [first_run_ms]: per input shape, the host time of its first step (warm-up or timed): the cost
  of its kernel plans or, with `--compile`, of compiling its graph.

`--compile` runs the modules' `compile` option: one graph per input shape (length bucket),
replayed as CUDA graphs after its third run (compile, warm-up, record). Compiling takes ~80-110 s
per shape on the H200 for the AV model, so a compiled row runs the batches of its first
`--shapes` (default 2) distinct shapes only, passing over the others, and its warm-up goes on
until each shape it has run has run three times: the timed steps on those shapes are the steady
state a long run reaches (a kept shape first met in a timed step is reported apart, as above).
`--graphed` runs the modules' `graphed` option (the classifier's and the LM's): each training step
(forward, loss, backward, clipping) recorded as one CUDA graph per batch signature after two eager
steps of it, then replayed; the warm-up goes on until each shape has replayed.
On the CPU (`--smoke`) the profiler records CPU activity only and the GPU fields are null.

Writes `<out>/train_<tag>.json` (rows also to `.json.tmp` as they come) and `<out>/train_<tag>.png`
(dilated against dense: tokens/s and GPU-busy share per row), and prints a markdown table last.

    python benchmarks/train.py --tag h200                      # all rows, both kinds
    python benchmarks/train.py --rows av1024 lm128k --steps 10
    python benchmarks/train.py --rows av:512:8 lm:65536:2      # task:digits-or-window:batch
    python benchmarks/train.py --smoke                         # tiny rows, 2 steps; runs on the CPU
    python benchmarks/train.py --rows av1024 --set data.init_args.media_dtype float16   # a config change
    python benchmarks/train.py --compile --kinds dilated --rows av16 av1024 --tag h200_compiled
    python benchmarks/train.py --graphed --kinds dilated --rows av16 av1024 --tag h200_graphed
"""

# B batch, N tokens of a window (LM), L fused tokens of a sample (AV digits), W segment length,
# R dilation rate.

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    COMPILED_RUNS,
    REPO_ROOT,
    RESULTS_DIR,
    cell,
    command_line,
    error_line,
    free_memory,
    is_oom,
    mixed_precision,
    partial_path,
    png_path,
    pyplot,
    save_figure,
    save_json,
    slug,
    synchronize,
    use_repository,
    utc_now,
)

use_repository()

KINDS = ("dilated", "dense")
DENSE_SEGMENT = 1 << 24  # one segment longer than any sequence: dense attention through the dilated op
AV_STACKS = ("text_stack", "audio_stack", "video_stack", "fusion_stack")

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_PREFIXES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
STEP_MARK, SYNC_MARK = "benchmark_train_step_", "benchmark_device_sync_"
PIPELINE_MARK = "benchmark_pipelined_steps"
GAPS_KEPT, GAP_HOST_EVENTS = 5, 4  # GPU gaps reported per row; host events named per gap
CLI_ARGS_WARNING = r"LightningCLI's args parameter is intended to run from within Python"
NO_TRAINER_LOG = r"You are trying to `self.log\(\)` but the `self.trainer` reference is not registered"


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row: a task at one size. `size` is digits per example (av) or the window N (lm)."""

    name: str
    task: str  # "av" | "lm"
    size: int
    batch: int
    config: str  # YAML under the repository root
    extra: tuple[str, ...] = ()  # more CLI overrides (smoke rows shrink the data)


ROWS = {
    "av16": RowSpec("av16", "av", 16, 16, "configs/avdigits_long.yaml"),
    "av256": RowSpec("av256", "av", 256, 8, "configs/avdigits_long.yaml"),
    "av1024": RowSpec("av1024", "av", 1024, 4, "configs/avdigits_long.yaml"),
    "lm8k": RowSpec("lm8k", "lm", 8192, 16, "configs/lm_bytes.yaml"),
    "lm32k": RowSpec("lm32k", "lm", 32768, 4, "configs/lm_bytes.yaml"),
    "lm128k": RowSpec("lm128k", "lm", 131072, 1, "configs/lm_bytes.yaml"),
}
SMOKE_ROWS = {
    "av4": RowSpec("av4", "av", 4, 2, "configs/demo.yaml", ("--data.init_args.train_examples", "16")),
    "lm64": RowSpec(
        "lm64", "lm", 64, 2, "configs/lm_bytes.yaml",
        ("--data.init_args.max_bytes", "200000", "--data.init_args.train_windows", "16"),
    ),
}  # fmt: skip
CONFIGS = {"av": "configs/avdigits_long.yaml", "lm": "configs/lm_bytes.yaml"}


def parse_row(text: str, batch: int | None = None) -> RowSpec:
    """A row by name (`av1024`, `lm8k`, smoke rows too) or as `task:size:batch` (`av:512:8`).

    `batch` replaces the row's batch when given.
    """
    known = ROWS | SMOKE_ROWS
    if text in known:
        spec = known[text]
    else:
        match = re.fullmatch(r"(av|lm):(\d+):(\d+)", text)
        if match is None:
            raise ValueError(f"row must be one of {sorted(known)} or task:size:batch (av|lm), got {text!r}")
        task, size, rows = match[1], int(match[2]), int(match[3])
        spec = RowSpec(text, task, size, rows, CONFIGS[task])
    if spec.size < 1 or spec.batch < 1:
        raise ValueError(f"row {text!r}: size and batch must be >= 1")
    return spec if batch is None else dataclasses.replace(spec, batch=batch)


def row_overrides(
    spec: RowSpec, kind: str, workers: int | None, compiled: bool = False, graphed: bool = False
) -> list[str]:
    """LightningCLI arguments after `--config`: size, batch, workers, the dense schedule, compile,
    graphed steps (the modules' option), extras."""
    data = "--data.init_args"
    size = (
        [f"{data}.dataset.num_digits", str(spec.size)]
        if spec.task == "av"
        else [f"{data}.window", str(spec.size)]
    )
    args = [*size, f"{data}.batch_size", str(spec.batch)]
    args += [] if workers is None else [f"{data}.num_workers", str(workers)]
    if kind == "dense":
        args += dense_overrides(spec.task)
    # both switches, always: a config may turn either on, and they exclude each other
    args += ["--model.init_args.compile", str(compiled).lower()]
    args += ["--model.init_args.graphed", str(graphed).lower()]
    return args + list(spec.extra)


def dense_overrides(task: str) -> list[str]:
    """The dense baseline's overrides: full causal attention (lm); one segment of DENSE_SEGMENT
    tokens at rate 1 in every stack (av)."""
    if task == "lm":
        return ["--model.init_args.model.init_args.attention", "dense"]
    args = []
    for stack in AV_STACKS:
        key = f"--model.init_args.model.{stack}"
        args += [f"{key}.segment_lengths", f"[{DENSE_SEGMENT}]", f"{key}.dilation_rates", "[1]"]
    return args


# --------------------------------------------------------------------------------------------
# Building the module and data from the configs
# --------------------------------------------------------------------------------------------


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (devices found, seed set) off while the CLI builds the objects, and
    its warning that `args` are given while this script has command-line arguments of its own."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CLI_ARGS_WARNING)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def build(spec: RowSpec, kind: str, device: torch.device, overrides: Sequence[str]):
    """(module on `device`, in train mode; set-up data module; gradient clip value or None).

    The YAML's seed is set by the CLI before the module is built, so both kinds start alike.
    """
    from mmlongnet.training import CLI

    args = ["--config", str(REPO_ROOT / spec.config), *overrides]
    args += ["--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu"]
    args += ["--trainer.precision", "32-true", "--trainer.logger", "false", "--trainer.callbacks", "[]"]
    with quiet_lightning():
        try:
            cli = CLI(args=args, run=False)
        except SystemExit as exit_:  # the CLI's config error (printed above) ends this row, not the run
            raise RuntimeError(f"the row's configuration does not build: {' '.join(overrides)}") from exit_
    cli.datamodule.setup("fit")
    return cli.model.to(device).train(), cli.datamodule, cli.trainer.gradient_clip_val


def optimizers(module) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer and per-step scheduler of `module.configure_optimizers()` (dict or optimizer)."""
    config = module.configure_optimizers()
    if isinstance(config, torch.optim.Optimizer):
        return config, None
    scheduler = config.get("lr_scheduler")
    return config["optimizer"], scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler


def endless(datamodule) -> Iterator:
    """Batches of the train loader, epoch after epoch (on the host, as the loader yields them)."""
    while True:
        yield from datamodule.train_dataloader()


class ShapeFilter:
    """Batches of at most `limit` distinct input shapes (all when None): the first `limit` shapes
    the loader yields; a batch of another shape is passed over and counted in `passed_over`."""

    def __init__(self, batches: Iterator, limit: int | None):
        self.batches, self.limit = batches, limit
        self.allowed: list[str] = []
        self.passed_over = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        for batch in self.batches:
            key = shape_key(batch)
            if key not in self.allowed:
                if self.limit is not None and len(self.allowed) >= self.limit:
                    self.passed_over += 1
                    continue
                self.allowed.append(key)
            return batch
        raise StopIteration

    def close(self) -> None:
        self.batches.close()


def tensor_shapes(obj) -> tuple:
    """The shapes of every tensor in a batch (tensor, dataclass, mapping or sequence), in order."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape),)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, field.name) for field in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        obj = [obj[key] for key in sorted(obj)]
    if isinstance(obj, (list, tuple)):
        return tuple(shape for item in obj for shape in tensor_shapes(item))
    return ()


def shape_key(batch) -> str:
    """A batch's input shapes as text, e.g. "16x8193" or "2x40 2x16000 2x4x1x8x8 ..."."""
    return " ".join("x".join(map(str, shape)) for shape in tensor_shapes(batch))


def host_lengths(batch) -> dict[str, list[int]] | None:
    """Per-sample lengths per modality of a multimodal batch (held on the host), else None."""
    lengths = getattr(batch, "lengths", None)
    if not isinstance(lengths, dict):
        return None
    return {name: [int(n) for n in value] for name, value in sorted(lengths.items())}


# --------------------------------------------------------------------------------------------
# One step, and the measurements
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trainee:
    """What a step needs: the module, its optimizer and scheduler, the clip value, the device."""

    module: object
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    clip: float | None
    device: torch.device

    def __post_init__(self) -> None:
        # what Lightning clips: the optimizer's parameters, listed once (walking the AV module's
        # 332 submodules takes ~0.6 ms of host time a step on a 2-core CPU; a fit does not)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, batch, index: int) -> torch.Tensor:
        """One training step on a host batch; returns the loss, detached (not read on the host).
        A graphed step has run its backward and clipping and zeroes its gradients itself."""
        module = self.module
        graphed = getattr(module, "graphed_steps", None) is not None
        batch = module.transfer_batch_to_device(batch, self.device, 0)
        with mixed_precision(self.device):
            if graphed:  # the classifier's returns (loss, correct), the LM's the loss
                loss = module.graphed_step(batch, (self.clip, "norm"))
                loss = loss[0] if isinstance(loss, tuple) else loss
            else:
                loss = module.training_step(batch, index)
        if not graphed:
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if not graphed:
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def tokens(self) -> int:
        """Tokens of the last step's batch, as the module counted them (`last_batch_tokens`); read
        after the step, so that a count held on the device is not a sync of the step."""
        return int(self.module.last_batch_tokens)


@dataclasses.dataclass
class Timed:
    """The timed steps: host ms per step, tokens per step, ms to fetch each batch, lengths, shapes."""

    times_ms: list[float]
    tokens: list[int]
    data_ms: list[float]
    lengths: list[dict] | None
    shapes: list[str]
    loss: float | None


def run_steps(trainee: Trainee, batches: Iterator, count: int, first: int) -> Timed:
    """Run `count` steps (indices from `first`), each timed between two device synchronisations."""
    timed = Timed([], [], [], [], [], None)
    for index in range(first, first + count):
        started = time.perf_counter()
        batch = next(batches)
        timed.data_ms.append((time.perf_counter() - started) * 1e3)
        timed.shapes.append(shape_key(batch))
        lengths = host_lengths(batch)
        if lengths is not None:
            timed.lengths.append(lengths)
        synchronize(trainee.device)
        started = time.perf_counter()
        loss = trainee.step(batch, index)
        synchronize(trainee.device)
        timed.times_ms.append((time.perf_counter() - started) * 1e3)
        timed.tokens.append(trainee.tokens())
        timed.loss = float(loss)
    timed.lengths = timed.lengths or None
    return timed


def first_runs(times_ms: Sequence[float], shapes: Sequence[str]) -> dict[str, float]:
    """Per input shape, the host time of the first step that ran it: the step that builds its
    kernel plans or, compiled, compiles its graph."""
    first: dict[str, float] = {}
    for ms, shape in zip(times_ms, shapes, strict=True):
        first.setdefault(shape, ms)
    return first


def warm_each_shape(trainee: Trainee, batches: ShapeFilter, warm: Timed) -> Timed:
    """More warm-up steps until each shape run so far has run `COMPILED_RUNS` times (at most 64
    more steps), so that no timed step on those shapes compiles or records. A shape that first
    comes in a timed step counts among the row's `new_shape_steps`."""
    for _ in range(64):
        counts = [warm.shapes.count(shape) for shape in batches.allowed]
        if counts and min(counts) >= COMPILED_RUNS:
            break
        more = run_steps(trainee, batches, 1, len(warm.times_ms))
        for field in ("times_ms", "tokens", "data_ms", "shapes"):
            getattr(warm, field).extend(getattr(more, field))
    return warm


def peak_memory_gib(device: torch.device) -> float | None:
    """`torch.cuda.max_memory_allocated` since the last reset, in GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@dataclasses.dataclass(frozen=True)
class Pipelined:
    """Steps run back to back (`profile_pipelined`): ms per step, tokens per second, GPU busy."""

    step_ms: float
    tokens_per_s: float
    gpu_busy_share: float | None


@dataclasses.dataclass(frozen=True)
class Event:
    """A profiler event reduced to what is counted: name, where it ran, [start, end) in us."""

    name: str
    device: bool  # ran on the GPU (a kernel, memcpy, memset, or a GPU-side annotation)
    annotation: bool  # a `record_function` range
    start: float
    end: float


def profile_steps(
    trainee: Trainee, batches: Iterator, count: int, first: int, trace: Path | None = None
) -> tuple[list[Event], list[str]]:
    """Run `count` steps under `torch.profiler` (CPU, and CUDA on a GPU); return its events and
    the shapes of the batches. Step i is marked `STEP_MARK + i`, its closing synchronisation
    `SYNC_MARK + i`; batches are fetched before the profiler starts. `trace`: also write the
    Chrome trace there (gzipped when the name ends in .gz)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    host_batches = [next(batches) for _ in range(count)]
    activities = [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CUDA] if trainee.device.type == "cuda" else []
    synchronize(trainee.device)
    with profile(activities=activities, acc_events=True) as prof:
        for i, batch in enumerate(host_batches):
            with record_function(f"{STEP_MARK}{i}"):
                trainee.step(batch, first + i)
            with record_function(f"{SYNC_MARK}{i}"):
                synchronize(trainee.device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return to_events(prof.events()), [shape_key(batch) for batch in host_batches]


def profile_pipelined(trainee: Trainee, batches: Iterator, count: int, first: int) -> Pipelined:
    """Run `count` steps back to back as a fit does (the next batch fetched from the loader between
    steps, no synchronisation until the end) under `torch.profiler`; their span, tokens and the
    union of the kernel intervals over the span (GPU busy: None without CUDA)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CUDA] if trainee.device.type == "cuda" else []
    tokens = 0
    synchronize(trainee.device)
    with profile(activities=activities, acc_events=True) as prof:
        with record_function(PIPELINE_MARK):
            for index in range(first, first + count):
                trainee.step(next(batches), index)
                tokens += trainee.tokens()
            synchronize(trainee.device)
    events = to_events(prof.events())
    span = next(e for e in events if e.annotation and not e.device and e.name == PIPELINE_MARK)
    us = span.end - span.start
    busy = None
    if trainee.device.type == "cuda":
        busy = interval_union([(e.start, e.end) for e in events if is_kernel(e)], (span.start, span.end)) / us
    return Pipelined(us / 1e3 / count, tokens * 1e6 / us, busy)


def to_events(function_events) -> list[Event]:
    """`Event`s from torch.profiler's `FunctionEvent`s."""
    from torch.autograd import DeviceType

    return [
        Event(
            event.name,
            event.device_type != DeviceType.CPU,
            bool(event.is_user_annotation),
            event.time_range.start,
            event.time_range.end,
        )  # fmt: skip
        for event in function_events
    ]


def step_windows(events: Sequence[Event]) -> list[tuple[float, float, float]]:
    """Per profiled step (in order): (start, end of the step's host code, end of its closing sync)."""
    host = {e.name: e for e in events if e.annotation and not e.device}
    windows, i = [], 0
    while f"{STEP_MARK}{i}" in host and f"{SYNC_MARK}{i}" in host:
        step, sync = host[f"{STEP_MARK}{i}"], host[f"{SYNC_MARK}{i}"]
        windows.append((step.start, step.end, sync.end))
        i += 1
    return windows


def interval_union(intervals: Sequence[tuple[float, float]], window: tuple[float, float]) -> float:
    """Length of the union of `intervals` clipped to `window` (overlaps counted once)."""
    low, high = window
    clipped = sorted((max(a, low), min(b, high)) for a, b in intervals if min(b, high) > max(a, low))
    total, cursor = 0.0, low
    for a, b in clipped:
        if b > cursor:
            total += b - max(a, cursor)
            cursor = b
    return total


def is_kernel(event: Event) -> bool:
    """A CUDA kernel run on the GPU (not a copy, a fill, or an annotation: the GPU-side copies of
    the benchmark's own step marks are left out by name too)."""
    skipped = ("Memcpy", "Memset", STEP_MARK, SYNC_MARK, PIPELINE_MARK)
    return event.device and not event.annotation and not event.name.startswith(skipped)


def is_runtime(event: Event, names: Sequence[str], prefix: bool = False) -> bool:
    """A host-side CUDA runtime / driver call named one of `names` (or starting with one, `prefix`)."""
    if event.device or event.annotation:
        return False
    return event.name.startswith(tuple(names)) if prefix else event.name in names


def within(event: Event, low: float, high: float) -> bool:
    """The event starts inside [low, high)."""
    return low <= event.start < high


def count_syncs(events: Sequence[Event], low: float, high: float) -> dict[str, int]:
    """Host syncs started in [low, high), by name: stream/device/event synchronisations and
    synchronous `cudaMemcpy` (`cudaMemcpyAsync` does not block the host and is not counted)."""
    counts = dict.fromkeys(SYNC_CALLS, 0)
    for event in events:
        if is_runtime(event, SYNC_CALLS) and within(event, low, high):
            counts[event.name] += 1
    return counts


def count_launches(events: Sequence[Event], low: float, high: float) -> int:
    """Kernel launch calls (`cudaLaunchKernel`, `cuLaunchKernel*`, graph launches) in [low, high)."""
    return sum(is_runtime(e, LAUNCH_PREFIXES, prefix=True) and within(e, low, high) for e in events)


@dataclasses.dataclass
class Profile:
    """Per profiled step, from its events; GPU fields are None without CUDA activity."""

    step_ms: float | None
    gpu_busy_share: float | None
    kernels_per_step: float | None
    launches_per_step: float | None
    syncs_per_step: float | None
    syncs: dict[str, float] | None
    gpu_gaps: list[dict] | None = None


def gpu_gaps(events: Sequence[Event], windows: Sequence[tuple[float, float, float]]) -> list[dict]:
    """The `GAPS_KEPT` longest stretches without a running kernel inside the step windows
    ([start, end of the closing sync) of each), longest first: {"step", "at_ms" (after the step's
    start), "ms", "host": the host events overlapping the gap most, "name (overlap ms)", at most
    `GAP_HOST_EVENTS` names, the benchmark's own marks left out}."""
    kernels = sorted((e.start, e.end) for e in events if is_kernel(e))
    host = [e for e in events if not e.device and not e.name.startswith((STEP_MARK, SYNC_MARK))]
    gaps = []  # (step, gap start, gap end, step start)
    for step, (start, _, done) in enumerate(windows):
        cursor = start
        for low, high in kernels:
            if low >= done:
                break
            if low > cursor:
                gaps.append((step, cursor, low, start))
            cursor = max(cursor, high)
        if cursor < done:
            gaps.append((step, cursor, done, start))
    found = []
    for step, low, high, start in sorted(gaps, key=lambda gap: gap[1] - gap[2])[:GAPS_KEPT]:
        overlaps = sorted(
            ((min(e.end, high) - max(e.start, low), e.name) for e in host if e.start < high and e.end > low),
            key=lambda overlap: -overlap[0],
        )
        names = list(dict.fromkeys(name for _, name in overlaps))[:GAP_HOST_EVENTS]
        longest = {name: us for us, name in reversed(overlaps)}  # each name's longest overlap
        found.append({
            "step": step, "at_ms": round((low - start) / 1e3, 3), "ms": round((high - low) / 1e3, 3),
            "host": [f"{name} ({longest[name] / 1e3:.3f} ms)" for name in names],
        })  # fmt: skip
    return found


def summarize_profile(events: Sequence[Event], cuda: bool) -> Profile:
    """GPU-busy share (median over steps of the union of kernel intervals in [step start, sync end]
    over that span), and per-step means of kernels, launches and host syncs (syncs counted in the
    step's own code, not the closing synchronisation the benchmark adds)."""
    windows = step_windows(events)
    if not windows:
        return Profile(None, None, None, None, None, None)
    step_ms = statistics.median((done - start) / 1e3 for start, _, done in windows)
    if not cuda:
        return Profile(step_ms, None, None, None, None, None)
    kernels = [e for e in events if is_kernel(e)]
    shares, kernel_counts, launches = [], [], []
    syncs = dict.fromkeys(SYNC_CALLS, 0)
    for start, end, done in windows:
        shares.append(interval_union([(e.start, e.end) for e in kernels], (start, done)) / (done - start))
        kernel_counts.append(sum(within(e, start, done) for e in kernels))
        launches.append(count_launches(events, start, end))
        for name, count in count_syncs(events, start, end).items():
            syncs[name] += count
    steps = len(windows)
    per_step = {name: count / steps for name, count in syncs.items()}
    return Profile(
        step_ms, statistics.median(shares), sum(kernel_counts) / steps, sum(launches) / steps,
        sum(per_step.values()), per_step, gpu_gaps(events, windows),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# A row
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One (row, kind)'s results; status "ok", "oom", "error" or "skipped" (time budget)."""

    row: str
    task: str
    size: int  # digits per example (av) or window N (lm)
    batch: int
    kind: str  # "dilated" | "dense"
    status: str
    overrides: list[str]
    error: str | None = None
    step_ms: float | None = None  # median host time of a timed step
    step_ms_repeated: float | None = None  # median over timed steps whose input shape ran before
    new_shape_steps: int | None = None  # timed steps on a shape not run before (plans, compiles)
    steps_per_s: float | None = None  # 1000 / step_ms
    tokens_per_step: float | None = None  # mean over the timed steps (fused valid tokens / B * N)
    tokens_per_s: float | None = None  # tokens_per_step * steps_per_s
    data_ms: float | None = None  # median host time to fetch a batch (not in step_ms)
    peak_gib: float | None = None
    gpu_busy_share: float | None = None
    kernels_per_step: float | None = None
    launches_per_step: float | None = None
    syncs_per_step: float | None = None
    syncs: dict[str, float] | None = None
    gpu_gaps: list[dict] | None = None  # the longest stretches without a kernel, with the host's events
    profiled_step_ms: float | None = None
    pipelined_step_ms: float | None = None  # --pipelined-steps: their span over their count
    pipelined_tokens_per_s: float | None = None
    pipelined_gpu_busy_share: float | None = None
    distinct_shapes: int | None = None  # over every step run (warm-up, timed, profiled)
    shapes: list[str] | None = None
    warmup_steps: int | None = None  # untimed steps run first (more with --compile: each shape's)
    passed_over: int | None = None  # loader batches of a shape beyond --shapes, not run
    first_run_ms: dict[str, float] | None = None  # per shape, its first step (plans; compiling)
    loss: float | None = None  # of the last timed step
    times_ms: list[float] | None = None
    tokens: list[int] | None = None
    lengths: list[dict] | None = None  # av: per timed step, the batch's lengths per modality


def measure(spec: RowSpec, kind: str, args: argparse.Namespace, device: torch.device) -> Row:
    """Build one (row, kind), run its warm-up, timed and profiled steps, and fill its row."""
    overrides = row_overrides(spec, kind, args.workers, args.compile, args.graphed)
    row = Row(spec.name, spec.task, spec.size, spec.batch, kind, "ok", overrides)
    module, datamodule, clip = build(spec, kind, device, overrides)
    trainee = Trainee(module, *optimizers(module), clip, device)
    batches = ShapeFilter(endless(datamodule), args.shapes)
    try:
        warm = run_steps(trainee, batches, args.warmup, 0)
        if args.compile or args.graphed:  # until every shape replays its CUDA graphs
            warm = warm_each_shape(trainee, batches, warm)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = run_steps(trainee, batches, args.steps, args.warmup)
        row.peak_gib = peak_memory_gib(device)
        trace = args.trace / f"trace_{spec.name}_{kind}.json.gz" if args.trace else None
        events, profiled_shapes = profile_steps(
            trainee, batches, args.profile_steps, args.warmup + args.steps, trace
        )
        if args.pipelined_steps:
            first = args.warmup + args.steps + args.profile_steps
            pipelined = profile_pipelined(trainee, batches, args.pipelined_steps, first)
            row.pipelined_step_ms, row.pipelined_tokens_per_s = pipelined.step_ms, pipelined.tokens_per_s
            row.pipelined_gpu_busy_share = pipelined.gpu_busy_share
    finally:
        batches.close()  # ends the loader's workers
    fill_timing(row, timed, warm.shapes)
    fill_profile(row, summarize_profile(events, device.type == "cuda"))
    row.warmup_steps, row.passed_over = len(warm.times_ms), batches.passed_over
    row.first_run_ms = first_runs(warm.times_ms + timed.times_ms, warm.shapes + timed.shapes)
    shapes = warm.shapes + timed.shapes + profiled_shapes
    row.distinct_shapes, row.shapes = len(set(shapes)), sorted(set(shapes))
    return row


def fill_timing(row: Row, timed: Timed, earlier_shapes: Sequence[str] = ()) -> None:
    """Step time, rates, tokens, data time and the last loss from the timed steps.

    Also the median over the steps whose input shape ran in an earlier step (`earlier_shapes`:
    the warm-up's), apart: a step on a new shape may build kernel plans or compile and record
    CUDA graphs, a cost paid once per shape in a run.
    """
    row.times_ms, row.tokens, row.lengths, row.loss = timed.times_ms, timed.tokens, timed.lengths, timed.loss
    row.step_ms = statistics.median(timed.times_ms)
    seen, repeated = set(earlier_shapes), []
    for ms, shape in zip(timed.times_ms, timed.shapes, strict=True):
        if shape in seen:
            repeated.append(ms)
        seen.add(shape)
    row.new_shape_steps = len(timed.times_ms) - len(repeated)
    row.step_ms_repeated = statistics.median(repeated) if repeated else None
    row.steps_per_s = 1e3 / row.step_ms
    row.tokens_per_step = statistics.fmean(timed.tokens)
    row.tokens_per_s = row.tokens_per_step * row.steps_per_s
    row.data_ms = statistics.median(timed.data_ms)


def fill_profile(row: Row, profile: Profile) -> None:
    """The profiled steps' counts (GPU fields stay None without CUDA)."""
    row.profiled_step_ms, row.gpu_busy_share = profile.step_ms, profile.gpu_busy_share
    row.kernels_per_step, row.launches_per_step = profile.kernels_per_step, profile.launches_per_step
    row.syncs_per_step, row.syncs, row.gpu_gaps = profile.syncs_per_step, profile.syncs, profile.gpu_gaps


@contextmanager
def no_trainer_log_warning() -> Iterator[None]:
    """Filter Lightning's warning that `self.log` has no Trainer (the call is a no-op then)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_TRAINER_LOG)
        yield


def run_row(spec: RowSpec, kind: str, args: argparse.Namespace, device: torch.device) -> Row:
    """`measure`, recording an out-of-memory or another error as the row's status."""
    free_memory(device)
    try:
        with no_trainer_log_warning():
            return measure(spec, kind, args, device)
    except Exception as exc:  # noqa: BLE001 - a failure ends this row, not the run
        status = "oom" if is_oom(exc) else "error"
        if status == "error":
            traceback.print_exc()
        overrides = row_overrides(spec, kind, args.workers, args.compile, args.graphed)
        return Row(spec.name, spec.task, spec.size, spec.batch, kind, status, overrides, error_line(exc))
    finally:
        free_memory(device)


def run_all(
    specs: Sequence[RowSpec], args: argparse.Namespace, device: torch.device, partial: Path | None
) -> list[Row]:
    """Every row, both kinds (in `args.kinds` order); once `--time-budget` seconds have passed, the
    remaining rows are recorded as skipped. Rows are saved to `partial` as they come."""
    rows, started = [], time.monotonic()
    for spec in specs:
        for kind in args.kinds:
            elapsed = time.monotonic() - started
            if elapsed > args.time_budget:
                why = f"time budget of {args.time_budget:g} s spent ({elapsed:.0f} s)"
                row = Row(spec.name, spec.task, spec.size, spec.batch, kind, "skipped", [], why)
            else:
                row = run_row(spec, kind, args, device)
            rows.append(row)
            print(f"[{time.monotonic() - started:6.1f}s] {describe(row)}", flush=True)
            if partial is not None:
                save_json(partial, {"partial": True}, rows)
    return rows


# --------------------------------------------------------------------------------------------
# Output: JSON, markdown, plot
# --------------------------------------------------------------------------------------------


def describe(row: Row) -> str:
    """One printed line for a row."""
    what = f"{row.row:<8} {row.kind:<7} B={row.batch}"
    if row.status != "ok":
        return f"{what}  {row.status}" + (f" ({row.error})" if row.error else "")
    return (
        f"{what}  {row.step_ms:9.1f} ms  {row.tokens_per_s:10.0f} tokens/s  "
        f"busy {cell(row.gpu_busy_share, '.2f')}  syncs/step {cell(row.syncs_per_step, '.1f')}  "
        f"shapes {row.distinct_shapes}  loss {row.loss:.3f}"
        + (f"  longest GPU gap {row.gpu_gaps[0]['ms']:.1f} ms" if row.gpu_gaps else "")
        + (
            f"  pipelined {row.pipelined_step_ms:.1f} ms/step, "
            f"busy {cell(row.pipelined_gpu_busy_share, '.2f')}"
            if row.pipelined_step_ms is not None
            else ""
        )
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """The results, one line per (row, kind)."""
    lines = [
        "| row | attention | B | tokens/step | steps/s | tokens/s | ms/step, seen shapes | peak GiB "
        "| GPU busy | kernels/step | launches/step | syncs/step | shapes | data ms "
        "| pipelined: ms/step | tokens/s | GPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = cell(r.steps_per_s, ".2f") if r.status == "ok" else r.status
        lines.append(
            f"| {r.row} | {r.kind} | {r.batch} | {cell(r.tokens_per_step, ',.0f')} | {rate} | "
            f"{cell(r.tokens_per_s, ',.0f')} | {cell(r.step_ms_repeated, '.1f')} | "
            f"{cell(r.peak_gib, '.1f')} | "
            f"{cell(r.gpu_busy_share, '.2f')} | {cell(r.kernels_per_step, ',.0f')} | "
            f"{cell(r.launches_per_step, ',.0f')} | {cell(r.syncs_per_step, '.1f')} | "
            f"{cell(r.distinct_shapes, 'd')} | {cell(r.data_ms, '.1f')} | "
            f"{cell(r.pipelined_step_ms, '.1f')} | {cell(r.pipelined_tokens_per_s, ',.0f')} | "
            f"{cell(r.pipelined_gpu_busy_share, '.2f')} |"
        )
    return "\n".join(lines)


def plot_results(meta: dict, rows: Sequence[Row], path: Path) -> None:
    """Two panels of grouped bars per row, dilated beside dense: tokens/s (log) and GPU-busy share."""
    plt = pyplot()
    names = list(dict.fromkeys(r.row for r in rows))
    fig, (ax_rate, ax_busy) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(KINDS)
    for k, (kind, color) in enumerate(zip(KINDS, ("tab:blue", "0.3"), strict=True)):
        by_name = {r.row: r for r in rows if r.kind == kind and r.status == "ok"}
        xs = [i + (k - (len(KINDS) - 1) / 2) * width for i in range(len(names))]
        rates = [by_name[n].tokens_per_s if n in by_name else 0.0 for n in names]
        busy = [(by_name[n].gpu_busy_share or 0.0) if n in by_name else 0.0 for n in names]
        ax_rate.bar(xs, rates, width, color=color, label=kind)
        ax_busy.bar(xs, busy, width, color=color, label=kind)
    for ax in (ax_rate, ax_busy):
        ax.set_xticks(range(len(names)), names)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if any(r.tokens_per_s for r in rows if r.status == "ok"):
        ax_rate.set_yscale("log")
    ax_rate.set_ylabel("training tokens/s (median step)")
    ax_rate.set_title("throughput")
    ax_busy.set_ylim(0, 1)
    ax_busy.set_ylabel("GPU-busy share of a step (kernels)")
    ax_busy.set_title("GPU-busy share" + ("" if meta.get("cuda") else " (no GPU: not measured)"))
    fig.suptitle(
        f"real training steps, dilated vs dense; {meta.get('device')}; torch {meta.get('torch')}", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace, device: torch.device) -> dict:
    """Device, library versions, command line, date and settings of this run."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": cuda,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "precision": "bf16 autocast over training_step, fp32 master weights" if cuda else "fp32",
        "model": model_description(args),
        "step": (
            "transfer_batch_to_device, training_step (graphed AV rows: with backward and clip), optimizer, "
            "scheduler"
            if args.graphed
            else "transfer_batch_to_device, training_step, backward, clip, optimizer, scheduler, zero_grad"
        ),
        "timing": "host time between device synchronisations, median of the timed steps; batch fetch apart",
        "dense": {
            "lm": "LongNetLM(attention='dense')",
            "av": f"every stack: segment_lengths [{DENSE_SEGMENT}], dilation_rates [1]",
        },
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "profiled_steps": args.profile_steps,
        "command": command_line(),
        "date": utc_now(),
    }


def model_description(args: argparse.Namespace) -> str:
    """How the steps ran: eager, compiled or graphed (the AV rows)."""
    if args.graphed:
        return "AV rows: whole training steps recorded as CUDA graphs (graphed=True); LM rows eager"
    return "torch.compile(fullgraph=True), CUDA graphs" if args.compile else "eager"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", nargs="+", default=None, metavar="ROW",
        help=f"rows by name ({' '.join(ROWS)}) or task:size:batch, e.g. av:512:8 (default: all)",
    )  # fmt: skip
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="attention kinds")
    parser.add_argument("--batch", type=int, default=None, help="batch of every row (default: the row's)")
    parser.add_argument(
        "--workers", type=int, default=None, help="data loader workers (default: the config's)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the modules' compile option: the model under torch.compile(fullgraph=True), CUDA graphs "
        "on a GPU",
    )
    parser.add_argument(
        "--graphed",
        action="store_true",
        help="the AV rows with the classifier's graphed option: each step (forward, loss, backward, "
        "clipping) recorded as a CUDA graph per length bucket and replayed (not with --compile)",
    )
    parser.add_argument(
        "--shapes", type=int, default=None,
        help="run batches of at most this many distinct input shapes, the first the loader yields, "
        "passing over the others (default: all; with --compile: 2, each compiled and recorded in "
        "the warm-up)",
    )  # fmt: skip
    parser.add_argument(
        "--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), dest="settings",
        help="one more configuration override for every row, as `train.py fit` takes it, e.g. "
        "--set data.init_args.media_dtype float16 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument(
        "--pipelined-steps", type=int, default=0,
        help="also run this many steps back to back, synchronised at the end only (default 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, default=480.0, help="seconds; later rows are skipped (480)"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny rows (av4, lm64), 1 warm-up, 2 timed, 1 profiled step"
    )
    parser.add_argument(
        "--tag", default=None, help="file names are train_<tag>.{json,png} (default: the device's name)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory")
    parser.add_argument(
        "--trace", type=Path, default=None, metavar="DIR",
        help="also write each row's profiled steps as a Chrome trace, DIR/trace_<row>_<kind>.json.gz",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows = args.rows or list(SMOKE_ROWS)
        args.warmup, args.steps, args.profile_steps = 1, 2, 1
    args.rows = args.rows or list(ROWS)
    try:
        args.specs = [parse_row(text, args.batch) for text in args.rows]
    except ValueError as exc:
        parser.error(str(exc))
    settings = tuple(part for key, value in args.settings for part in (f"--{key.removeprefix('--')}", value))
    args.specs = [dataclasses.replace(spec, extra=spec.extra + settings) for spec in args.specs]
    if args.warmup < 0 or args.steps < 1 or args.profile_steps < 1 or args.pipelined_steps < 0:
        parser.error("need --warmup >= 0, --steps >= 1, --profile-steps >= 1 and --pipelined-steps >= 0")
    if args.graphed and args.compile:
        parser.error("--graphed records the eager model's steps; leave --compile off with it")
    if args.shapes is None and args.compile:
        args.shapes = 2
    if args.shapes is not None and args.shapes < 1:
        parser.error(f"--shapes must be >= 1, got {args.shapes}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def default_tag(device: torch.device, smoke: bool) -> str:
    """The device's name in lower case (plus "smoke")."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return slug(name) + ("_smoke" if smoke else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rows; write JSON and PNG; print the table last. Returns the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: --smoke (or --device cpu) runs the tiny rows on the CPU", file=sys.stderr)
        return 1
    if device.type == "cpu" and not args.smoke:
        print("note: full rows on the CPU are slow; --smoke runs the tiny ones", file=sys.stderr)
    meta = run_metadata(args, device)
    suffix = ("_compiled" if args.compile else "") + ("_graphed" if args.graphed else "")
    tag = args.tag or default_tag(device, args.smoke) + suffix
    json_path = args.out / f"train_{tag}.json"
    partial = partial_path(json_path)
    started = time.monotonic()
    rows = run_all(args.specs, args, device, partial)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    skipped = [f"{r.row}/{r.kind}" for r in rows if r.status == "skipped"]
    save_json(json_path, meta, rows)
    partial.unlink(missing_ok=True)
    png = png_path(json_path)
    plot_results(meta, rows, png)
    print(f"\nresults: {json_path}\nplot: {png}")
    if skipped:
        print(f"skipped after the time budget of {args.time_budget:g} s: {' '.join(skipped)}")
    print(f"\n{meta['device']}; torch {meta['torch']}; cuDNN {meta['cudnn']}; {meta['precision']}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
