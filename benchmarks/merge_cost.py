"""What the dilated-attention op's merge passes cost, and the most any merge scheme could gain.

The op's forward merges its branch calls' outputs by their log-sum-exps (`merge.merge_weighted`,
one pass per call) and its backward adds the branch calls' gradients (`merge.add_parts`, one pass
per call, for the calls after the covering ones). This script times the op's forward + backward
replayed from CUDA graphs (as `attention.py --graphed` does) three ways, in alternating rounds:
- `op`: as it is;
- `no_bwd_merges`: the backward's gradient additions skipped;
- `no_merges`: the forward's output merges skipped too.
Skipped merges leave the outputs WRONG: the last two are timing bounds only, what the op would take
if its merges cost nothing (with every attention kernel call unchanged). Beside them, the dense
per-segment baselines of `attention.py` (cuDNN and flash-attn 4's kernel doing each branch's
per-segment work, one call per branch), in the same run. The LM schedule runs causal, the paper
schedule not, as in the attention benchmark's tables.

    python benchmarks/merge_cost.py --schedules lm paper --head-dims 64 128 \
        --sizes 65536 131072 262144 --tag h200

Writes benchmarks/results/merge_cost_<tag>.json and prints a markdown table (times: the mean of the
rounds' medians; ratios: dense time / op time, the attention benchmark's throughput ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    cell,
    environment,
    format_n,
    free_memory,
    load_script,
    markdown_table,
    slug,
    use_repository,
    write_json,
)

VARIANTS = ("op", "no_bwd_merges", "no_merges")
CAUSAL = {"lm": True, "paper": False}  # as in the attention benchmark's tables


@contextlib.contextmanager
def skipped_merges(variant: str) -> Iterator[None]:
    """Within: the op's merges that `variant` skips do nothing (see the module docstring); the
    functions are restored on exit."""
    use_repository()
    from mmlongnet.attention import dilated

    saved = dilated.add_parts, dilated.merge_weighted
    if variant in ("no_bwd_merges", "no_merges"):
        dilated.add_parts = lambda outs, parts, *, first=False: None
    if variant == "no_merges":
        dilated.merge_weighted = lambda out, out_part, lse_part, lse, *, first=False: out
    try:
        yield
    finally:
        dilated.add_parts, dilated.merge_weighted = saved


def measure(args: argparse.Namespace, schedule: str, head_dim: int, n: int) -> dict:
    """One schedule, head dim and size: the dense baselines, then each variant once per round."""
    attention = load_script("attention")
    causal = CAUSAL[schedule]
    row = {"schedule": schedule, "causal": causal, "head_dim": head_dim, "n": n}
    kernels = ["cudnn"] + (["flash_attn_4"] if attention.flash_attn_4_installed() else [])
    for kernel in kernels:
        task = attention.Task("dense_segments", schedule, head_dim, "fwdbwd", kernel, n)
        row[f"dense_{kernel}_ms"] = attention.measure_dense_segments(
            task, args.heads, 1, causal, args.target_ms
        ).ms
        free_memory(torch.device("cuda"))
    task = attention.Task("dilated", schedule, head_dim, "fwdbwd", args.backend, n)
    for _ in range(args.rounds):
        for variant in VARIANTS:
            with skipped_merges(variant):
                timing = attention.measure_dilated(task, args.heads, 1, causal, args.target_ms, graphed=True)
            row.setdefault(f"{variant}_ms", []).append(timing.ms)
            free_memory(torch.device("cuda"))
    return row


def table(rows: Sequence[dict]) -> str:
    """Markdown: per row the variants' mean times and their ratios to the dense baselines."""
    header = ["schedule, D", "N", "op ms", "no bwd merges ms", "no merges ms", "dense cuDNN ms",
              "dense flash-attn 4 ms", "op / no merges", "x cuDNN: op, no merges",
              "x flash-attn 4: op, no merges"]  # fmt: skip
    lines = []
    for row in rows:
        ms = {variant: statistics.mean(row[f"{variant}_ms"]) for variant in VARIANTS}
        cudnn, fa4 = row["dense_cudnn_ms"], row.get("dense_flash_attn_4_ms")
        lines.append([
            f"{row['schedule']}{', causal' if row['causal'] else ''}, {row['head_dim']}", format_n(row["n"]),
            f"{ms['op']:.2f}", f"{ms['no_bwd_merges']:.2f}", f"{ms['no_merges']:.2f}", f"{cudnn:.2f}",
            cell(fa4, ".2f"), f"{ms['op'] / ms['no_merges']:.3f}",
            f"{cudnn / ms['op']:.3f}, {cudnn / ms['no_merges']:.3f}",
            "-" if fa4 is None else f"{fa4 / ms['op']:.3f}, {fa4 / ms['no_merges']:.3f}",
        ])  # fmt: skip
    return markdown_table(header, lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description="The dilated op's merge cost and the bound without merges.")
    parser.add_argument("--schedules", nargs="+", default=["lm", "paper"], choices=sorted(CAUSAL))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], metavar="D")
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 131072], metavar="N")
    parser.add_argument("--heads", type=int, default=16, help="H (default: 16)")
    parser.add_argument("--backend", default="flash_attn", choices=["sdpa", "flash_attn"])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    parser.add_argument("--target-ms", type=float, default=300.0, help="timed runs per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory")
    parser.add_argument("--tag", default=None, help="added to the file name (default: the GPU's name)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurements; return the exit status."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/merge_cost.py needs a CUDA GPU (it replays the op from CUDA graphs)",
            file=sys.stderr,
        )
        return 1
    use_repository()
    from mmlongnet.attention import backend_status
    from mmlongnet.attention.flash import flash_install

    why = backend_status("cuda")[args.backend]
    if why:
        print(f"backend {args.backend} does not run here: {why}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    path = args.out / f"merge_cost_{args.tag or slug(torch.cuda.get_device_name())}.json"
    meta = {**environment(torch.device("cuda")), "args": vars(args) | {"out": str(args.out)}}
    if args.backend == "flash_attn":
        install = flash_install(torch.device("cuda"))
        meta["flash_attn"] = f"{install.package} {install.version}"
    rows = []
    for schedule in args.schedules:
        for head_dim in args.head_dims:
            for n in args.sizes:
                rows.append(measure(args, schedule, head_dim, n))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                write_json(path, {"meta": meta, "rows": rows})
    print(table(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
