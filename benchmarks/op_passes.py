"""The dilated-attention op's passes: operations and elements written (CPU), GPU time by kernel (CUDA).

What the op's forward and backward cost besides their attention kernels is passes over memory
(gathers, placements, merges, accumulations) and the launches of those passes. This script counts
both without a GPU: it runs the op's raw forward and backward (the "sdpa" backend's calls, the
layout the op would choose on a GPU for the same shapes) under a `TorchDispatchMode` and counts,
per direction, the operations that are not views, and the elements of the tensors they return, in
units of the input's size B * N * H * D. Views and empty allocations are left out. The attention
kernels write 2.0 (output and log-sum-exp: 1.0 + a little) per direction's call set, so what is
above ~2-3 is merge and copy work. Counts do not depend on the machine; times do (see
`attention.py` and `call_layouts.py` for those). It also times the same forward + backward on
the CPU (median of 5 rounds of `--runs` calls): at small sizes and head dims (e.g. `--sizes 256
--segments 16 32 64 128 256 --head-dim 8`, the same calls as the LM schedule at 8K) mostly the
op's host work, which the eager op pays on a GPU too.

    python benchmarks/op_passes.py --sizes 8192 32768 --heads 12 --rates 1 2 4 6 12 --causal

With `--profile` (a CUDA GPU) it measures instead where the GPU time of the op's forward + backward
goes: bf16, the median of `--runs` eager calls and of as many replays of the same call recorded in
a CUDA graph (no launch overhead), dense cuDNN causal-or-not attention over the whole sequence as
the baseline, and from `torch.profiler` the kernel time per call in the attention kernels and in
everything else (merges, placements, copies), with the largest kernels by name, of the eager
calls and (the JSON's "graphed") of the replays:

    python benchmarks/op_passes.py --profile --sizes 8192 65536 --heads 12 --rates 1 2 4 6 12 \
        --causal --backend flash_attn --json benchmarks/results/op_profile_h200.json

Prints a markdown table; `--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_op_arguments, environment, kernel_times, markdown_table, use_repository  # noqa: E402

VIEWS = {
    "alias", "as_strided", "detach", "diagonal", "empty", "empty_strided", "expand", "narrow", "permute",
    "reshape", "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind",
    "unflatten", "unsqueeze", "view", "_reshape_alias", "_unsafe_view",
}  # fmt: skip


class PassCounter(TorchDispatchMode):
    """Counts the operations that are not views and the elements they return."""

    def __init__(self) -> None:
        super().__init__()
        self.operations = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in VIEWS:
            return out
        self.operations += 1
        for result in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(result, torch.Tensor):
                self.elements += result.numel()
        return out


def count(args: argparse.Namespace, n: int) -> dict:
    """One size: {"n", "forward_ops", "forward_writes", "backward_ops", "backward_writes"}, the
    writes in units of B * N * H * D."""
    use_repository()
    from mmlongnet.attention import dilated

    torch.manual_seed(0)
    shape = (args.batch, n, args.heads, args.head_dim)  # (B, N, H, D)
    q, k, v, grad = (torch.randn(shape, dtype=torch.bfloat16) for _ in range(4))
    segments = [min(w, n) for w in args.segments]
    options = (segments, args.rates, args.causal, 1.0 / math.sqrt(args.head_dim), "sdpa")
    forward, backward = PassCounter(), PassCounter()
    with forward:
        out, lse = dilated.dilated_attention_forward_op._init_fn(q, k, v, None, *options)
    with backward:
        dilated.dilated_attention_backward_op._init_fn(grad, q, k, v, out, lse, None, *options)
    size = q.numel()

    def both() -> None:
        out, lse = dilated.dilated_attention_forward_op._init_fn(q, k, v, None, *options)
        dilated.dilated_attention_backward_op._init_fn(grad, q, k, v, out, lse, None, *options)

    for _ in range(3):
        both()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(args.runs):
            both()
        rounds.append((time.perf_counter() - started) * 1e3 / args.runs)
    return {
        "n": n,
        "forward_ops": forward.operations,
        "forward_writes": round(forward.elements / size, 2),
        "backward_ops": backward.operations,
        "backward_writes": round(backward.elements / size, 2),
        "cpu_ms": round(statistics.median(rounds), 3),
    }


def _median_ms(step, runs: int) -> float:
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 3)


def _graphed(step):
    """`step` recorded as one CUDA graph after warm-up calls on a side stream; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def profile_gpu(args: argparse.Namespace, n: int) -> dict:
    """One size on the GPU: eager and graphed ms of the op's forward + backward, the dense baseline,
    and the op's kernel time by kind (`kernel_times`)."""
    use_repository()
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmlongnet.attention import dilated_attention

    torch.manual_seed(0)
    shape = (args.batch, n, args.heads, args.head_dim)  # (B, N, H, D)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    segments = [min(w, n) for w in args.segments]

    def dilated() -> None:
        out = dilated_attention(q, k, v, segments, args.rates, is_causal=args.causal, backend=args.backend)
        q.grad, k.grad, v.grad = torch.autograd.grad(out, (q, k, v), grad)

    def dense() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            heads_first = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
            out = F.scaled_dot_product_attention(*heads_first, is_causal=args.causal)
        torch.autograd.grad(out, (q, k, v), grad.transpose(1, 2))

    row: dict = {"n": n}
    replays = {}
    for name, step in (("dilated", dilated), ("dense", dense)):
        for _ in range(args.warmup):
            step()
        row[f"{name}_eager_ms"] = _median_ms(step, args.runs)
        replays[name] = _graphed(step)
        row[f"{name}_graphed_ms"] = _median_ms(replays[name], args.runs)
    row.update(kernel_times(dilated, args.runs))
    row["graphed"] = kernel_times(replays["dilated"], args.runs)  # the merges may differ (see merge.py)
    row["graphed_over_dense"] = round(row["dilated_graphed_ms"] / row["dense_graphed_ms"], 3)
    return row


def profile_table(rows: Sequence[dict]) -> str:
    header = ["N", "eager ms", "graphed ms", "dense cuDNN graphed ms", "graphed / dense",
              "kernel ms eager / graphed", "attention kernels ms", "other kernels ms", "kernels"]  # fmt: skip
    cells = []
    for r in rows:
        eager, graphed = r, r["graphed"]
        other = [f"{t['kernel_ms'] - t['attention_kernel_ms']:.3f}" for t in (eager, graphed)]
        cells.append([
            f"{r['n']:,}", r["dilated_eager_ms"], r["dilated_graphed_ms"], r["dense_graphed_ms"],
            r["graphed_over_dense"], f"{eager['kernel_ms']} / {graphed['kernel_ms']}",
            f"{eager['attention_kernel_ms']} / {graphed['attention_kernel_ms']}", " / ".join(other),
            f"{eager['kernels']:g} / {graphed['kernels']:g}",
        ])  # fmt: skip
    return markdown_table(header, cells)


def table(rows: Sequence[dict]) -> str:
    header = ["N", "forward: operations", "forward: elements written / input", "backward: operations",
              "backward: elements written / input", "CPU ms, forward + backward"]  # fmt: skip
    keys = ["forward_ops", "forward_writes", "backward_ops", "backward_writes", "cpu_ms"]
    cells = [[f"{r['n']:,}", *(r[key] for key in keys)] for r in rows]
    return markdown_table(header, cells)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_op_arguments(parser, sizes=[8192])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--profile", action="store_true", help="time the op on a CUDA GPU (see above)")
    parser.add_argument("--backend", default="auto", help="with --profile: the op's backend (default: auto)")
    parser.add_argument("--warmup", type=int, default=5, help="with --profile: untimed calls (default: 5)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls (a round of them) (default: 20)")
    args = parser.parse_args(argv)
    if len(args.segments) != len(args.rates):
        parser.error(f"--segments and --rates need as many values, got {args.segments} and {args.rates}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile and not torch.cuda.is_available():
        print("--profile needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = []
    for n in args.sizes:
        rows.append(profile_gpu(args, n) if args.profile else count(args, n))
        if args.profile:
            print(rows[-1], flush=True)
    print((profile_table if args.profile else table)(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = environment(torch.device("cuda" if args.profile else "cpu"))
        args.json.write_text(
            json.dumps({"meta": meta, "args": {**vars(args), "json": str(args.json)}, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
