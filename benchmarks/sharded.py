"""Sequence-sharded dilated attention on several GPUs: weak scaling and the longest sequence.

Launch one process per GPU:

    torchrun --nproc_per_node 2 benchmarks/sharded.py --tag h200x2
    torchrun --nproc_per_node 2 benchmarks/sharded.py --device cpu --tokens-per-rank 2048 --longest 0  # gloo

Weak scaling: every rank holds n tokens (`--tokens-per-rank`) of a sequence of N = P * n tokens
and runs `sharded_dilated_attention` forward + backward (bf16, B=1, H heads of dim D) with the
paper's schedule: segments 2K, 4K, ... up to N at rates w / 2K, so the longest branch spans all
ranks and needs communication, and the shorter ones stay on one rank; the
baseline, measured in the same run, is rank 0 alone running `dilated_attention` on n tokens (the
work of one GPU without sharding, at a P times shorter sequence). The communication share is the
device time of NCCL kernels over the step time, from one profiled step. Longest sequence: n doubles
(forward only, then forward + backward) until a rank runs out of memory.

Timing: host time between device synchronisations and barriers, median of `--steps` after 3
warm-up steps. Writes `<out>/sharded_<tag>.json` (rank 0) and prints a table.
"""

# B batch, N tokens in all, P ranks, n tokens per rank, H heads, D head dim

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    RESULTS_DIR,
    device_name,
    init_distributed,
    median_step_ms,
    synchronize,
    use_repository,
    write_json,
)

use_repository()
from mmlongnet.attention import dilated_attention  # noqa: E402
from mmlongnet.distributed import sharded_dilated_attention  # noqa: E402

KEYS_PER_SEGMENT = 2048  # w / r of every branch, as in the paper: each attends 2048 keys per segment
WARMUP = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=32768, help="n (default 32768)")
    parser.add_argument("--heads", type=int, default=12, help="H (default 12)")
    parser.add_argument("--head-dim", type=int, default=64, help="D (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--longest", type=int, default=6, help="doublings of n to try (0 = skip)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args()


def schedule(length: int) -> tuple[list[int], list[int]]:
    """The paper's geometric schedule for a sequence of `length` tokens (a power of 2 >= 2048):
    segments 2048, 4096, ... up to `length`, each at rate w / 2048, so the last branch spans the
    whole sequence (all ranks) and every branch attends 2048 keys per segment and head."""
    segments = [KEYS_PER_SEGMENT]
    while segments[-1] < length:
        segments.append(segments[-1] * 2)
    return segments, [w // KEYS_PER_SEGMENT for w in segments]


def qkv(n: int, args, device, dtype) -> list[torch.Tensor]:
    """q, k, v (1, n, H, D) needing grad."""
    return [
        torch.randn(1, n, args.heads, args.head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    ]


def time_steps(step, steps: int, device, group=None) -> float:
    """Median milliseconds of `step()` over `steps` runs after the warm-up, all ranks in step
    (rank 0 alone with group=False)."""
    return median_step_ms(step, steps, device, warmup=WARMUP, barrier=group is not False)


def comm_share(step, device) -> float | None:
    """Share of one step's wall time spent in NCCL kernels (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    wall_us = (time.perf_counter() - started) * 1e6
    nccl_us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return nccl_us / wall_us


def oom_anywhere(failed: bool, device) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item())


def weak_scaling(args, device, dtype, rank: int, world: int) -> dict:
    """The sharded op at n tokens per rank against rank 0 alone at n tokens (same run)."""
    n = args.tokens_per_rank
    segments, rates = schedule(world * n)
    torch.manual_seed(rank)
    q, k, v = qkv(n, args, device, dtype)
    grad = torch.randn_like(q)

    def sharded_step():
        sharded_dilated_attention(q, k, v, segments, rates, validate=False).backward(grad)

    sharded_ms = time_steps(sharded_step, args.steps, device)
    share = comm_share(sharded_step, device)
    baseline_ms = None
    if rank == 0:
        local_segments, local_rates = schedule(n)

        def single_step():
            dilated_attention(q, k, v, local_segments, local_rates).backward(grad)

        baseline_ms = time_steps(single_step, args.steps, device, group=False)
    dist.barrier()
    return {
        "kind": "weak scaling", "P": world, "tokens_per_rank": n, "N": world * n, "segments": segments,
        "rates": rates, "sharded_ms": sharded_ms, "single_gpu_ms_at_n": baseline_ms,
        "efficiency": None if baseline_ms is None else baseline_ms / sharded_ms, "comm_share": share,
    }  # fmt: skip


def try_once(size: int, args, device, dtype, world: int, forward_only: bool) -> bool:
    """Run the op once at `size` tokens per rank; False when this rank ran out of memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        tensors = qkv(size, args, device, dtype)
        segments, rates = schedule(world * size)
        with torch.set_grad_enabled(not forward_only):
            out = sharded_dilated_attention(*tensors, segments, rates, validate=False)
            if not forward_only:
                out.backward(torch.ones_like(out))
        synchronize(device)
    except torch.OutOfMemoryError:
        return False
    return True


def longest(args, device, dtype, world: int, forward_only: bool) -> dict | None:
    """The most tokens per rank, doubling from n, that every rank ran (None: not even 2n)."""
    best, size = None, args.tokens_per_rank
    for _ in range(args.longest):
        size *= 2
        if oom_anywhere(not try_once(size, args, device, dtype, world, forward_only), device):
            break
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        best = {"tokens_per_rank": size, "N": world * size, "peak_gib_rank0": peak}
    return best


def main() -> int:
    args = parse_args()
    device, rank, world = init_distributed(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [weak_scaling(args, device, dtype, rank, world)]
    for forward_only in (True, False):
        kind = "longest, forward" if forward_only else "longest, forward+backward"
        rows.append({"kind": kind, "P": world, "result": longest(args, device, dtype, world, forward_only)})
    if rank == 0:
        meta = {
            "device": device_name(device),
            "world_size": world, "torch": torch.__version__, "dtype": str(dtype), "heads": args.heads,
            "head_dim": args.head_dim, "command": " ".join(sys.argv), "steps": args.steps,
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        }  # fmt: skip
        path = args.out / f"sharded_{args.tag}.json"
        write_json(path, {"meta": meta, "rows": rows})
        for row in rows:
            print(json.dumps(row))
        print(f"results: {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
