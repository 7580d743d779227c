"""GPU benchmark of a LongNet-base training step: dilated attention against dense causal attention.

Times one training step of ``mmlongnet.models.LongNetLM`` in its base configuration (768 wide,
12 heads, 12 layers, FFN 3072, segments 2K..32K, rates 1, 2, 4, 6, 12; rotary positions) on
one sequence of N byte-level tokens (vocabulary 256 by default), for N in {8K, 32K, 128K}, with
two kinds of self-attention built from the same seed:

- dilated: the LongNet model as built (causal dilated attention, mmlongnet's fused op);
- dense: the same model with ``attention="dense"``, full causal attention through
  ``F.scaled_dot_product_attention`` forced onto cuDNN (then flash), the baseline.

One step = forward on tokens (B, N) under ``torch.autocast("cuda", dtype=torch.bfloat16)``
(fp32 master weights), next-token cross-entropy in fp32 over the logits, backward, an AdamW
step and zero_grad. Each configuration runs without activation checkpointing first and, when
that runs out of memory, again with ``checkpoint_activations=True``; a configuration that does
not fit either way is recorded as "oom".

Writes ``<out>/longnet_<tag>.json`` (rows appended to ``.json.tmp`` as they come, so a killed
run keeps what it measured) and ``<out>/longnet_<tag>.png``, and prints a markdown table.
``--plot-only FILE.json`` redraws the PNG and the table from a saved file, without a GPU;
``--dry-run`` prints the plan and an estimated runtime, also without a GPU.

    python benchmarks/longnet.py --tag h100               # N in {8K, 32K, 128K}, both kinds
    python benchmarks/longnet.py --quick                  # smoke test: N in {8K, 32K}
    python benchmarks/longnet.py --sizes 131072 262144 --kinds dilated
    python benchmarks/longnet.py --sizes 32768 --compile --profile-steps 3  # + GPU time by kernel kind
    python benchmarks/longnet.py --device cpu --sizes 64 --tiny   # a tiny model, on the CPU
    python benchmarks/longnet.py --plot-only benchmarks/results/longnet_<tag>.json
"""

# B batch, N tokens, E d_model, H heads, D head dim (E / H), F FFN width, L layers, V vocabulary,
# W segment length, R dilation rate.

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    RESULTS_DIR,
    cell,
    device_name,
    environment,
    error_line,
    finish_sweep,
    format_n,
    free_memory,
    is_oom,
    kernel_times,
    load_json,
    load_script,
    mixed_precision,
    partial_path,
    png_path,
    pyplot,
    save_figure,
    save_json,
    slug,
    synchronize,
    use_repository,
)

KINDS = ("dilated", "dense")
DEFAULT_SIZES = (8192, 32768, 131072)
QUICK_SIZES = (8192, 32768)
DEFAULT_VOCAB = 256  # byte-level tokens

SEED = 0
LEARNING_RATE = 1e-4
WARMUP_STEPS = 3  # the first compiled steps record CUDA graphs (--compile)
LONG_STEP_S = 2.0  # when a warm-up step takes longer than this, LONG_STEP_RUNS timed steps suffice
LONG_STEP_RUNS = 3
ASSUMED_TFLOPS = 200.0  # model TFLOP/s assumed by --dry-run to estimate the runtime (H100, bf16)
BUILD_SECONDS = 3.0  # --dry-run's allowance per configuration for building the model and kernels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The sizes of `LongNetLM` benchmarked (its vocabulary comes from --vocab)."""

    d_model: int
    nhead: int
    num_layers: int
    dim_feedforward: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead


# LongNet paper (Ding et al. 2023, arXiv 2307.02486), sec. 4: the base language model.
BASE = ModelConfig(768, 12, 12, 3072, (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
TINY = ModelConfig(64, 4, 2, 128, (16, 32), (1, 2))  # --tiny: a smoke test that runs on the CPU


# The attention benchmark's exact pair counting and FLOP convention, shared so both report alike.
attention_bench = load_script("attention")


# --------------------------------------------------------------------------------------------
# Counting useful work
# --------------------------------------------------------------------------------------------


def step_flops(config: ModelConfig, vocab: int, kind: str, n: int, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward), not counting checkpoint recomputation.

    Matmuls: 6 FLOPs per weight and token (2 forward, 4 backward) over each layer's attention
    projections (4 E^2) and FFN (2 E F) and the output head (E V); the embedding is a lookup.
    Attention: attention.py's convention, 4 D per attended (query, key) pair forward and 3.5x that
    forward + backward, over the exact causal pairs (all N(N+1)/2 for dense, `count_pairs` for
    dilated), summed over heads and layers.
    """
    e, f = config.d_model, config.dim_feedforward
    weights = config.num_layers * (4 * e * e + 2 * e * f) + e * vocab
    if kind == "dense":
        pairs = config.nhead * attention_bench.attended_pairs(n, causal=True)
    else:
        pairs = attention_bench.count_pairs(
            n, config.segment_lengths, config.dilation_rates, config.nhead, causal=True
        )
    attention = attention_bench.useful_flops(pairs, config.head_dim, "fwdbwd") * config.num_layers
    return batch * (6.0 * weights * n + attention)


# --------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------


def load_longnet_lm() -> type:
    """Import mmlongnet's LongNetLM, from this checkout when the package is not installed."""
    try:
        from mmlongnet.models import LongNetLM
    except ModuleNotFoundError as exc:
        if exc.name != "mmlongnet":
            raise
        use_repository()
        from mmlongnet.models import LongNetLM
    return LongNetLM


def compile_options(graphs: bool) -> dict:
    """torch.compile's options of the compiled runs: the package's, with CUDA graphs or without."""
    load_longnet_lm()  # makes mmlongnet importable
    from mmlongnet.training import COMPILE_OPTIONS

    return {**COMPILE_OPTIONS, "triton.cudagraphs": graphs}


def build_model(
    config: ModelConfig, vocab: int, kind: str, checkpointing: bool, device: torch.device
) -> torch.nn.Module:
    """A fresh LongNetLM with fp32 parameters on `device`, initialised from SEED (same for every run)."""
    long_net_lm = load_longnet_lm()
    torch.manual_seed(SEED)
    return long_net_lm(
        num_tokens=vocab,
        d_model=config.d_model,
        nhead=config.nhead,
        num_layers=config.num_layers,
        dim_feedforward=config.dim_feedforward,
        segment_lengths=list(config.segment_lengths),
        dilation_rates=list(config.dilation_rates),
        positions="rope",
        attention=kind,
        checkpoint_activations=checkpointing,
        device=device,
    ).train()


def make_tokens(n: int, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random tokens (B, N + 1) long from SEED: inputs are [:, :-1], next-token targets [:, 1:]."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(vocab, (batch, n + 1), generator=generator).to(device)


def attention_kernels(kind: str, device: torch.device) -> AbstractContextManager:
    """The SDPA kernels of a step: cuDNN first, then flash, for the dense baseline on CUDA.

    The dilated model is left alone (its op picks cuDNN itself). The context covers the
    backward too: checkpointed layers recompute their forward there, and SDPA reads the
    kernel choice when it runs.
    """
    if kind == "dense" and device.type == "cuda":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)
    return nullcontext()


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    kind: str,
    device: torch.device,
    graphs: bool = False,
) -> Callable[[], torch.Tensor]:
    """A callable running one training step on `tokens` (B, N + 1); it returns the loss (detached).

    Forward under autocast, next-token cross-entropy in fp32 over the logits, backward (outside
    autocast, as PyTorch recommends), AdamW step, zero_grad. `graphs`: the model replays CUDA
    graphs (torch.compile's "reduce-overhead"), so each step is marked as a new iteration.
    """
    inputs = tokens[:, :-1].contiguous()  # (B, N)
    targets = tokens[:, 1:].contiguous()  # (B, N)

    def step() -> torch.Tensor:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with attention_kernels(kind, device):
            with mixed_precision(device):
                logits = model(inputs)  # (B, N, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # (B*N, V) vs (B*N,)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def choose_runs(warmup_s: float, steps: int) -> int:
    """Timed steps: `steps`, or LONG_STEP_RUNS (at most `steps`) when a step takes over LONG_STEP_S."""
    return steps if warmup_s <= LONG_STEP_S else min(steps, LONG_STEP_RUNS)


def time_steps(
    step: Callable[[], torch.Tensor],
    device: torch.device,
    steps: int,
    warmup_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[list[float], float]:
    """Run WARMUP_STEPS untimed steps (each inside `warmup_context()`), then time `choose_runs`
    steps one by one.

    Each step is timed on the host between two device synchronisations (a training step's wall
    time, launch overhead included). Returns the times in milliseconds and the last loss.
    """

    def timed() -> tuple[float, torch.Tensor]:
        synchronize(device)
        started = time.perf_counter()
        loss = step()
        synchronize(device)
        return time.perf_counter() - started, loss

    warmup_s = 0.0
    for _ in range(WARMUP_STEPS):
        with warmup_context():
            warmup_s, loss = timed()
    times_ms = []
    for _ in range(choose_runs(warmup_s, steps)):
        seconds, loss = timed()
        times_ms.append(seconds * 1e3)
    return times_ms, float(loss)


@dataclasses.dataclass
class Measurement:
    """What one configuration returns: every timed step, the last loss, the peak memory and, with
    `profile_steps`, the GPU kernel time per step by kind (`kernel_times`)."""

    times_ms: list[float]
    loss: float
    peak_gib: float | None
    profile: dict | None = None


def measure_config(
    config: ModelConfig,
    vocab: int,
    kind: str,
    n: int,
    batch: int,
    checkpointing: bool,
    steps: int,
    device: torch.device,
    compiled: bool = False,
    promote_warmup: bool = False,
    profile_steps: int = 0,
) -> Measurement:
    """Build the model, AdamW and tokens for one configuration and time its training steps.

    `compiled`: the model runs under `torch.compile` with `COMPILE_OPTIONS`; on CUDA the whole
    forward and backward replay as CUDA graphs (what mode "reduce-overhead" does).
    `promote_warmup`: the warm-up steps (where those graphs are recorded) run inside
    `SELECTOR.promoting()`, so that every attention call records its fastest kernel (flash-attn
    at any size where it is installed) as `GraphedSteps` does; otherwise they choose as any eager
    step does (cuDNN and PyTorch's flash for the calls below `FLASH_MIN_WORK`).
    `profile_steps`: after the timed steps, this many more under `torch.profiler` (CUDA only), for
    the kernel time per step by kind (attention, matmul, optimizer, other; `kernel_times`).

    Everything it allocates is local: it is freed when this returns or raises. Peak memory is
    `torch.cuda.max_memory_allocated` (the caller resets the statistics first): parameters,
    gradients, optimizer state and activations.
    """
    model = build_model(config, vocab, kind, checkpointing, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")
    tokens = make_tokens(n, batch, vocab, device)  # (B, N + 1)
    graphs = compiled and device.type == "cuda"
    runnable = torch.compile(model, options=compile_options(graphs)) if compiled else model
    step = make_train_step(runnable, optimizer, tokens, kind, device, graphs=graphs)
    from mmlongnet.attention.kernels import SELECTOR

    warmup_context = SELECTOR.promoting if promote_warmup else nullcontext
    times_ms, loss = time_steps(step, device, steps, warmup_context)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    profile = kernel_times(step, profile_steps) if profile_steps and device.type == "cuda" else None
    return Measurement(times_ms, loss, peak, profile)


# --------------------------------------------------------------------------------------------
# Rows and the sweep
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One configuration's results; `status` is "ok", "oom" (did not fit even with activation
    checkpointing), "error", "skipped" (time budget, or out of memory at a smaller N) or
    "planned" (--dry-run)."""

    kind: str  # "dilated" | "dense"
    n: int
    batch: int
    status: str
    flops: float  # model FLOPs of one training step (see step_flops)
    checkpointing: bool | None = None  # whether the measured run checkpointed activations
    ms: float | None = None  # median step time
    tokens_per_s: float | None = None  # B * N / median step time
    tflops: float | None = None  # model TFLOP/s (flops / median step time)
    peak_gib: float | None = None
    loss: float | None = None  # of the last timed step, a sanity check (ln V at initialisation)
    ratio: float | None = None  # dilated rows: tokens/s over the dense row's at this N, same run
    runs: int = 0
    times_ms: list[float] | None = None
    oom_without_checkpointing: str | None = None  # why checkpointing was turned on
    error: str | None = None
    profile: dict | None = None  # --profile-steps: GPU kernel ms per step by kind (kernel_times)

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        """Build a row from its JSON form, ignoring keys this version does not know."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def fill_ratios(rows: list[Row], baseline: str = "dense") -> None:
    """Set each measured row's ratio: its tokens/s over the `baseline` kind's row at the same N and B."""
    dense = {(r.n, r.batch): r for r in rows if r.kind == baseline and r.status == "ok"}
    for row in rows:
        base = dense.get((row.n, row.batch))
        if row.kind != baseline and row.status == "ok" and base is not None and base.tokens_per_s:
            row.ratio = row.tokens_per_s / base.tokens_per_s


class Sweep:
    """Runs configurations one by one: keeps to the time budget, prints a line per configuration
    and saves every row to `<json>.tmp` as it goes.

    What a configuration is comes from `new_row`, `measure` and `describe`; another benchmark
    overrides them (and `baseline`, the kind the other kinds' ratio divides by) and keeps the
    rest: the time budget, the checkpointing fallback on out-of-memory and the partial results.
    """

    baseline = "dense"

    def __init__(self, args: argparse.Namespace, meta: dict, json_path: Path | None, dry_run: bool):
        """`json_path` None (or dry_run) saves nothing; the budget counts from now."""
        self.args, self.meta, self.json_path, self.dry_run = args, meta, json_path, dry_run
        self.config = TINY if args.tiny else BASE
        self.device = torch.device(args.device)
        self.rows: list[Row] = []
        self.stopped: dict[str, str] = {}  # kind -> why its larger sizes are not tried
        self.checkpoint_from: set[str] = set()  # kinds that ran out of memory without checkpointing
        self.last: dict[str, tuple[float, float]] = {}  # kind -> (FLOPs, seconds) of its last run
        self.started = time.monotonic()
        self.estimated = 0.0

    def elapsed(self) -> float:
        """Seconds since the sweep started (estimated seconds in a dry run)."""
        return self.estimated if self.dry_run else time.monotonic() - self.started

    def new_row(self, kind: str, n: int) -> Row:
        """The row of one configuration before it runs: what it is and its model FLOPs."""
        args = self.args
        return Row(kind, n, args.batch, "ok", step_flops(self.config, args.vocab, kind, n, args.batch))

    def measure(self, kind: str, n: int, checkpointing: bool) -> Measurement:
        """Time one configuration's training steps (raises on out-of-memory)."""
        args = self.args
        return measure_config(
            self.config, args.vocab, kind, n, args.batch, checkpointing, args.steps, self.device,
            compiled=args.compile, promote_warmup=args.compile and args.promote_warmup,
            profile_steps=args.profile_steps,
        )  # fmt: skip

    def describe(self, row: Row) -> str:
        """The line printed for a row."""
        return describe(row)

    def run(self, kind: str, n: int) -> Row:
        """Measure one configuration (or estimate it in a dry run) and record its row.

        Tries without activation checkpointing, then, on out-of-memory, with it; once a kind
        needed checkpointing, larger N start with it, and once it did not fit at all, larger N
        are skipped (memory grows with N).
        """
        args = self.args
        row = self.new_row(kind, n)
        if kind in self.stopped:
            row.status, row.error = "skipped", self.stopped[kind]
            return self._record(row)
        if self.dry_run:
            step_s = row.flops / (ASSUMED_TFLOPS * 1e12)
            seconds = BUILD_SECONDS + (WARMUP_STEPS + choose_runs(step_s, args.steps)) * step_s
            self.estimated += seconds
            row.status = "planned"
            row.error = (
                f"{row.flops / 1e12:.1f} TFLOP a step, ~{step_s * 1e3:.0f} ms a step, ~{seconds:.0f} s"
            )
            return self._record(row)
        last_flops, last_seconds = self.last.get(kind, (row.flops, 0.0))
        predicted = last_seconds * row.flops / last_flops
        if self.elapsed() + predicted > args.time_budget:
            self.stopped[kind] = f"time budget of {args.time_budget:.0f} s"
            row.status, row.error = "skipped", self.stopped[kind]
            return self._record(row)
        started = time.monotonic()
        for checkpointing in (True,) if kind in self.checkpoint_from else (False, True):
            free_memory(self.device, reset_peak=True)
            try:
                result = self.measure(kind, n, checkpointing)
            except Exception as exc:  # noqa: BLE001 - a failure ends this kind's series, not the sweep
                if not is_oom(exc):
                    row.status, row.error = "error", error_line(exc)
                    traceback.print_exc()
                    self.stopped[kind] = f"error at N={n}"
                    break
                row.checkpointing = checkpointing
                if checkpointing:
                    row.status, row.error = "oom", error_line(exc)
                    self.stopped[kind] = f"out of memory at N={n} with activation checkpointing"
                else:
                    row.oom_without_checkpointing = error_line(exc)
                    self.checkpoint_from.add(kind)
                continue  # the exception and the frames holding the model are released here
            row.checkpointing, row.times_ms = checkpointing, result.times_ms
            row.loss, row.peak_gib, row.profile = result.loss, result.peak_gib, result.profile
            row.runs = len(result.times_ms)
            row.ms = statistics.median(result.times_ms)
            row.tokens_per_s = row.batch * row.n / (row.ms / 1e3)
            row.tflops = row.flops / row.ms / 1e9
            break
        free_memory(self.device, reset_peak=True)
        self.last[kind] = (row.flops, time.monotonic() - started)
        return self._record(row)

    def _record(self, row: Row) -> Row:
        """Keep a row, print its line, and rewrite the partial results file."""
        self.rows.append(row)
        fill_ratios(self.rows, self.baseline)
        print(f"[{self.elapsed():6.1f}s] {self.describe(row)}", flush=True)
        if not self.dry_run and self.json_path is not None:
            save_json(partial_path(self.json_path), self.meta, self.rows)
        return row


def describe(row: Row) -> str:
    """One printed line for a row: what was measured and, if it ran, how fast."""
    what = f"{row.kind:<7} N={row.n:>8} B={row.batch}"
    if row.status != "ok":
        return f"{what}  {row.status}" + (f" ({row.error})" if row.error else "")
    checkpointing = "checkpointing" if row.checkpointing else "no checkpointing"
    return (
        f"{what}  {row.ms:10.1f} ms  {row.tokens_per_s:10.0f} tokens/s  {row.tflops:6.1f} TFLOP/s"
        f"  peak {cell(row.peak_gib, '.1f')} GiB  loss {row.loss:.3f}  ({checkpointing}, {row.runs} runs)"
    )


def run_sweep(sweep: Sweep, sizes: Sequence[int], kinds: Sequence[str]) -> None:
    """Every configuration, smallest N first (a time-budget stop loses only the largest N); at
    each N the kinds in the order given (dilated, then its dense baseline, by default)."""
    for n in sorted(sizes):
        for kind in kinds:
            sweep.run(kind, n)


# --------------------------------------------------------------------------------------------
# Output: JSON, markdown, plot
# --------------------------------------------------------------------------------------------


def sort_key(row: Row) -> tuple:
    """Rows in reading order: by N, then batch, then dilated before dense."""
    return (row.n, row.batch, KINDS.index(row.kind) if row.kind in KINDS else len(KINDS), row.kind)


def caption(meta: dict) -> str:
    """One line saying what a step is, for the table and the plot."""
    model = meta.get("model", {})
    return (
        f"LongNetLM E={model.get('d_model', '?')}, L={model.get('num_layers', '?')}, "
        f"H={model.get('nhead', '?')}, V={meta.get('vocab', '?')} ({meta.get('tokens', 'tokens')}), "
        f"B={meta.get('batch', 1)}; {meta.get('precision', '?')}; {meta.get('device', '?')}"
    )


def markdown_table(rows: list[Row]) -> str:
    """A markdown table of the results, one line per configuration. `dilated / dense` = the
    dilated model's tokens/s over the dense model's at the same N (both measured in this run)."""
    lines = [
        "| attention | N | checkpointing | step ms | tokens/s | model TFLOP/s | peak GiB | dilated / dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=sort_key):
        ms = cell(r.ms, ".1f") if r.status == "ok" else r.status
        checkpointing = (
            "-" if r.checkpointing is None or r.status != "ok" else "yes" if r.checkpointing else "no"
        )
        lines.append(
            f"| {r.kind} | {format_n(r.n)} | {checkpointing} | {ms} | {cell(r.tokens_per_s, ',.0f')} | "
            f"{cell(r.tflops, '.1f')} | {cell(r.peak_gib, '.1f')} | {cell(r.ratio, '.2f')} |"
        )
    profiled = [r for r in sorted(rows, key=sort_key) if r.profile]
    if profiled:
        kinds = ("attention", "matmul", "optimizer", "other")
        header = ["attention", "N", "step ms", "GPU kernel ms", *(f"{k} ms" for k in kinds), "kernels"]
        lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in profiled:
            by_kind = " | ".join(f"{r.profile[f'{k}_kernel_ms']:.1f}" for k in kinds)
            lines.append(
                f"| {r.kind} | {format_n(r.n)} | {cell(r.ms, '.1f')} | {r.profile['kernel_ms']:.1f} | "
                f"{by_kind} | {r.profile['kernels']:,.0f} |"
            )
    return "\n".join(lines)


# Line styles of the plot, per kind; dense is drawn first, dashed, with larger markers, so that
# equal values leave both visible.
STYLES = {
    "dilated": dict(color="tab:blue", ls="-", marker="o", ms=6, zorder=3, label="dilated attention"),
    "dense": dict(color="black", ls="--", marker="s", ms=9, zorder=2, label="dense attention"),
}


def plot_results(
    meta: dict,
    rows: list[Row],
    path: Path,
    *,
    kinds: Sequence[str] = KINDS,
    styles: dict[str, dict] | None = None,
    title: str | None = None,
    xlabel: str = "sequence length N (tokens)",
) -> None:
    """Two panels against N (log-x): tokens/s (log-y) and peak memory, one line per kind.

    Open markers: runs with activation checkpointing. Crosses on the device-memory line: "oom".
    `kinds` are drawn last to first with `styles` (default STYLES); `title` defaults to `caption`.
    """
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()

    styles = STYLES if styles is None else styles
    fig, (ax_rate, ax_memory) = plt.subplots(1, 2, figsize=(13, 5.5))
    device_gib = meta.get("device_memory_gib")
    if device_gib:
        ax_memory.axhline(
            device_gib, color="grey", ls=":", lw=1, label=f"device memory ({device_gib:.0f} GiB)"
        )
    for kind in [kind for kind in reversed(kinds) if any(r.kind == kind for r in rows)]:
        ok = sorted((r for r in rows if r.kind == kind and r.status == "ok"), key=sort_key)
        style = {"color": "tab:red", "ls": "-", "marker": "o", "ms": 6, "zorder": 3, "label": kind}
        style |= styles.get(kind, {})
        line = {key: style[key] for key in ("color", "ls", "zorder", "label")}
        ax_rate.plot([r.n for r in ok], [r.tokens_per_s for r in ok], **line)
        if all(r.peak_gib is not None for r in ok):
            ax_memory.plot([r.n for r in ok], [r.peak_gib for r in ok], **line)
        for r in ok:
            point = {"color": style["color"], "marker": style["marker"], "ms": style["ms"], "ls": "none"}
            point |= {"mfc": "none" if r.checkpointing else style["color"], "zorder": style["zorder"]}
            ax_rate.plot(r.n, r.tokens_per_s, **point)
            if r.peak_gib is not None:
                ax_memory.plot(r.n, r.peak_gib, **point)
        oom = [r.n for r in rows if r.kind == kind and r.status == "oom"]
        if oom and device_gib:
            ax_memory.plot(
                oom, [device_gib] * len(oom), "x", color=style["color"], ms=10, mew=2, label=f"{kind}: oom"
            )
    ax_rate.plot([], [], "o", color="grey", mfc="none", label="activation checkpointing")

    tokens = FuncFormatter(lambda x, _: format_n(int(x)) if x >= 1 else f"{x:g}")
    for ax in (ax_rate, ax_memory):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(tokens)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("training tokens/s (median step)")
    ax_rate.set_title("throughput of a training step")
    ax_memory.set_ylabel("peak allocated memory (GiB)")
    ax_memory.set_ylim(bottom=0)
    ax_memory.set_title("peak memory of a training step")
    fig.suptitle(caption(meta) if title is None else title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace) -> dict:
    """Device, library versions, command line, date and settings of this run."""
    device = torch.device(args.device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    config = TINY if args.tiny else BASE
    return environment(device) | {
        "model": dataclasses.asdict(config)
        | {"positions": "rope", "dropout": 0.0, "name": "tiny" if args.tiny else "base"},
        "vocab": args.vocab,
        "tokens": "byte-level" if args.vocab == 256 else "random ids",
        "batch": args.batch,
        "precision": ("bf16 autocast, fp32 master weights, fp32 loss" if device.type == "cuda" else "fp32"),
        "step": "forward, next-token cross-entropy, backward, AdamW step, zero_grad",
        "optimizer": {"name": "AdamW", "lr": LEARNING_RATE, "fused": device.type == "cuda"},
        "dense_kernels": "cuDNN, then flash (sdpa_kernel, set_priority=True)" if cuda else "default",
        "warmup_steps": WARMUP_STEPS,
        "compiled": f"torch.compile(options={compile_options(True)})" if args.compile else "eager",
        "timing": "host time between device synchronisations, median of the timed steps",
        "seed": SEED,
        "args": {key: value for key, value in vars(args).items() if key not in ("out", "plot_only")}
        | {"out": str(args.out)},
    }


def default_tag(args: argparse.Namespace) -> str:
    """File-name tag when --tag is not given: the device's name, plus tiny/quick."""
    device = torch.device(args.device)
    name = device_name(device) if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    parts = [slug(name)]
    parts += ["tiny"] if args.tiny else []
    parts += ["quick"] if args.quick else []
    return "_".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Benchmark a LongNet-base training step, dilated against dense causal attention."
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="N",
        help="sequence lengths (default: 8192 32768 131072)",
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="attention kinds")
    parser.add_argument("--batch", type=int, default=1, help="B, sequences per step (default: 1)")
    parser.add_argument(
        "--vocab", type=int, default=DEFAULT_VOCAB, help="V (default: 256, byte-level tokens)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help=f"timed steps after {WARMUP_STEPS} warm-up steps; {LONG_STEP_RUNS} when a step takes over "
        f"{LONG_STEP_S:g} s (default: 5)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (E=64, 2 layers) for smoke tests")
    parser.add_argument("--quick", action="store_true", help="smoke test: N in {8K, 32K}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory")
    parser.add_argument("--tag", default=None, help="added to the file names (default: the GPU's name)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        help="seconds; a kind whose next size would end past this is skipped (default: 480)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="both kinds under torch.compile (mmlongnet.training.COMPILE_OPTIONS; CUDA graphs on CUDA)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the timed steps, this many more under torch.profiler (CUDA): GPU kernel time per "
        "step by kind (attention, matmul, optimizer, other) in the JSON and a second table (default: 0)",
    )
    parser.add_argument(
        "--promote-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile: the warm-up steps that record the CUDA graphs promote every attention "
        "shape (KernelSelector.promoting), so each call records its fastest kernel, flash-attn at any "
        "size where installed (default); --no-promote-warmup: they choose as eager steps do",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimated runtime")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw PNG and table from a JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
    if min(args.sizes) < 2:
        parser.error(f"--sizes must be >= 2 tokens, got {args.sizes}")
    if args.batch < 1 or args.vocab < 2:
        parser.error(f"need --batch >= 1 and --vocab >= 2, got {args.batch} and {args.vocab}")
    if args.profile_steps < 0:
        parser.error(f"--profile-steps must be >= 0, got {args.profile_steps}")
    if args.steps < LONG_STEP_RUNS:
        parser.error(f"--steps must be >= {LONG_STEP_RUNS}, got {args.steps}")
    if torch.device(args.device).type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or --plot-only / --dry-run); return the exit status."""
    args = parse_args(argv)
    if args.plot_only is not None:
        meta, rows = load_json(args.plot_only, Row)
        fill_ratios(rows)
        png = png_path(args.plot_only)
        plot_results(meta, rows, png)
        print(caption(meta) + "\n\n" + markdown_table(rows))
        print(f"\nplot: {png}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        print(
            "benchmarks/longnet.py needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu "
            "--tiny runs a tiny model on the CPU, --plot-only JSON redraws saved results and --dry-run "
            "prints the plan without one.",
            file=sys.stderr,
        )
        return 1
    meta = run_metadata(args)
    tag = args.tag or default_tag(args) + ("_compiled" if args.compile else "")
    json_path = args.out / f"longnet_{tag}.json"
    sweep = Sweep(args, meta, json_path, dry_run=args.dry_run)
    print(f"# {caption(meta)}; torch {meta['torch']}, cuDNN {meta['cudnn']}", flush=True)
    try:
        run_sweep(sweep, args.sizes, args.kinds)
    except KeyboardInterrupt:
        print("interrupted: saving what was measured", file=sys.stderr)
    if args.dry_run:
        print(
            f"\n{len(sweep.rows)} configurations, estimated {sweep.estimated / 60:.1f} min at "
            f"{ASSUMED_TFLOPS:.0f} model TFLOP/s (more where a configuration first runs out of memory)"
        )
        return 0
    meta["wall_seconds"] = round(sweep.elapsed(), 1)
    finish_sweep(json_path, meta, sweep.rows, plot_results, markdown_table(sweep.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
