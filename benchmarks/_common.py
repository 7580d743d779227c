"""Helpers the benchmark scripts share: run metadata, JSON and PNG output, table cells, timing.

benchmarks/ is not a package: a script puts its own folder on `sys.path` and imports this file as
`_common` (`python benchmarks/X.py` from the repository root, or the tests' loader by path).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"  # where the scripts write by default (--out)


def load_script(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module `benchmark_<name>`, imported once (reused if loaded)."""
    module_name = f"benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while building the classes
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def use_repository() -> None:
    """Put the repository root first on `sys.path`, so that `import mmlongnet` finds this checkout."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------
# Run metadata
# --------------------------------------------------------------------------------------------


def add_op_arguments(parser: argparse.ArgumentParser, sizes: Sequence[int]) -> None:
    """The options of one dilated-attention op call: --sizes (N), --segments, --rates (the paper's
    schedule by default), --causal, --heads, --head-dim, --batch."""
    parser.add_argument("--sizes", type=int, nargs="+", default=list(sizes))
    parser.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="default: the paper's")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)


def command_line() -> str:
    """The command that started this process, shell-quoted ("python benchmarks/x.py --quick")."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device where there is one, "cpu" for the CPU, else "none"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "none"
    return "cpu" if device.type == "cpu" else "none"


def slug(name: str) -> str:
    """A file-name tag of a device name: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def environment(device: torch.device) -> dict:
    """Device, library versions, command line, date and allocator settings of this run."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {
        "device": device_name(device),
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "command": command_line(),
        "date": utc_now(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


# --------------------------------------------------------------------------------------------
# Devices, memory and errors
# --------------------------------------------------------------------------------------------


COMPILED_RUNS = 3  # runs of a compiled shape before its CUDA graphs replay: compile, warm-up, record


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixed_precision(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on the CPU."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def free_memory(device: torch.device, *, reset_peak: bool = False) -> None:
    """Collect the last measurement's objects and return cached blocks to the device; `reset_peak`
    also starts a new peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException) -> bool:
    """True for device out-of-memory errors, including those a kernel library reports as text."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_line(exc: BaseException) -> str:
    """The exception's type and first line, short enough for a table cell."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


# --------------------------------------------------------------------------------------------
# Timing of collective steps (torchrun scripts)
# --------------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[torch.device, int, int]:
    """Join the torchrun job: NCCL on this process's GPU (LOCAL_RANK) for "cuda", else gloo.

    Returns (device, rank, world size).
    """
    import torch.distributed as dist

    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return where, dist.get_rank(), dist.get_world_size()


def time_ms(step: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> float:
    """Median milliseconds of `step()` over `runs` calls after `warmup` untimed ones (synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def median_step_ms(
    step: Callable[[], Any], steps: int, device: torch.device, *, warmup: int, barrier: bool = True
) -> float:
    """Median milliseconds of `step()` over `steps` runs after `warmup` untimed ones; with `barrier`
    all ranks start every run together."""
    import torch.distributed as dist

    times = []
    for i in range(warmup + steps):
        if barrier:
            dist.barrier()
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Output: JSON, tables, plots
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: object) -> None:
    """Write `data` as JSON to `path` through a temporary file, atomically (a reader never sees half
    a file, a killed run leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


def save_json(path: Path, meta: dict, rows: Sequence[Any]) -> None:
    """Write the run's metadata and rows (dataclasses) to `path`, atomically."""
    write_json(path, {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]})


def load_json(path: Path, row_type: type) -> tuple[dict, list]:
    """Read the metadata and rows saved by `save_json`, as `row_type.from_dict` rows."""
    data = json.loads(path.read_text())
    return data["meta"], [row_type.from_dict(row) for row in data["rows"]]


def partial_path(json_path: Path) -> Path:
    """Where a sweep keeps its rows while it runs: x.json -> x.json.tmp."""
    return json_path.with_name(json_path.name + ".tmp")


def png_path(json_path: Path) -> Path:
    """The PNG beside a results JSON: x.json (or x.json.tmp) -> x.png."""
    name = json_path.name.removesuffix(".tmp").removesuffix(".json")
    return json_path.with_name(name + ".png")


def cell(value: float | None, fmt: str) -> str:
    """A table cell: the formatted value, or "-" when missing."""
    return "-" if value is None else format(value, fmt)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table of the column names and the rows' cells (each cell as `str` gives it)."""
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    return "\n".join(lines)


def format_n(n: int) -> str:
    """8192 -> "8K", 1048576 -> "1M"; other values unchanged."""
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n % 2**10 == 0:
        return f"{n // 2**10}K"
    return str(n)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a figure to `path` (creating its folder) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def finish_sweep(
    json_path: Path,
    meta: dict,
    rows: Sequence[Any],
    plot: Callable[[dict, Sequence[Any], Path], None],
    table: str,
) -> None:
    """The end of a measured sweep: the results JSON (the partial one removed), the PNG beside it,
    then the markdown table and where both files are."""
    save_json(json_path, meta, rows)
    partial_path(json_path).unlink(missing_ok=True)
    plot(meta, rows, png_path(json_path))
    print("\n" + table)
    print(f"\nresults: {json_path}\nplot: {png_path(json_path)}")


# Substrings of GPU kernel names, by kind, tried in this order (a kernel is of the first kind one
# of whose substrings its lower-cased name contains; "other": elementwise, norms, copies, merges).
# Attention: cuDNN's, PyTorch's flash and memory-efficient kernels, flash-attn's (CuTe DSL kernels
# are named after their classes: FlashAttentionForward...). Matmul: cuBLAS / cuBLASLt (sm90_xmma,
# nvjet) and CUTLASS GEMMs. Optimizer: the fused and foreach AdamW kernels.
KERNEL_KINDS = {
    "attention": ("sdpa", "fmha", "flash", "attention", "attn"),
    "matmul": ("gemm", "xmma", "nvjet", "cutlass", "cublas"),
    "optimizer": ("adam", "multi_tensor"),
}


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel from its name: a key of `KERNEL_KINDS`, or "other"."""
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS.items() if any(p in lowered for p in parts)), "other")


def kernel_times(step: Callable[[], object], runs: int) -> dict:
    """GPU kernel time per call of `step()` from `torch.profiler` over `runs` calls (CUDA): the
    total milliseconds, the milliseconds of each kernel kind (`kernel_kind`, as "<kind>_kernel_ms"),
    kernels per call, and the ten largest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            step()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            by_name.setdefault(event.name, []).append(event.device_time / 1e3)  # ms
    per_call = {name: (sum(times) / runs, len(times) / runs) for name, times in by_name.items()}
    by_kind = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for name, (ms, _) in per_call.items():
        by_kind[kernel_kind(name)] += ms
    largest = sorted(per_call.items(), key=lambda item: -item[1][0])[:10]
    return {
        "kernel_ms": round(sum(ms for ms, _ in per_call.values()), 3),
        **{f"{kind}_kernel_ms": round(ms, 3) for kind, ms in by_kind.items()},
        "kernels": round(sum(count for _, count in per_call.values()), 1),
        "largest": [{"name": n[:160], "ms": round(ms, 4), "count": c} for n, (ms, c) in largest],
    }
