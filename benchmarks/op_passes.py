"""The dilated-attention op's passes, counted on the CPU: operations and elements written.

What the op's forward and backward cost besides their attention kernels is passes over memory
(gathers, placements, merges, accumulations) and the launches of those passes. This script counts
both without a GPU: it runs the op's raw forward and backward (the "sdpa" backend's calls, the
layout the op would choose on a GPU for the same shapes) under a `TorchDispatchMode` and counts,
per direction, the operations that are not views, and the elements of the tensors they return, in
units of the input's size B * N * H * D. Views and empty allocations are left out. The attention
kernels write 2.0 (output and log-sum-exp: 1.0 + a little) per direction's call set, so what is
above ~2-3 is merge and copy work. Counts do not depend on the machine; times do (see
`attention.py` and `call_layouts.py` for those).

    python benchmarks/op_passes.py --sizes 8192 32768 --heads 12 --rates 1 2 4 6 12 --causal

Prints a markdown table; `--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_op_arguments, use_repository  # noqa: E402

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
    return {
        "n": n,
        "forward_ops": forward.operations,
        "forward_writes": round(forward.elements / size, 2),
        "backward_ops": backward.operations,
        "backward_writes": round(backward.elements / size, 2),
    }


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| N | forward: operations | forward: elements written / input | backward: operations "
        "| backward: elements written / input |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['forward_ops']} | {r['forward_writes']} | {r['backward_ops']} | "
            f"{r['backward_writes']} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_op_arguments(parser, sizes=[8192])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if len(args.segments) != len(args.rates):
        parser.error(f"--segments and --rates need as many values, got {args.segments} and {args.rates}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [count(args, n) for n in args.sizes]
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": {**vars(args), "json": str(args.json)}, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
