"""A/B of the dilated-attention op's call layouts, in one run: forward + backward time, peak memory.

A layout switch is a module constant of `mmlongnet.attention.dilated` (or `.merge`):
- `diagonal` (DIAGONAL_CALLS): a high-rate branch's offsets in the kernel's head dimension, against
  one call per offset;
- `in_place` (WRITE_IN_PLACE): the covering calls' kernels write into the op's output and
  gradients, against new tensors copied there.
- `fused_merge` (merge.FUSED_MERGE): the merges into the output and the gradients as one Triton
  kernel per call on CUDA at every size (merge.FUSED_MIN_ELEMENTS = 0 for the run), against
  PyTorch's elementwise passes (rounding may differ by one unit in the last place);
- `dense` (DENSE_SMALL_INPUTS): a small input as one dense kernel call with the schedule's bias,
  against the branch calls (this one changes the arithmetic's order: a difference of rounding).
At every size the two settings alternate `--rounds` times (each: `--warmup` untimed calls, then the
median of `--runs` timed ones), so that the machine's drift falls on both alike; the outputs of the
two settings are compared too (`diagonal` and `in_place` change no arithmetic: the difference
should be 0).

    python benchmarks/call_layouts.py --switch diagonal --causal --rates 1 2 4 6 12 --tag h200_lm
    python benchmarks/call_layouts.py --device cpu --sizes 64 --segments 16 32 --rates 1 4 --heads 4 \
        --head-dim 8

Writes benchmarks/results/call_layouts_<switch>_<tag>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    add_op_arguments,
    environment,
    free_memory,
    slug,
    time_ms,
    use_repository,
    write_json,
)

SWITCHES = {  # switch -> (module of mmlongnet.attention, constant, other constants set for the run)
    "diagonal": ("dilated", "DIAGONAL_CALLS", {}),
    "in_place": ("dilated", "WRITE_IN_PLACE", {}),
    "dense": ("dilated", "DENSE_SMALL_INPUTS", {}),
    "fused_merge": ("merge", "FUSED_MERGE", {"FUSED_MIN_ELEMENTS": 0}),
}


def measure(args: argparse.Namespace, n: int, device: torch.device) -> dict:
    """One size: the switch on and off, alternating; times (ms) per round, peak GiB, output difference."""
    use_repository()
    from mmlongnet import attention
    from mmlongnet.attention import dilated_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (args.batch, n, args.heads, args.head_dim)  # (B, N, H, D)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    module_name, name, settings = SWITCHES[args.switch]
    module = getattr(attention, module_name)
    saved = {key: getattr(module, key) for key in (name, *settings)}
    for key, value in settings.items():
        setattr(module, key, value)

    def attend() -> torch.Tensor:
        return dilated_attention(
            q, k, v, args.segments, args.rates, is_causal=args.causal, backend=args.backend
        )

    def step() -> None:
        q.grad = k.grad = v.grad = None
        attend().backward(grad)

    row = {"n": n, "on_ms": [], "off_ms": [], "on_peak_gib": None, "off_peak_gib": None}
    try:
        for _ in range(args.rounds):
            for setting in ("on", "off"):
                setattr(module, name, setting == "on")
                free_memory(device, reset_peak=True)
                row[f"{setting}_ms"].append(round(time_ms(step, device, args.warmup, args.runs), 3))
                if device.type == "cuda":
                    row[f"{setting}_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        outputs = []
        for setting in (True, False):
            setattr(module, name, setting)
            with torch.no_grad():
                outputs.append(attend().float())
        row["max_abs_difference"] = (outputs[0] - outputs[1]).abs().max().item()
    finally:
        for key, value in saved.items():
            setattr(module, key, value)
    row["on_over_off"] = round(statistics.median(row["on_ms"]) / statistics.median(row["off_ms"]), 3)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| N | on: ms per round | off: ms per round | on / off | peak GiB on / off | max difference |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        peaks = f"{r['on_peak_gib']} / {r['off_peak_gib']}" if r["on_peak_gib"] is not None else "-"
        lines.append(
            f"| {r['n']:,} | {', '.join(map(str, r['on_ms']))} | {', '.join(map(str, r['off_ms']))} | "
            f"{r['on_over_off']} | {peaks} | {r['max_abs_difference']:.3g} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A/B of the dilated-attention op's call layouts.")
    parser.add_argument("--switch", choices=sorted(SWITCHES), default="diagonal")
    add_op_arguments(parser, sizes=[8192, 32768, 65536, 131072, 262144])
    parser.add_argument("--backend", default="auto", help="dilated_attention backend (default: auto)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings (default: 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per round (default: 10)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default=None, help="added to the file name (default: the device's name)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: use --device cpu for a small run", file=sys.stderr)
        return 1
    meta = {
        **environment(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    rows = []
    for n in args.sizes:
        rows.append(measure(args, n, device))
        print(rows[-1], flush=True)
    path = args.out / f"call_layouts_{args.switch}_{args.tag or slug(meta['device'])}.json"
    write_json(path, {"meta": meta, "rows": rows})
    print(f"\n{table(rows)}\n\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
