"""The LongNet training-step benchmark on the CPU: a tiny end-to-end run, the plan, the
checkpointing fallback on out-of-memory, and --plot-only."""

import json
import math
import re

import pytest
import torch
from benchmark_loader import load_benchmark

bench = load_benchmark("longnet")


def test_tiny_cpu_run_writes_json_png_and_table(tmp_path, capsys, one_thread):
    assert (
        bench.main(["--device", "cpu", "--sizes", "64", "--tiny", "--out", str(tmp_path), "--tag", "t"]) == 0
    )
    data = json.loads((tmp_path / "longnet_t.json").read_text())
    assert (tmp_path / "longnet_t.png").stat().st_size > 0
    assert not (tmp_path / "longnet_t.json.tmp").exists()
    meta, rows = data["meta"], data["rows"]
    assert meta["vocab"] == 256 and meta["tokens"] == "byte-level" and meta["model"]["num_layers"] == 2
    assert [(r["kind"], r["n"]) for r in rows] == [("dilated", 64), ("dense", 64)]
    for row in rows:
        assert row["status"] == "ok" and row["checkpointing"] is False
        assert row["runs"] == 5 and len(row["times_ms"]) == 5
        assert math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(64 / (row["ms"] / 1e3))
        assert row["tokens_per_s"] > 0 and row["flops"] > 0
        # random bytes at initialisation: the loss is near ln(256) = 5.55
        assert abs(row["loss"] - math.log(256)) < 1.0
    dilated, dense = rows
    assert dilated["ratio"] == pytest.approx(dilated["tokens_per_s"] / dense["tokens_per_s"])
    assert dense["ratio"] is None
    table = capsys.readouterr().out
    assert "| dilated | 64 | no |" in table and "| dense | 64 | no |" in table


def test_warm_up_steps_run_inside_the_warmup_context_and_timed_steps_outside(monkeypatch):
    inside, seen = [], []

    class Context:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def step():
        seen.append(bool(inside))
        return torch.tensor(1.0)

    times, loss = bench.time_steps(step, torch.device("cpu"), 5, Context)
    assert seen == [True] * bench.WARMUP_STEPS + [False] * 5
    assert len(times) == 5 and loss == 1.0


def test_compiled_runs_promote_their_warm_up_unless_told_not_to(tmp_path, monkeypatch):
    options = []

    def fake_measure(*args, **kwargs):
        options.append(kwargs)
        return bench.Measurement([1.0, 2.0, 3.0], 5.5, None)

    monkeypatch.setattr(bench, "measure_config", fake_measure)
    cases = (([], False), (["--compile"], True), (["--compile", "--no-promote-warmup"], False))
    for flags, promoted in cases:
        args = bench.parse_args(["--device", "cpu", "--tiny", "--sizes", "64", "--kinds", "dilated", *flags])
        bench.Sweep(args, {}, tmp_path / "t.json", dry_run=False).measure("dilated", 64, False)
        expected = {"compiled": "--compile" in flags, "promote_warmup": promoted, "profile_steps": 0}
        assert options.pop() == expected


def test_gpu_kernels_are_sorted_by_kind_from_their_names():
    common = load_benchmark("_common")
    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90": "attention",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN": "matmul",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "_merge_rows_kernel": "other",
        "triton_per_fused_native_layer_norm_0": "other",
    }
    assert {name: common.kernel_kind(name) for name in kinds} == kinds


def test_profiled_rows_add_a_table_of_kernel_time_by_kind():
    kinds = {"attention_kernel_ms": 10.0, "matmul_kernel_ms": 15.0, "optimizer_kernel_ms": 1.0}
    profile = {"kernel_ms": 30.0, **kinds, "other_kernel_ms": 4.0, "kernels": 1234.0, "largest": []}
    profiled = bench.Row("dilated", 8192, 1, "ok", 1e12, checkpointing=False, ms=34.0, profile=profile)
    plain = bench.Row("dense", 8192, 1, "ok", 1e12, checkpointing=False, ms=33.0)
    table = bench.markdown_table([profiled, plain])
    assert "| dilated | 8K | 34.0 | 30.0 | 10.0 | 15.0 | 1.0 | 4.0 | 1,234 |" in table
    assert table.count("| dense | 8K |") == 1  # in the first table only
    assert "GPU kernel ms" not in bench.markdown_table([plain])


def test_dry_run_plans_every_kind_at_every_size(tmp_path, capsys):
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    planned = re.findall(r"(dilated|dense)\s+N=\s*(\d+) B=1\s+planned", out)
    assert [(kind, int(n)) for kind, n in planned] == [
        (kind, n) for n in (8192, 32768, 131072) for kind in ("dilated", "dense")
    ]
    assert "6 configurations" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_step_flops_count_matmuls_and_causal_pairs():
    config, n = bench.BASE, 8192
    matmul = 6 * (12 * (4 * 768**2 + 2 * 768 * 3072) + 768 * 256) * n
    dense_pairs = 12 * n * (n + 1) // 2  # heads * causal pairs
    assert bench.step_flops(config, 256, "dense", n, 1) == matmul + 3.5 * 4 * 64 * dense_pairs * 12
    # at N = 8K the dilated branches are segments of W, W/2, ... rows per head: fewer pairs than dense
    dilated = bench.step_flops(config, 256, "dilated", n, 2)
    assert 2 * matmul < dilated < bench.step_flops(config, 256, "dense", n, 2)


def test_out_of_memory_retries_with_checkpointing_then_records_oom(tmp_path, monkeypatch):
    calls = []

    def fake_measure(config, vocab, kind, n, batch, checkpointing, steps, device, compiled=False, **options):
        calls.append((kind, n, checkpointing))
        if kind == "dense" and (not checkpointing or n >= 128):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return bench.Measurement([10.0, 30.0, 20.0], 5.5, None)

    monkeypatch.setattr(bench, "measure_config", fake_measure)
    args = bench.parse_args(["--device", "cpu", "--tiny", "--sizes", "64", "128", "256"])
    sweep = bench.Sweep(args, {}, tmp_path / "longnet_t.json", dry_run=False)
    bench.run_sweep(sweep, args.sizes, args.kinds)
    rows = {(r.kind, r.n): r for r in sweep.rows}
    # dense: no checkpointing (oom) then checkpointing at 64; checkpointing only at 128; 256 not tried
    assert calls == [
        ("dilated", 64, False), ("dense", 64, False), ("dense", 64, True),
        ("dilated", 128, False), ("dense", 128, True), ("dilated", 256, False),
    ]  # fmt: skip
    dense = rows["dense", 64]
    assert dense.status == "ok" and dense.checkpointing is True
    assert dense.oom_without_checkpointing.startswith("OutOfMemoryError: CUDA out of memory")
    assert dense.ms == 20.0 and dense.tokens_per_s == pytest.approx(64 / 0.020)
    assert rows["dilated", 64].ratio == pytest.approx(1.0)  # the same fake time for both kinds
    assert rows["dense", 128].status == "oom" and rows["dense", 128].checkpointing is True
    assert rows["dilated", 128].ratio is None
    assert rows["dense", 256].status == "skipped" and "out of memory at N=128" in rows["dense", 256].error
    saved = json.loads((tmp_path / "longnet_t.json.tmp").read_text())["rows"]
    assert [r["status"] for r in saved] == ["ok", "ok", "ok", "oom", "ok", "skipped"]


def test_plot_only_redraws_png_from_synthetic_json(tmp_path, capsys):
    def row(kind, n, ms, status="ok", checkpointing=False):
        ok = status == "ok"
        return {
            "kind": kind, "n": n, "batch": 1, "status": status, "flops": 1e13, "checkpointing": checkpointing,
            "ms": ms if ok else None, "tokens_per_s": n / (ms / 1e3) if ok else None,
            "tflops": 1e13 / ms / 1e9 if ok else None, "peak_gib": n / 4096 if ok else None,
            "loss": 5.5 if ok else None, "runs": 5 if ok else 0, "future_field": 1,
        }  # fmt: skip

    rows = [
        row("dilated", 8192, 50.0), row("dense", 8192, 60.0),
        row("dilated", 131072, 800.0, checkpointing=True), row("dense", 131072, 3200.0, checkpointing=True),
        row("dilated", 524288, 3300.0, checkpointing=True), row("dense", 524288, 0, "oom", True),
    ]  # fmt: skip
    meta = {"device": "synthetic", "device_memory_gib": 79.1, "model": {"d_model": 768}, "vocab": 256}
    path = tmp_path / "longnet_synthetic.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    assert bench.main(["--plot-only", str(path)]) == 0
    png = tmp_path / "longnet_synthetic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| dilated | 128K | yes | 800.0 | 163,840 | 12.5 | 32.0 | 4.00 |" in out
    assert "| dense | 512K | - | oom | - | - | - | - |" in out
