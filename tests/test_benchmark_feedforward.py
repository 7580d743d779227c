"""The FeedForward kernels' A/B benchmark on the CPU: both settings timed per round and mode, outputs
and gradients compared, the switch restored."""

import json

import torch
from benchmark_loader import load_benchmark

from mmlongnet.layers import feedforward

bench = load_benchmark("feedforward")


def test_tiny_cpu_run_times_both_settings_and_restores_the_switch(tmp_path, capsys, one_thread):
    argv = ["--device", "cpu", "--tokens", "24", "40", "--embed-dim", "8", "--hidden-dim", "20",
            "--rounds", "2", "--warmup", "1", "--runs", "2", "--out", str(tmp_path),
            "--tag", "t"]  # fmt: skip
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "feedforward_t.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["args"]["hidden_dim"] == 20
    assert [(row["n"], row["mode"]) for row in data["rows"]] == [
        (24, "eager"), (24, "compiled"), (40, "eager"), (40, "compiled")
    ]  # fmt: skip
    for row in data["rows"]:
        assert len(row["on_ms"]) == len(row["off_ms"]) == 2 and min(row["on_ms"] + row["off_ms"]) > 0
        # on the CPU both settings run the modules: the same numbers
        assert set(row["relative_difference"]) == {
            "out", "dx", "fc1.weight", "fc1.bias", "inner_norm.weight", "inner_norm.bias", "fc2.weight",
            "fc2.bias",
        }  # fmt: skip
        assert max(row["relative_difference"].values()) == 0.0
        assert row["on_kernel_ms"] is None
    assert feedforward.FUSED_ACTIVATION_NORM is True
    assert "| 40 | compiled |" in capsys.readouterr().out


def test_the_switch_sends_feedforward_to_its_modules(monkeypatch):
    """With FUSED_ACTIVATION_NORM off, FeedForward takes its modules wherever the kernels would run."""
    ffn = feedforward.FeedForward(8, 16)
    hidden = ffn.fc1(torch.randn(2, 8))
    monkeypatch.setattr(feedforward, "kernels_take", lambda *tensors: True)  # as on a GPU
    assert ffn.eval()._fused(hidden)
    monkeypatch.setattr(feedforward, "FUSED_ACTIVATION_NORM", False)
    assert not ffn._fused(hidden)
