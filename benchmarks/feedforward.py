"""A/B of FeedForward's activation + sub-LayerNorm kernels against its modules, in one run.

`FeedForward` runs GELU (or ReLU, SiLU) and its MAGNETO sub-LayerNorm as one Triton kernel each
way on a GPU (`mmlongnet.layers.activation_layer_norm`), or as the modules
(`mmlongnet.layers.feedforward.FUSED_ACTIVATION_NORM = False`). Per token count and mode (`eager`;
`compiled`: `torch.compile(fullgraph=True)` with the training modules' `COMPILE_OPTIONS`, without
CUDA graphs) the two settings alternate `--rounds` times (each: `--warmup` untimed forward +
backward passes of a (1, N, E) input, then the median of `--runs` timed ones), so that the
machine's drift falls on both alike; bf16 autocast with float32 weights on CUDA, float32 on the
CPU (where both settings run the modules). On CUDA it also reports the GPU kernel time per pass
(`torch.profiler`: what a CUDA-graph replay of the pass takes) and compares the two settings'
outputs and gradients (largest difference relative to the largest entry).

    python benchmarks/feedforward.py --tokens 8192 32768 --embed-dim 768 --hidden-dim 3072 --tag h200
    python benchmarks/feedforward.py --device cpu --tokens 64 --embed-dim 16 --hidden-dim 48

Writes benchmarks/results/feedforward_<tag>.json and prints a markdown table.
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
    environment,
    kernel_times,
    markdown_table,
    mixed_precision,
    slug,
    time_ms,
    use_repository,
    write_json,
)

MODES = ("eager", "compiled")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def measure(args: argparse.Namespace, n: int, mode: str, device: torch.device) -> dict:
    """One token count and mode: the kernels ("on") and the modules ("off"), alternating."""
    use_repository()
    from mmlongnet.layers import FeedForward, feedforward
    from mmlongnet.training import COMPILE_OPTIONS

    torch.manual_seed(0)
    ffn = FeedForward(args.embed_dim, args.hidden_dim, args.activation, device=device)
    x = torch.randn(1, n, args.embed_dim, device=device, requires_grad=True)  # (1, N, E)
    grad = torch.randn(1, n, args.embed_dim, device=device)
    # the switch is read while tracing: the compiled module keeps one graph per setting
    model = ffn if mode == "eager" else torch.compile(ffn, fullgraph=True, options=COMPILE_OPTIONS)
    params = [x, *ffn.parameters()]

    def step() -> list[torch.Tensor]:
        with mixed_precision(device):
            out = model(x)  # (1, N, E)
        return [out.detach(), *torch.autograd.grad(out, params, grad)]

    row = {"n": n, "mode": mode, "on_ms": [], "off_ms": [], "on_kernel_ms": None, "off_kernel_ms": None}
    saved = feedforward.FUSED_ACTIVATION_NORM
    try:
        for _ in range(args.rounds):
            for setting in ("on", "off"):
                feedforward.FUSED_ACTIVATION_NORM = setting == "on"
                row[f"{setting}_ms"].append(round(time_ms(step, device, args.warmup, args.runs), 3))
        results = {}
        for setting in ("on", "off"):
            feedforward.FUSED_ACTIVATION_NORM = setting == "on"
            results[setting] = step()
            if device.type == "cuda":
                row[f"{setting}_kernel_ms"] = kernel_times(step, args.runs)["kernel_ms"]
    finally:
        feedforward.FUSED_ACTIVATION_NORM = saved
    names = ["out", "dx", *(name for name, _ in ffn.named_parameters())]
    row["relative_difference"] = {
        name: relative_difference(a, b)
        for name, a, b in zip(names, results["on"], results["off"], strict=True)
    }
    row["on_over_off"] = round(statistics.median(row["on_ms"]) / statistics.median(row["off_ms"]), 3)
    return row


def table(rows: list[dict]) -> str:
    header = ["N", "mode", "kernels: ms per round", "modules: ms per round", "kernels / modules",
              "GPU kernel ms, kernels / modules", "largest relative difference"]  # fmt: skip
    body = []
    for r in rows:
        kernel_ms = f"{r['on_kernel_ms']} / {r['off_kernel_ms']}" if r["on_kernel_ms"] is not None else "-"
        difference = max(r["relative_difference"].values())
        rounds = [", ".join(map(str, r[f"{setting}_ms"])) for setting in ("on", "off")]
        body.append([f"{r['n']:,}", r["mode"], *rounds, r["on_over_off"], kernel_ms, f"{difference:.2g}"])
    return markdown_table(header, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A/B of FeedForward's activation + sub-LayerNorm kernels.")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[8192, 32768], help="N (default: 8192 32768)"
    )
    parser.add_argument("--embed-dim", type=int, default=768, help="E (default: 768)")
    parser.add_argument("--hidden-dim", type=int, default=3072, help="F (default: 3072)")
    parser.add_argument("--activation", choices=["gelu", "relu", "silu"], default="gelu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings (default: 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed passes per round (default: 10)")
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
    for n in args.tokens:
        for mode in args.modes:
            rows.append(measure(args, n, mode, device))
            print(rows[-1], flush=True)
    path = args.out / f"feedforward_{args.tag or slug(meta['device'])}.json"
    write_json(path, {"meta": meta, "rows": rows})
    print(f"\n{table(rows)}\n\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
