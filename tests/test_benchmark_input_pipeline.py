"""The input-pipeline benchmark on the CPU: rows per K and media dtype, the float32 baseline's
ratio, and the rate it counts on a loader of known batches."""

import json

import pytest
import torch
from benchmark_loader import load_benchmark

bench = load_benchmark("input_pipeline")


def test_rows_per_k_and_dtype_with_the_ratio_to_float32(tmp_path):
    argv = ["--digits", "2", "--seconds", "0.05", "--rounds", "2", "--warmup", "1", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path), "--tag", "t"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "input_pipeline_t.json").read_text())["rows"]
    assert [(row["K"], row["media_dtype"]) for row in rows] == [(2, "float32"), (2, "float16")]
    assert rows[0]["vs_float32"] == 1.0
    for row in rows:
        assert len(row["rounds"]) == 2 and row["samples_per_s"] > 0 and row["batch_size"] == 64
        assert row["vs_float32"] == pytest.approx(row["samples_per_s"] / rows[0]["samples_per_s"], abs=0.01)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_the_rate_counts_the_timed_batches_samples_over_the_timed_seconds(monkeypatch):
    batch = bench.quality.collate_samples([{"id": "a", "audio": torch.ones(3), "label": 0}] * 5)
    taken = []

    def batches():
        while True:
            taken.append(1)
            yield batch, ["first"] * 5

    clock = iter(0.5 * step for step in range(100))  # each read of the clock: 0.5 s later
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    rate = bench.delivered_per_second(batches(), torch.device("cpu"), seconds=1.0, warmup=2)
    assert len(taken) == 3  # two untimed, then one batch in the timed second
    assert rate == pytest.approx(5 / 1.0)
