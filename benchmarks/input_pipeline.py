"""How fast the AV digits loaders deliver batches to the device, by K and by the batches' media dtype.

A training run at long K can wait on its loaders rather than on its steps (`quality.py`'s
`batch_wait`): a batch of 31 examples at K = 256 holds ~280 MB of float32 audio, which the workers
write, the main process pins and the step copies to the GPU. This script builds `quality.py
avdigits`'s training loader (the same batch size per K, workers, pinning and collate) and counts
the samples it delivers per second, each batch's inputs copied to the device and synchronised, with
nothing else running: the most a training loop can take from it. For each K, every media dtype
runs `--rounds` times, interleaved, each for `--seconds` after `--warmup` batches; the table gives
the medians and each dtype's ratio to float32 (the baseline, measured in the same run).

    python benchmarks/input_pipeline.py --digits 16 256 --media-dtypes float32 float16 --tag h200
    python benchmarks/input_pipeline.py --digits 4 --seconds 2 --rounds 1 --device cpu   # a quick check

Writes `<out>/input_pipeline_<tag>.json` (metadata, one row per K and dtype) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS_DIR,
    device_name,
    environment,
    load_script,
    markdown_table,
    slug,
    synchronize,
    use_repository,
    write_json,
)

use_repository()
quality = load_script("quality")


def delivered_per_second(loader_iter, device: torch.device, seconds: float, warmup: int) -> float:
    """Samples a second in the batches taken from `loader_iter` for `seconds` (at least one batch)
    after `warmup` untimed ones, each one's inputs copied to `device` as a training step copies them."""

    def take() -> int:
        batch, _ = next(loader_iter)
        inputs = [x.to(device, non_blocking=True) for x in batch.inputs.values()]
        synchronize(device)
        del inputs
        return len(batch.labels)

    for _ in range(warmup):
        take()
    samples = batches = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or batches == 0:
        samples += take()
        batches += 1
    return samples / elapsed


def measure(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for K in args.digits:
        loaders = {}
        for dtype in args.media_dtypes:
            options = quality.parse_args(
                ["avdigits", "--media-dtype", dtype, "--device", str(device)]
                + (["--workers", str(args.workers)] if args.workers is not None else [])
            )
            loaders[dtype] = iter(quality.av_loader(K, "train", 10**7, options, device))
        rates = {dtype: [] for dtype in args.media_dtypes}
        batch_size = None
        for _ in range(args.rounds):
            for dtype, loader_iter in loaders.items():
                rate = delivered_per_second(loader_iter, device, args.seconds, args.warmup)
                rates[dtype].append(rate)
        for dtype in args.media_dtypes:
            batch_size = quality.batch_for(quality.av_tokens_per_sample(K, options), options)
            rows.append({
                "K": K, "media_dtype": dtype, "batch_size": batch_size, "workers": options.workers,
                "samples_per_s": round(statistics.median(rates[dtype]), 1),
                "rounds": [round(rate, 1) for rate in rates[dtype]],
            })  # fmt: skip
        del loaders
    baseline = {row["K"]: row["samples_per_s"] for row in rows if row["media_dtype"] == "float32"}
    for row in rows:
        row["vs_float32"] = (
            round(row["samples_per_s"] / baseline[row["K"]], 2) if row["K"] in baseline else None
        )
    return rows


def table(rows: Sequence[dict]) -> str:
    return markdown_table(
        ["K", "media dtype", "batch", "workers", "samples/s (median)", "vs float32"],
        [
            [row["K"], row["media_dtype"], row["batch_size"], row["workers"], f"{row['samples_per_s']:,.0f}",
             "-" if row["vs_float32"] is None else f"{row['vs_float32']:.2f}"]
            for row in rows
        ],
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits", type=int, nargs="+", default=[16, 256], help="K digits per example")
    parser.add_argument(
        "--media-dtypes", nargs="+", choices=list(quality.MEDIA_DTYPES), default=list(quality.MEDIA_DTYPES)
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per K and dtype (the median is reported)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches before each round")
    parser.add_argument("--workers", type=int, help="loader workers (default: quality.py's)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default=None, help="file name tag (default: the device's name)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error(
            f"--rounds >= 1, --seconds > 0, --warmup >= 0; got {args.rounds}, {args.seconds}, {args.warmup}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = measure(args, device)
    tag = args.tag or slug(device_name(device))
    path = args.out / f"input_pipeline_{tag}.json"
    write_json(path, {"meta": environment(device), "rows": rows})
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
