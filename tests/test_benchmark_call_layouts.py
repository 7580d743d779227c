"""The call-layout A/B benchmark on the CPU: both settings timed per round, outputs compared, the
switch restored."""

import json

import pytest
from benchmark_loader import load_benchmark

from mmlongnet.attention import dilated

bench = load_benchmark("call_layouts")


@pytest.mark.parametrize(
    ("switch", "segments", "rates", "tolerance"),
    [
        ("diagonal", ["16", "32"], ["1", "4"], 0.0),  # a layout changes no arithmetic
        ("in_place", ["16", "32"], ["1", "4"], 0.0),
        ("dense", ["32", "64"], ["1", "2"], 1e-5),  # one dense call: another order of float32 sums
    ],
)
def test_tiny_cpu_run_times_both_settings_and_restores_the_switch(
    switch, segments, rates, tolerance, tmp_path, capsys, one_thread
):
    argv = ["--device", "cpu", "--switch", switch, "--sizes", "64", "100", "--segments", *segments,
            "--rates", *rates, "--heads", "4", "--head-dim", "8", "--rounds", "2", "--warmup", "1",
            "--runs", "2", "--out", str(tmp_path), "--tag", "t"]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / f"call_layouts_{switch}_t.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["args"]["switch"] == switch
    assert [row["n"] for row in data["rows"]] == [64, 100]
    for row in data["rows"]:
        assert len(row["on_ms"]) == len(row["off_ms"]) == 2 and min(row["on_ms"] + row["off_ms"]) > 0
        assert row["max_abs_difference"] <= tolerance
    assert (
        dilated.DIAGONAL_CALLS is True
        and dilated.WRITE_IN_PLACE is True
        and dilated.DENSE_SMALL_INPUTS is True
    )
    assert "| 100 |" in capsys.readouterr().out
