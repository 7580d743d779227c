"""benchmarks/op_passes.py: its counter on known cases, and a run of the script."""

import json

import torch
from benchmark_loader import load_benchmark

bench = load_benchmark("op_passes")


def test_the_counter_counts_operations_and_their_elements_and_skips_views():
    x = torch.ones(4, 8)
    with bench.PassCounter() as counter:
        y = x + 1  # 1 operation, 32 elements
        y.view(8, 4).t()  # views: not counted
        y[:2].mul_(2)  # 1 operation on a view of 16 elements
        torch.empty(100)  # an allocation: not counted
    assert (counter.operations, counter.elements) == (2, 48)


def test_a_run_prints_the_table_and_writes_the_rows(tmp_path, capsys):
    path = tmp_path / "passes.json"
    argv = ["--sizes", "64", "96", "--segments", "16", "32", "--rates", "1", "3", "--heads", "4",
            "--head-dim", "8", "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["n"] for r in rows] == [64, 96]
    for r in rows:
        # every direction runs at least one kernel call per branch and writes at least its output
        assert r["forward_ops"] >= 2 and r["backward_ops"] >= 2
        assert r["forward_writes"] >= 1.0 and r["backward_writes"] >= 3.0  # out; dq, dk, dv
    assert "| 96 |" in capsys.readouterr().out
