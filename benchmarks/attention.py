"""GPU benchmark of mmlongnet's dilated attention against dense cuDNN attention.

Measures, in bf16 with B=1 and H=16, the forward and the forward+backward time of
``mmlongnet.attention.dilated_attention`` for two LongNet schedules, from N=8K tokens doubling
up to the largest N that fits in memory, beside two cuDNN baselines timed in the same run:

- dense segments: the same per-segment work done by dense kernels: for each branch one batched
  call over (B * ceil(N / W), ceil(W / R), H, D), times summed; once with cuDNN
  (``F.scaled_dot_product_attention``) and, where flash-attn 4 is installed, once with its kernel
  (``flash_attn.cute.flash_attn_func``);
- dense full: plain full attention over all N tokens (for N <= --dense-max-n).

Writes ``<out>/attention_<tag>.json`` (rows appended to ``.json.tmp`` as they come, so a
killed run keeps what it measured) and ``<out>/attention_<tag>.png``, and prints a markdown
table. ``--plot-only FILE.json`` redraws the PNG and the table from a saved file, without a GPU;
``--dry-run`` prints the plan and an estimated runtime, also without a GPU. ``--graphed`` times the
dilated op's calls recorded as CUDA graphs and replayed, as graphed training steps and compiled
models run it (no launch work on the host; the dense baselines, one kernel a call, stay eager).

    python benchmarks/attention.py                    # the full sweep (~3-5 min on an H100)
    python benchmarks/attention.py --quick            # smoke test: N in {8K, 64K}, D=64, paper
    python benchmarks/attention.py --backend all --causal --tag causal
    python benchmarks/attention.py --plot-only benchmarks/results/attention_<tag>.json
"""

# B batch, N tokens, H heads, D head dim, W segment length, R dilation rate,
# S segments (batch of the dense-segment baseline), L rows of one segment for one head.

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    RESULTS_DIR,
    cell,
    environment,
    error_line,
    finish_sweep,
    format_n,
    free_memory,
    is_oom,
    load_json,
    partial_path,
    png_path,
    pyplot,
    save_figure,
    save_json,
    slug,
    use_repository,
)

SCHEDULES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # name: (segment lengths W_i, dilation rates R_i)
    "paper": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)),  # LongNet paper, sec. 4
    "lm": ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)),
}
MODES = ("fwd", "fwdbwd")
BACKENDS = ("sdpa", "flash_attn", "auto")  # dilated_attention backends this script knows
DENSE_KERNELS = ("cudnn", "flash_attn_4")  # the kernels of the dense baselines
BACKWARD_FACTOR = 2.5  # backward FLOPs per forward FLOP: fwd+bwd = 3.5 x fwd
QUICK_SIZES = (8192, 65536)

WARMUP_CALLS = 2
MAX_RUNS = 25
LARGE_CALL_MS = 100.0  # calls at least this long get 3 timed runs at minimum, shorter ones 5
L2_FALLBACK_BYTES = 50 * 2**20  # H100's L2, used when the device does not report its own

# Throughputs assumed by --dry-run to estimate the runtime (TFLOP/s, H100, bf16).
ASSUMED_TFLOPS = {"dilated": 300.0, "dense_segments": 450.0, "dense_full": 450.0}

KIND_LABELS = {"dilated": "dilated", "dense_segments": "dense-seg", "dense_full": "dense-full"}


# --------------------------------------------------------------------------------------------
# Counting useful work
# --------------------------------------------------------------------------------------------


def attended_pairs(rows: int, causal: bool) -> int:
    """Number of (query, key) pairs when `rows` queries attend to the same `rows` keys.

    Causal attention keeps the keys at or before each query: rows * (rows + 1) / 2 pairs.
    """
    return rows * (rows + 1) // 2 if causal else rows * rows


def count_pairs(
    n: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    heads: int,
    causal: bool = False,
) -> int:
    """Exact number of attended (query, key) pairs of dilated attention, for one sample.

    Branch i cuts the N tokens into segments [s*W, (s+1)*W) clipped to [0, N); in each segment,
    head h keeps the rows t (index within the segment) with t mod R == h mod R, for queries
    and keys alike, and every kept query attends to every kept key of its segment (causal:
    those at positions <= its own). Pairs are summed over heads and branches; a partial last
    segment, W % R != 0 and offsets with one row fewer are all counted exactly.
    """
    total = 0
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        full_segments, last_length = divmod(n, w)
        for h in range(heads):
            offset = h % r
            for length, count in ((w, full_segments), (last_length, 1)):
                rows = (length - offset + r - 1) // r  # t in [0, length) with t % r == offset
                total += count * attended_pairs(max(rows, 0), causal)
    return total


def dense_segment_shape(n: int, batch: int, w: int, r: int) -> tuple[int, int]:
    """Batch S and length L of the dense attention that does branch (W, R)'s per-segment work.

    S = B * ceil(N / W) segments of L = ceil(min(W, N) / R) rows each (a sequence shorter than
    W is one segment of N tokens).
    """
    return batch * math.ceil(n / w), math.ceil(min(w, n) / r)


def useful_flops(pairs: int, head_dim: int, mode: str) -> float:
    """FLOPs of `pairs` attended (query, key) pairs: 4*D per pair forward, 3.5x that fwd+bwd.

    4*D = 2*D for the score q.k plus 2*D for the weighted sum of v; the backward counts
    2.5x the forward (as in the FlashAttention papers).
    """
    forward = 4.0 * head_dim * pairs
    return forward * (1.0 + BACKWARD_FACTOR) if mode == "fwdbwd" else forward


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """One measurement: a kind of attention at one size, head dim, mode (and schedule, backend)."""

    kind: str  # "dilated" | "dense_segments" | "dense_full"
    schedule: str | None  # None for dense_full
    head_dim: int
    mode: str  # "fwd" | "fwdbwd"
    backend: str  # the dilated_attention backend; a DENSE_KERNELS entry for the baselines
    n: int

    @property
    def series(self) -> tuple:
        """The task without its size: the key under which a sweep over N grows and stops."""
        return (self.kind, self.schedule, self.head_dim, self.mode, self.backend)


def task_pairs(task: Task, heads: int, batch: int, causal: bool) -> list[int]:
    """Attended pairs of a task: one entry per branch for dense_segments, a single one else."""
    if task.kind == "dilated":
        segment_lengths, dilation_rates = SCHEDULES[task.schedule]
        return [batch * count_pairs(task.n, segment_lengths, dilation_rates, heads, causal)]
    if task.kind == "dense_segments":
        pairs = []
        for w, r in zip(*SCHEDULES[task.schedule], strict=True):
            segments, rows = dense_segment_shape(task.n, batch, w, r)
            pairs.append(segments * heads * attended_pairs(rows, causal))
        return pairs
    return [batch * heads * attended_pairs(task.n, causal)]


def sweep_sizes(min_n: int, max_n: int) -> list[int]:
    """Sequence lengths min_n, 2*min_n, 4*min_n, ... up to max_n included."""
    sizes = []
    n = min_n
    while n <= max_n:
        sizes.append(n)
        n *= 2
    return sizes


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """What one measurement returns: the median and every timed run, in milliseconds."""

    ms: float
    times_ms: list[float]
    branch_ms: list[float] | None = None  # dense_segments: the median of each branch


def choose_runs(call_ms: float, target_ms: float) -> int:
    """Number of timed runs: about `target_ms` in all, at least 5 (3 for long calls), at most 25."""
    min_runs = 3 if call_ms >= LARGE_CALL_MS else 5
    return max(min_runs, min(MAX_RUNS, round(target_ms / max(call_ms, 1e-3))))


def time_cuda(step: Callable[[int], None], n_sets: int, target_ms: float) -> list[float]:
    """Time `step(i)` with CUDA events; return the time of each timed run in milliseconds.

    step(i) does one call on input set i % n_sets (sets rotate so that small inputs are not
    served from L2). WARMUP_CALLS untimed calls come first (kernel selection, cuDNN plans,
    allocator); the last of them is timed to choose the number of runs (`choose_runs`).
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    for i in range(WARMUP_CALLS):
        start.record()
        step(i % n_sets)
        end.record()
    torch.cuda.synchronize()
    runs = choose_runs(start.elapsed_time(end), target_ms)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)
    ]
    for j, (start, end) in enumerate(events):
        start.record()
        step((WARMUP_CALLS + j) % n_sets)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def l2_bytes() -> int:
    """L2 cache size of the current CUDA device in bytes."""
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or L2_FALLBACK_BYTES


def make_input_sets(shape: tuple[int, ...], mode: str) -> list[tuple[torch.Tensor, ...]]:
    """Fresh random bf16 (q, k, v, grad) sets of `shape`; grad is None for mode "fwd".

    As many sets as needed for their total size to exceed twice the L2 cache (at most 8),
    so that rotating through them measures reads from HBM; one set once a set is that large.
    """
    backward = mode == "fwdbwd"
    set_bytes = math.prod(shape) * 2 * (4 if backward else 3)
    n_sets = min(8, max(1, math.ceil(2 * l2_bytes() / set_bytes)))

    def rand() -> torch.Tensor:
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward)

    return [(rand(), rand(), rand(), rand().detach() if backward else None) for _ in range(n_sets)]


def make_step(attend: Callable[..., torch.Tensor], sets: list[tuple], mode: str) -> Callable[[int], None]:
    """A callable step(i) running `attend(q, k, v)` on set i: forward only, or forward+backward.

    fwdbwd clears the previous gradients (no accumulation kernel) and runs
    ``out.backward(grad)`` with the set's random grad; fwd runs under no_grad.
    """

    def forward(i: int) -> None:
        q, k, v, _ = sets[i]
        with torch.no_grad():
            attend(q, k, v)

    def forward_backward(i: int) -> None:
        q, k, v, grad = sets[i]
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)

    return forward_backward if mode == "fwdbwd" else forward


def load_attention() -> types.ModuleType:
    """Import `mmlongnet.attention`, from this checkout when the package is not installed."""
    try:
        import mmlongnet.attention as attention
    except ModuleNotFoundError as exc:
        if exc.name != "mmlongnet":
            raise
        use_repository()
        import mmlongnet.attention as attention
    return attention


def graphed_step(step: Callable[[int], None], n_sets: int) -> Callable[[int], None]:
    """`step(i)` of each input set recorded as a CUDA graph; returns a step that replays set i's.

    Each set's step runs eagerly first (kernel choice, lazy initialisation), the last time with
    every attention shape promoted to its fastest kernel, as graphed training steps do before a
    recording."""
    selector = load_attention().kernels.SELECTOR
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.cuda.stream(stream):
        for i in range(n_sets):
            step(i)
            with selector.promoting():
                step(i)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step(i)
            graphs.append(graph)
    torch.cuda.current_stream().wait_stream(stream)
    return lambda i: graphs[i].replay()


def measure_dilated(
    task: Task, heads: int, batch: int, causal: bool, target_ms: float, graphed: bool = False
) -> Timing:
    """Time dilated_attention on q, k, v: (B, N, H, D) with the task's schedule and backend;
    `graphed`: its calls recorded as CUDA graphs (`graphed_step`)."""
    dilated_attention = load_attention().dilated_attention
    segment_lengths, dilation_rates = SCHEDULES[task.schedule]
    sets = make_input_sets((batch, task.n, heads, task.head_dim), task.mode)  # (B, N, H, D) each

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(
            q, k, v, segment_lengths, dilation_rates, is_causal=causal, backend=task.backend
        )

    step = make_step(attend, sets, task.mode)
    times = time_cuda(graphed_step(step, len(sets)) if graphed else step, len(sets), target_ms)
    return Timing(statistics.median(times), times)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Dense attention forced onto cuDNN: q, k, v (S, L, H, D) -> (S, L, H, D)."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)
    return out.transpose(1, 2)


def flash_attn_4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Dense attention with flash-attn 4's kernel: q, k, v (S, L, H, D) -> (S, L, H, D)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, causal=causal)
    return out[0] if isinstance(out, tuple) else out


def flash_attn_4_installed() -> bool:
    """Whether flash-attn 4's kernels import (the second dense baseline)."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: no such baseline
        return False
    return True


DENSE_ATTENTION = {"cudnn": cudnn_attention, "flash_attn_4": flash_attn_4_attention}


def measure_dense_segments(task: Task, heads: int, batch: int, causal: bool, target_ms: float) -> Timing:
    """Time the dense kernel `task.backend` doing each branch's per-segment work; sum the branches.

    Branch (W, R) is one batched call over (S, L, H, D) with S = B * ceil(N / W) and
    L = ceil(min(W, N) / R); each branch is timed on its own (a share of `target_ms`) and the
    branch medians are added.
    """
    branches = list(zip(*SCHEDULES[task.schedule], strict=True))
    branch_ms, all_times = [], []
    for w, r in branches:
        segments, rows = dense_segment_shape(task.n, batch, w, r)
        sets = make_input_sets((segments, rows, heads, task.head_dim), task.mode)  # (S, L, H, D)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return DENSE_ATTENTION[task.backend](q, k, v, causal)

        times = time_cuda(make_step(attend, sets, task.mode), len(sets), target_ms / len(branches))
        branch_ms.append(statistics.median(times))
        all_times.append(times)
        del sets
    # the i-th "run" of the sum adds the i-th run of each branch (as many as the shortest)
    summed = [sum(runs) for runs in zip(*all_times, strict=False)]
    return Timing(sum(branch_ms), summed, branch_ms)


def measure_dense_full(task: Task, heads: int, batch: int, causal: bool, target_ms: float) -> Timing:
    """Time dense cuDNN attention over all N tokens: q, k, v (B, H, N, D)."""
    sets = make_input_sets((batch, task.n, heads, task.head_dim), task.mode)  # (B, N, H, D) each

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return cudnn_attention(q, k, v, causal)

    times = time_cuda(make_step(attend, sets, task.mode), len(sets), target_ms)
    return Timing(statistics.median(times), times)


MEASURES = {
    "dilated": measure_dilated,
    "dense_segments": measure_dense_segments,
    "dense_full": measure_dense_full,
}


# --------------------------------------------------------------------------------------------
# Rows and the sweep
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of results; `status` is "ok", "oom", "error", "skipped" (time budget) or
    "planned" (--dry-run)."""

    kind: str
    schedule: str | None
    head_dim: int
    mode: str
    backend: str
    n: int
    status: str
    flops: float  # useful FLOPs of one call
    ms: float | None = None  # median
    tflops: float | None = None
    ns_per_token: float | None = None
    runs: int = 0
    times_ms: list[float] | None = None
    branch_ms: list[float] | None = None
    peak_gib: float | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Row:
        """Build a row from its JSON form, ignoring keys this version does not know."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def estimate_seconds(task: Task, pairs: list[int], target_ms: float) -> float:
    """Estimated wall time of a task at the throughput in ASSUMED_TFLOPS (for --dry-run)."""
    seconds = 0.0
    for branch_pairs in pairs:
        call_ms = useful_flops(branch_pairs, task.head_dim, task.mode) / ASSUMED_TFLOPS[task.kind] / 1e9
        calls = WARMUP_CALLS + choose_runs(call_ms, target_ms / len(pairs))
        seconds += calls * call_ms / 1e3 + 0.02  # plus input creation and launch overhead
    return seconds


class Sweep:
    """Runs tasks one by one: stops a series at its first failure, keeps to the time budget,
    prints a line per task and saves every row to `<json>.tmp` as it goes."""

    def __init__(self, args: argparse.Namespace, meta: dict, json_path: Path | None, dry_run: bool):
        """`json_path` None (or dry_run) saves nothing; the budget counts from now."""
        self.args, self.meta, self.json_path, self.dry_run = args, meta, json_path, dry_run
        self.rows: list[Row] = []
        self.stopped: set[tuple] = set()
        self.last_seconds: dict[tuple, float] = {}
        self.started = time.monotonic()
        self.estimated = 0.0

    def elapsed(self) -> float:
        """Seconds since the sweep started (estimated seconds in a dry run)."""
        return self.estimated if self.dry_run else time.monotonic() - self.started

    def run(self, task: Task) -> Row:
        """Measure one task (or estimate it in a dry run) and record its row."""
        args = self.args
        pairs = task_pairs(task, args.heads, args.batch, args.causal)
        flops = useful_flops(sum(pairs), task.head_dim, task.mode)
        row = Row(**dataclasses.asdict(task), status="ok", flops=flops)
        if task.series in self.stopped:
            return dataclasses.replace(row, status="skipped")
        if self.dry_run:
            seconds = estimate_seconds(task, pairs, args.target_ms)
            self.estimated += seconds
            row.status, row.error = "planned", f"{row.flops / 1e12:.2f} TFLOP a call, ~{seconds:.1f} s"
            return self._record(row)
        growth = 4.0 if task.kind == "dense_full" else 2.0  # dense work grows as N^2
        predicted = self.last_seconds.get(task.series, 0.0) * growth
        if self.elapsed() + predicted > args.time_budget:
            self.stopped.add(task.series)
            row.status, row.error = "skipped", f"time budget of {args.time_budget:.0f} s"
            return self._record(row)
        started = time.monotonic()
        try:
            torch.cuda.reset_peak_memory_stats()
            graphed = {"graphed": True} if task.kind == "dilated" and args.graphed else {}
            timing = MEASURES[task.kind](task, args.heads, args.batch, args.causal, args.target_ms, **graphed)
        except Exception as exc:  # noqa: BLE001 - any failure ends this series, not the sweep
            row.status = "oom" if is_oom(exc) else "error"
            row.error = error_line(exc)
            if row.status == "error":
                traceback.print_exc()
            self.stopped.add(task.series)
        else:
            row.ms, row.times_ms, row.branch_ms = timing.ms, timing.times_ms, timing.branch_ms
            row.runs = len(timing.times_ms)
            row.tflops = row.flops / row.ms / 1e9
            row.ns_per_token = row.ms * 1e6 / (args.batch * task.n)
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        free_memory(torch.device("cuda"))
        self.last_seconds[task.series] = time.monotonic() - started
        return self._record(row)

    def _record(self, row: Row) -> Row:
        """Keep a row, print its line, and rewrite the partial results file."""
        self.rows.append(row)
        print(f"[{self.elapsed():6.1f}s] {describe(row)}", flush=True)
        if not self.dry_run and self.json_path is not None:
            save_json(partial_path(self.json_path), self.meta, self.rows)
        return row


def describe(row: Row) -> str:
    """One printed line for a row: what was measured and, if it ran, how fast."""
    what = (
        f"{KIND_LABELS[row.kind]:<10} {row.schedule or '-':<5} D={row.head_dim:<3} {row.mode:<6} "
        f"{row.backend:<10} N={row.n:>8}"
    )
    if row.status != "ok":
        return f"{what}  {row.status}" + (f" ({row.error})" if row.error else "")
    return (
        f"{what}  {row.ms:10.3f} ms  {row.tflops:6.1f} TFLOP/s  {row.ns_per_token:8.2f} ns/token"
        f"  ({row.runs} runs, peak {row.peak_gib:.1f} GiB)"
    )


def run_sweep(sweep: Sweep, sizes: list[int], backends: list[str], dense_kernels: list[str]) -> None:
    """All measurements, smallest N first, so that a time-budget stop loses only the largest N.

    At each N and for each head dim and mode: the dense full attention (N <= --dense-max-n),
    then for each schedule the dilated attention with every backend, followed by its
    dense-segment baselines (one per dense kernel) when at least one backend measured that size.
    """
    args = sweep.args
    for n in sizes:
        for head_dim in args.head_dims:
            for mode in args.modes:
                if n <= args.dense_max_n:
                    sweep.run(Task("dense_full", None, head_dim, mode, "cudnn", n))
                for schedule in args.schedules:
                    statuses = [
                        sweep.run(Task("dilated", schedule, head_dim, mode, backend, n)).status
                        for backend in backends
                    ]
                    if {"ok", "planned"} & set(statuses):
                        for kernel in dense_kernels:
                            sweep.run(Task("dense_segments", schedule, head_dim, mode, kernel, n))


# --------------------------------------------------------------------------------------------
# Output: JSON, markdown, plot
# --------------------------------------------------------------------------------------------


def sort_key(row: Row) -> tuple:
    """Rows in reading order: schedules and backends as listed here, then D, mode and N."""

    def rank(value: str | None, order: Sequence[str]) -> tuple:
        return (order.index(value), "") if value in order else (len(order), str(value))

    return (
        rank(row.schedule, list(SCHEDULES)),
        row.head_dim,
        rank(row.mode, MODES),
        rank(row.backend, BACKENDS),
        row.n,
    )


def markdown_tables(rows: list[Row]) -> str:
    """Markdown tables of the results: dilated rows with their dense-segment baselines, then
    the dense full attention. ratio = TFLOP/s / dense-segment TFLOP/s of that kernel (1.0 = as
    efficient as the dense kernel on the same per-segment work)."""
    baselines = {
        (r.backend, r.schedule, r.head_dim, r.mode, r.n): r
        for r in rows
        if r.kind == "dense_segments" and r.status == "ok"
    }
    kernels = [kernel for kernel in DENSE_KERNELS if any(key[0] == kernel for key in baselines)] or ["cudnn"]
    header = "".join(f" dense {kernel} TFLOP/s | ratio {kernel} |" for kernel in kernels)
    lines = [
        f"| schedule | D | mode | backend | N | ms | TFLOP/s |{header} ns/token |",
        "|---|---|---|---|---|---|---|" + "---|---|" * len(kernels) + "---|",
    ]
    dilated = [r for r in rows if r.kind == "dilated"]
    for r in sorted(dilated, key=sort_key):
        cells = ""
        for kernel in kernels:
            base = baselines.get((kernel, r.schedule, r.head_dim, r.mode, r.n))
            base_tflops = base.tflops if base is not None else None
            ratio = r.tflops / base_tflops if r.tflops is not None and base_tflops else None
            cells += f" {cell(base_tflops, '.1f')} | {cell(ratio, '.2f')} |"
        ms = cell(r.ms, ".2f") if r.status == "ok" else r.status
        lines.append(
            f"| {r.schedule} | {r.head_dim} | {r.mode} | {r.backend} | {format_n(r.n)} | {ms} | "
            f"{cell(r.tflops, '.1f')} |{cells} {cell(r.ns_per_token, '.2f')} |"
        )
    full = [r for r in rows if r.kind == "dense_full"]
    if full:
        lines += [
            "",
            "Dense full attention (cuDNN, all N tokens):",
            "",
            "| D | mode | N | ms | TFLOP/s | ns/token |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(full, key=sort_key):
            ms = cell(r.ms, ".2f") if r.status == "ok" else r.status
            lines.append(
                f"| {r.head_dim} | {r.mode} | {format_n(r.n)} | {ms} | {cell(r.tflops, '.1f')} | "
                f"{cell(r.ns_per_token, '.2f')} |"
            )
    return "\n".join(lines)


def plot_results(meta: dict, rows: list[Row], path: Path) -> None:
    """Two panels at head dim 64 (else the smallest measured): time vs N (log-log) and useful
    TFLOP/s vs N, one line per (schedule, mode, backend), plus the dense baselines."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()

    ok = [r for r in rows if r.status == "ok"]
    dims = sorted({r.head_dim for r in ok})
    head_dim = 64 if 64 in dims else (dims[0] if dims else 64)
    ok = [r for r in ok if r.head_dim == head_dim]

    def series(kind: str) -> dict[tuple, list[Row]]:
        """Rows of one kind grouped by (schedule, mode, backend), sorted by N."""
        groups: dict[tuple, list[Row]] = {}
        for r in sorted((r for r in ok if r.kind == kind), key=sort_key):
            groups.setdefault((r.schedule, r.mode, r.backend), []).append(r)
        return groups

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ordered = sorted((r for r in ok if r.kind == "dilated"), key=sort_key)
    schedules = list(dict.fromkeys(r.schedule for r in ordered))
    backends = list(dict.fromkeys(r.backend for r in ordered))
    color = {name: colors[i % len(colors)] for i, name in enumerate(schedules)}
    marker = {name: "o^vD"[i % 4] for i, name in enumerate(backends)}
    style = {"fwd": "-", "fwdbwd": "--"}
    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(14, 6.5))
    for (schedule, mode, backend), group in series("dilated").items():
        kwargs = {"color": color[schedule], "ls": style[mode], "marker": marker[backend], "ms": 4}
        label = f"dilated {schedule} {mode} {backend}"
        ax_time.plot([r.n for r in group], [r.ms for r in group], label=label, **kwargs)
        ax_rate.plot([r.n for r in group], [r.tflops for r in group], label=label, **kwargs)
    for (schedule, mode, kernel), group in series("dense_segments").items():
        marker = "." if kernel == "cudnn" else "x"
        kwargs = {"color": color.get(schedule, "grey"), "ls": ":", "marker": marker, "alpha": 0.6}
        label = f"dense {kernel} on {schedule} segments {mode}"
        ax_rate.plot([r.n for r in group], [r.tflops for r in group], label=label, **kwargs)
    for (_, mode, _), group in series("dense_full").items():
        kwargs = {"color": "black", "ls": style[mode], "marker": "s", "ms": 4}
        label = f"dense full cuDNN {mode}"
        ax_time.plot([r.n for r in group], [r.ms for r in group], label=label, **kwargs)
        ax_rate.plot([r.n for r in group], [r.tflops for r in group], label=label, alpha=0.5, **kwargs)

    tokens = FuncFormatter(lambda x, _: format_n(int(x)) if x >= 1 else f"{x:g}")
    for ax in (ax_time, ax_rate):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(tokens)
        ax.set_xlabel("sequence length N (tokens)")
        ax.grid(True, which="major", alpha=0.3)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("time per call (ms, median)")
    ax_time.set_title("time vs N")
    ax_rate.set_ylabel("useful TFLOP/s")
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_title("throughput vs N")
    causal = ", causal" if meta.get("causal") else ""
    fig.suptitle(
        f"mmlongnet dilated attention, {meta.get('device', '?')}, bf16, "
        f"B={meta.get('batch', 1)}, H={meta.get('heads', 16)}, D={head_dim}{causal}"
    )
    handles, labels = ax_time.get_legend_handles_labels()
    for handle, label in zip(*ax_rate.get_legend_handles_labels(), strict=True):
        if label not in labels:
            handles.append(handle)
            labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace) -> dict:
    """Device, library versions, command line and date of this run."""
    return environment(torch.device("cuda")) | {
        "dtype": "bfloat16",
        "batch": args.batch,
        "heads": args.heads,
        "causal": args.causal,
        "schedules": {
            name: {"segment_lengths": w, "dilation_rates": r} for name, (w, r) in SCHEDULES.items()
        },
        "args": {key: value for key, value in vars(args).items() if key != "out"} | {"out": str(args.out)},
    }


def default_tag(args: argparse.Namespace) -> str:
    """File-name tag when --tag is not given: the GPU's name, plus backend/causal/quick."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    parts = [slug(device)]
    parts += [args.backend] if args.backend != "sdpa" else []
    parts += ["causal"] if args.causal else []
    parts += ["quick"] if args.quick else []
    return "_".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Benchmark mmlongnet dilated attention against dense cuDNN attention on a CUDA GPU."
    )
    parser.add_argument(
        "--backend",
        default="sdpa",
        choices=[*BACKENDS, "all"],
        help="dilated_attention backend; 'all' = sdpa and flash_attn where installed (default: sdpa)",
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], metavar="D")
    parser.add_argument("--schedules", nargs="+", default=["paper", "lm"], choices=sorted(SCHEDULES))
    parser.add_argument("--min-n", type=int, default=8192, help="smallest N (default: 8192)")
    parser.add_argument("--max-n", type=int, default=2**21, help="largest N tried (default: 2097152)")
    parser.add_argument("--causal", action="store_true", help="causal attention everywhere")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory")
    parser.add_argument("--tag", default=None, help="added to the file names (default: the GPU's name)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: N in {8K, 64K}, head dim 64, paper schedule"
    )
    parser.add_argument("--heads", type=int, default=16, help="H (default: 16)")
    parser.add_argument("--batch", type=int, default=1, help="B (default: 1)")
    parser.add_argument(
        "--dense-max-n",
        type=int,
        default=2**17,
        help="largest N of the dense full attention (default: 131072)",
    )
    parser.add_argument(
        "--target-ms",
        type=float,
        default=250.0,
        help="timed runs per measurement add up to about this (within 3-5 and 25 runs; default: 250)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        help="seconds; a series whose next size would end past this is skipped (default: 480)",
    )
    parser.add_argument(
        "--graphed", action="store_true", help="time the dilated op replayed from CUDA graphs (see above)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimated runtime")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw PNG and table from a JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.head_dims, args.schedules = [64], ["paper"]
    if args.min_n < 1 or args.max_n < args.min_n:
        parser.error(f"need 1 <= --min-n <= --max-n, got {args.min_n} and {args.max_n}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or --plot-only / --dry-run); return the exit status."""
    args = parse_args(argv)
    if args.plot_only is not None:
        meta, rows = load_json(args.plot_only, Row)
        png = png_path(args.plot_only)
        plot_results(meta, rows, png)
        print(markdown_tables(rows))
        print(f"\nplot: {png}")
        return 0
    if not torch.cuda.is_available() and not args.dry_run:
        print(
            "benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "--plot-only JSON redraws saved results and --dry-run prints the plan without one.",
            file=sys.stderr,
        )
        return 1
    backends = ["sdpa", "flash_attn"] if args.backend == "all" else [args.backend]
    if not args.dry_run:
        status = load_attention().backend_status("cuda")
        missing = {name: why for name, why in status.items() if name in backends and why}
        for name, why in missing.items():
            print(f"backend {name} skipped: {why}", file=sys.stderr)
        backends = [name for name in backends if name not in missing]
    dense_kernels = ["cudnn"] + (["flash_attn_4"] if args.dry_run or flash_attn_4_installed() else [])
    sizes = list(QUICK_SIZES) if args.quick else sweep_sizes(args.min_n, args.max_n)
    torch.manual_seed(0)
    meta = run_metadata(args)
    json_path = args.out / f"attention_{args.tag or default_tag(args)}.json"
    sweep = Sweep(args, meta, json_path, dry_run=args.dry_run)
    print(
        f"# {meta['device']}, torch {meta['torch']}, cuDNN {meta['cudnn']}, backends {backends}", flush=True
    )
    try:
        run_sweep(sweep, sizes, backends, dense_kernels)
    except KeyboardInterrupt:
        print("interrupted: saving what was measured", file=sys.stderr)
    if args.dry_run:
        print(f"\n{len(sweep.rows)} measurements, estimated {sweep.estimated / 60:.1f} min")
        return 0
    meta["wall_seconds"] = round(sweep.elapsed(), 1)
    finish_sweep(json_path, meta, sweep.rows, plot_results, markdown_tables(sweep.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
