"""Plot a Lightning CSVLogger run: loss and accuracy against the optimizer step.

    python benchmarks/training_curve.py runs/avdigits_long/lightning_logs/version_0/metrics.csv \
        --out benchmarks/results/avdigits_long_h100.png --title "AV digits, K=1024, H100"

Reads the columns the run logged (train_loss, val_loss, val_acc, test_acc, tokens_per_s,
peak_memory_gib, ...) and prints a one-line summary: the last validation accuracy, the test
accuracy when present, the median tokens/s and the largest peak memory.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import pyplot, save_figure  # noqa: E402


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """column -> [(step, value)] for every non-empty cell."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            step = int(row.get("step") or 0)
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(name, []).append((step, float(value)))
    return series


def summary(series: dict[str, list[tuple[int, float]]]) -> str:
    """One line: last val_acc, test_acc, median tokens/s, peak memory, steps."""
    parts = []
    if "val_acc" in series:
        parts.append(f"val_acc={series['val_acc'][-1][1]:.3f}")
    if "test_acc" in series:
        parts.append(f"test_acc={series['test_acc'][-1][1]:.3f}")
    if "tokens_per_s" in series:
        parts.append(f"tokens/s={statistics.median(v for _, v in series['tokens_per_s']):,.0f}")
    if "peak_memory_gib" in series:
        parts.append(f"peak={max(v for _, v in series['peak_memory_gib']):.1f} GiB")
    steps = max((step for values in series.values() for step, _ in values), default=0)
    return " ".join(parts + [f"steps={steps}"])


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    """Two panels: losses (train, val) and accuracies (val, test) against the step."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("train_loss", "-"), ("val_loss", "o-")):
        if name in series:
            steps, values = zip(*series[name], strict=True)
            loss_ax.plot(steps, values, style, label=name, markersize=3)
    for name, style in (("train_acc", "-"), ("val_acc", "o-"), ("test_acc", "s")):
        if name in series:
            steps, values = zip(*series[name], strict=True)
            acc_ax.plot(steps, values, style, label=name, markersize=4)
    loss_ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title="loss")
    acc_ax.set(xlabel="optimizer step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a Lightning CSVLogger metrics.csv.")
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics.csv files (fit, then test)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    series: dict[str, list[tuple[int, float]]] = {}
    for path in args.metrics:
        for name, values in read_metrics(path).items():
            series.setdefault(name, []).extend(values)
    plot(series, args.out, args.title)
    print(summary(series))
    return 0


if __name__ == "__main__":
    sys.exit(main())
