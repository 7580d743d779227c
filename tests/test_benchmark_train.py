"""The end-to-end training benchmark on the CPU: the smoke rows through the real modules and data
modules, the time budget, and the profile arithmetic (busy share, launches, syncs) on synthetic
events with known answers."""

import dataclasses
import gzip
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from benchmark_loader import load_benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent


bench = load_benchmark("train")
Event = bench.Event


def expected_av_tokens(lengths: dict[str, list[int]]) -> int:
    """Fused valid tokens of a demo.yaml batch from its lengths, by the encoders' own arithmetic:
    text ids, (image_size / patch_size)^2 tokens per frame, the audio encoder's output lengths."""
    from mmlongnet.modalities import AudioEncoder, AudioEncoderConfig

    model = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())["model"]["init_args"]["model"]
    audio = AudioEncoder(AudioEncoderConfig(**model["audio"]))
    per_frame = (model["video"]["image_size"] // model["video"]["patch_size"]) ** 2
    audio_tokens = int(audio.output_lengths(torch.tensor(lengths.get("audio", [0]))).sum())
    return sum(lengths.get("text", [])) + per_frame * sum(lengths.get("video", [])) + audio_tokens


def test_smoke_run_trains_every_row_and_writes_json_png_table(tmp_path, capsys, one_thread):
    argv = [
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--tag",
        "t",
        "--trace",
        str(tmp_path / "traces"),
        "--pipelined-steps",
        "2",
    ]
    assert bench.main(argv) == 0
    assert (tmp_path / "train_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "train_t.json.tmp").exists()
    data = json.loads((tmp_path / "train_t.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["device"] == "cpu" and meta["cuda"] is False and meta["cudnn"] is None
    assert meta["torch"] == torch.__version__
    assert (meta["warmup_steps"], meta["timed_steps"], meta["profiled_steps"]) == (1, 2, 1)
    assert [(r["row"], r["kind"]) for r in rows] == [
        ("av4", "dilated"), ("av4", "dense"), ("lm64", "dilated"), ("lm64", "dense"),
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert len(row["times_ms"]) == 2 and len(row["tokens"]) == 2
        assert row["step_ms"] == pytest.approx(statistics.median(row["times_ms"])) and row["step_ms"] > 0
        assert row["steps_per_s"] == pytest.approx(1e3 / row["step_ms"]) and row["steps_per_s"] > 0
        assert row["tokens_per_step"] == pytest.approx(statistics.fmean(row["tokens"]))
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] * row["steps_per_s"])
        assert row["data_ms"] >= 0 and row["profiled_step_ms"] > 0
        assert row["pipelined_step_ms"] > 0 and row["pipelined_tokens_per_s"] > 0
        # two back-to-back steps of the same batches' sizes: tokens over their span
        assert row["pipelined_tokens_per_s"] == pytest.approx(
            statistics.fmean(row["tokens"]) * 1e3 / row["pipelined_step_ms"], rel=0.5
        )
        assert math.isfinite(row["loss"])
        assert row["distinct_shapes"] == len(row["shapes"]) >= 1
        assert set(row["first_run_ms"]) <= set(row["shapes"]) and min(row["first_run_ms"].values()) > 0
        # no GPU: the device fields stay empty rather than zero
        for field in (
            "peak_gib",
            "gpu_busy_share",
            "kernels_per_step",
            "launches_per_step",
            "syncs_per_step",
            "gpu_gaps",
            "pipelined_gpu_busy_share",
        ):
            assert row[field] is None
        trace = json.loads(
            gzip.decompress((tmp_path / "traces" / f"trace_{row['row']}_{row['kind']}.json.gz").read_bytes())
        )
        marks = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"}
        assert f"{bench.STEP_MARK}0" in marks  # the profiled step
    av_dilated, av_dense, lm_dilated, lm_dense = rows
    for row in (lm_dilated, lm_dense):  # B = 2 windows of N = 64 inputs (65 ids with the target)
        assert row["tokens"] == [128, 128] and row["shapes"] == ["2x65"] and row["lengths"] is None
        assert row["pipelined_tokens_per_s"] == pytest.approx(128e3 / row["pipelined_step_ms"])
        assert abs(row["loss"] - math.log(259)) < 1.5  # bytes at initialisation: near ln V
    for row in (av_dilated, av_dense):  # the fused valid tokens the batch holds
        assert [expected_av_tokens(lengths) for lengths in row["lengths"]] == row["tokens"]
        assert 0.0 < row["loss"] < math.log(10) + 1.0
    assert av_dilated["lengths"] == av_dense["lengths"]  # one seed: both kinds see the same batches
    segment = f"[{bench.DENSE_SEGMENT}]"
    assert av_dense["overrides"].count(segment) == 4 and segment not in av_dilated["overrides"]
    assert "dense" in lm_dense["overrides"] and "dense" not in lm_dilated["overrides"]
    out = capsys.readouterr().out
    table = out[out.index("cpu; torch") :]
    assert "| row | attention | B | tokens/step | steps/s |" in table
    assert "| lm64 | dense | 2 | 128 |" in table and "| av4 | dilated | 2 |" in table


def test_time_budget_skips_the_remaining_rows(tmp_path, capsys):
    argv = ["--smoke", "--device", "cpu", "--time-budget", "0", "--out", str(tmp_path), "--tag", "b"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "train_b.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped"] * 4
    assert all("time budget of 0 s" in r["error"] and r["steps_per_s"] is None for r in rows)
    out = capsys.readouterr().out
    assert "skipped after the time budget of 0 s: av4/dilated av4/dense lm64/dilated lm64/dense" in out
    assert "| av4 | dilated | 2 | - | skipped |" in out


def test_rows_by_name_by_spec_and_with_a_batch_override():
    assert bench.parse_row("av1024") == bench.RowSpec("av1024", "av", 1024, 4, "configs/avdigits_long.yaml")
    assert bench.parse_row("lm128k").size == 131072 and bench.parse_row("lm128k").batch == 1
    custom = bench.parse_row("lm:65536:2", batch=3)
    assert (custom.task, custom.size, custom.batch, custom.config) == (
        "lm",
        65536,
        3,
        "configs/lm_bytes.yaml",
    )
    for bad in ("av", "xx:1:1", "av:0:4"):
        with pytest.raises(ValueError):
            bench.parse_row(bad)
    args = bench.parse_args(["--rows", "av16", "av:512:8", "--batch", "2", "--device", "cpu"])
    assert [(s.name, s.size, s.batch) for s in args.specs] == [("av16", 16, 2), ("av:512:8", 512, 2)]


def test_overrides_set_size_batch_and_the_dense_schedule():
    spec = bench.ROWS["av256"]
    assert bench.row_overrides(spec, "dilated", None) == [
        "--data.init_args.dataset.num_digits", "256", "--data.init_args.batch_size", "8",
        "--model.init_args.compile", "false", "--model.init_args.graphed", "false",
    ]  # fmt: skip
    dense = bench.row_overrides(spec, "dense", 4)
    assert dense[4:6] == ["--data.init_args.num_workers", "4"]
    for stack in bench.AV_STACKS:
        i = dense.index(f"--model.init_args.model.{stack}.segment_lengths")
        assert dense[i + 1 : i + 4] == [
            f"[{2**24}]",
            f"--model.init_args.model.{stack}.dilation_rates",
            "[1]",
        ]
    graphed = bench.row_overrides(spec, "dilated", None, graphed=True)
    assert graphed[-4:] == ["--model.init_args.compile", "false", "--model.init_args.graphed", "true"]
    compiled = bench.row_overrides(spec, "dilated", None, compiled=True)
    assert compiled[-4:] == ["--model.init_args.compile", "true", "--model.init_args.graphed", "false"]
    assert bench.row_overrides(bench.ROWS["lm32k"], "dilated", None, graphed=True)[-2:] == graphed[-2:]
    with pytest.raises(SystemExit):
        bench.parse_args(["--graphed", "--compile", "--device", "cpu"])
    lm = bench.row_overrides(bench.ROWS["lm32k"], "dense", None)
    assert lm == [
        "--data.init_args.window", "32768", "--data.init_args.batch_size", "4",
        "--model.init_args.model.init_args.attention", "dense",
        "--model.init_args.compile", "false", "--model.init_args.graphed", "false",
    ]  # fmt: skip


def test_set_overrides_every_row_and_reaches_the_data_module():
    argv = ["--rows", "av16", "lm8k", "--set", "data.init_args.media_dtype", "float16", "--device", "cpu"]
    args = bench.parse_args(argv)
    for spec in args.specs:
        assert bench.row_overrides(spec, "dilated", None)[-2:] == ["--data.init_args.media_dtype", "float16"]
    assert bench.parse_args(["--rows", "av16", "--device", "cpu"]).specs[0].extra == ()
    spec = args.specs[0]
    overrides = bench.row_overrides(spec, "dilated", None)
    _, datamodule, _ = bench.build(spec, "dilated", torch.device("cpu"), overrides)
    assert datamodule.media_dtype == torch.float16


@pytest.mark.parametrize("compiled, graphed", [(True, False), (False, True), (False, False)])
def test_each_mode_builds_the_av_config_it_names(compiled, graphed):
    # the AV config turns graphed steps on: a compiled or eager row turns them off
    spec = bench.ROWS["av16"]
    overrides = bench.row_overrides(spec, "dilated", None, compiled=compiled, graphed=graphed)
    module, _, _ = bench.build(spec, "dilated", torch.device("cpu"), overrides)
    assert (module.compiled is not None, module.graphed_steps is not None) == (compiled, graphed)


def test_a_row_whose_config_does_not_build_raises_an_error_the_row_records(capsys):
    spec = bench.ROWS["av16"]
    overrides = [*bench.row_overrides(spec, "dilated", None), "--model.init_args.model.d_model", "63"]
    with pytest.raises(RuntimeError, match="configuration does not build"):
        bench.build(spec, "dilated", torch.device("cpu"), overrides)
    assert "error: nhead must divide d_model=63" in capsys.readouterr().err


def test_interval_union_counts_overlaps_once_and_clips_to_the_window():
    intervals = [(0.0, 10.0), (5.0, 15.0), (20.0, 30.0)]
    assert bench.interval_union(intervals, (0.0, 40.0)) == 25.0
    assert bench.interval_union(intervals, (8.0, 25.0)) == 7.0 + 5.0
    assert bench.interval_union([(0.0, 100.0), (10.0, 20.0), (30.0, 40.0)], (0.0, 50.0)) == 50.0
    assert bench.interval_union([(12.0, 18.0), (2.0, 4.0), (3.0, 13.0)], (0.0, 20.0)) == 16.0  # unsorted
    assert bench.interval_union([(50.0, 60.0)], (0.0, 40.0)) == 0.0
    assert bench.interval_union([], (0.0, 1.0)) == 0.0


def cpu(name, start, end=None, annotation=False):
    return Event(name, False, annotation, start, start + 1.0 if end is None else end)


def gpu(name, start, end, annotation=False):
    return Event(name, True, annotation, start, end)


# Two profiled steps: step 0 runs its code in [0, 50) and the benchmark's sync in [50, 100); step 1
# in [100, 140) and [140, 200). Times in us.
EVENTS = [
    cpu(f"{bench.STEP_MARK}0", 0, 50, annotation=True),
    cpu(f"{bench.SYNC_MARK}0", 50, 100, annotation=True),
    cpu(f"{bench.STEP_MARK}1", 100, 140, annotation=True),
    cpu(f"{bench.SYNC_MARK}1", 140, 200, annotation=True),
    gpu(f"{bench.STEP_MARK}0", 0, 100, annotation=True),  # the GPU-side copy of an annotation: not a kernel
    gpu(f"{bench.SYNC_MARK}1", 140, 200),  # the same, even where it is not flagged as an annotation
    gpu("ampere_bf16_gemm", 10, 60), gpu("flash_fwd_kernel", 40, 80),  # step 0: busy [10, 80) = 70 us
    gpu("Memcpy HtoD (Pageable -> Device)", 85, 95),  # a copy: not a kernel
    gpu("elementwise_kernel", 110, 130),  # step 1: busy 20 us
    cpu("cudaLaunchKernel", 5), cpu("cudaLaunchKernel", 15), cpu("cuLaunchKernelEx", 105),
    cpu("cudaMemcpyAsync", 20),  # does not block the host
    cpu("cudaStreamSynchronize", 30), cpu("cudaMemcpy", 120), cpu("cudaEventSynchronize", 135),
    cpu("cudaDeviceSynchronize", 60), cpu("cudaDeviceSynchronize", 150),  # the benchmark's own syncs
    cpu("aten::mm", 7, 12),
]  # fmt: skip


def test_step_windows_pair_each_step_with_its_closing_sync():
    assert bench.step_windows(EVENTS) == [(0, 50, 100), (100, 140, 200)]
    assert bench.step_windows(EVENTS[2:]) == []  # step 0 missing: no window is guessed


def test_syncs_and_launches_are_counted_by_name_in_the_step_code():
    assert bench.count_syncs(EVENTS, 0, 50) == {
        "cudaStreamSynchronize": 1, "cudaDeviceSynchronize": 0, "cudaEventSynchronize": 0, "cudaMemcpy": 0,
    }  # fmt: skip
    assert bench.count_syncs(EVENTS, 0, 200)["cudaDeviceSynchronize"] == 2
    assert bench.count_launches(EVENTS, 0, 50) == 2 and bench.count_launches(EVENTS, 100, 140) == 1
    assert sum(bench.is_kernel(e) for e in EVENTS) == 3


def test_gpu_gaps_name_what_the_host_ran_while_no_kernel_did():
    gaps = bench.gpu_gaps(EVENTS, bench.step_windows(EVENTS))
    assert gaps == [  # longest first; step 0 busy [10, 80) of [0, 100), step 1 [110, 130) of [100, 200)
        {"step": 1, "at_ms": 0.03, "ms": 0.07,
         "host": ["cudaEventSynchronize (0.001 ms)", "cudaDeviceSynchronize (0.001 ms)"]},
        {"step": 0, "at_ms": 0.08, "ms": 0.02, "host": []},  # the memcpy is not a kernel
        {"step": 0, "at_ms": 0.0, "ms": 0.01, "host": ["aten::mm (0.003 ms)", "cudaLaunchKernel (0.001 ms)"]},
        {"step": 1, "at_ms": 0.0, "ms": 0.01, "host": ["cuLaunchKernelEx (0.001 ms)"]},
    ]  # fmt: skip
    assert bench.summarize_profile(EVENTS, cuda=True).gpu_gaps == gaps
    busy = [*EVENTS, bench.Event("gemm", True, False, 0, 200)]  # a kernel over both steps: no gap
    assert bench.gpu_gaps(busy, bench.step_windows(busy)) == []


def test_profile_summary_on_synthetic_events():
    profile = bench.summarize_profile(EVENTS, cuda=True)
    assert profile.step_ms == pytest.approx(0.1)  # both steps span 100 us
    assert profile.gpu_busy_share == pytest.approx(statistics.median([70 / 100, 20 / 100]))
    assert profile.kernels_per_step == 1.5 and profile.launches_per_step == 1.5
    assert profile.syncs_per_step == 1.5  # stream sync, cudaMemcpy, event sync over 2 steps
    assert profile.syncs == {
        "cudaStreamSynchronize": 0.5, "cudaDeviceSynchronize": 0.0,
        "cudaEventSynchronize": 0.5, "cudaMemcpy": 0.5,
    }  # fmt: skip
    host_only = bench.summarize_profile(EVENTS, cuda=False)
    assert host_only.step_ms == pytest.approx(0.1) and host_only.gpu_busy_share is None
    assert host_only.syncs is None and host_only.kernels_per_step is None
    assert bench.summarize_profile([], cuda=True) == bench.Profile(None, None, None, None, None, None)


def test_shape_key_and_lengths_of_a_batch():
    @dataclasses.dataclass
    class FakeBatch:
        ids: list
        inputs: dict
        lengths: dict

    batch = FakeBatch(
        ["a", "b"],
        {"video": torch.zeros(2, 4, 1, 8, 8), "text": torch.zeros(2, 40, dtype=torch.long)},
        {"text": torch.tensor([40, 7]), "video": torch.tensor([0, 4])},
    )
    assert bench.shape_key(batch) == "2x40 2x4x1x8x8 2 2"  # mappings in key order
    assert bench.host_lengths(batch) == {"text": [40, 7], "video": [0, 4]}
    assert bench.shape_key(torch.zeros(16, 8193)) == "16x8193" and bench.host_lengths(torch.zeros(1)) is None


def test_steps_on_shapes_seen_before_are_timed_apart():
    row = bench.Row("av4", "av", 4, 2, "dilated", "ok", [])
    timed = bench.Timed(
        [100.0, 10.0, 50.0, 12.0, 14.0], [1] * 5, [0.1] * 5, None, ["a", "a", "b", "b", "c"], 1.0
    )
    bench.fill_timing(row, timed, earlier_shapes=["c"])
    assert row.step_ms == 14.0 and row.new_shape_steps == 2  # "a" and "b" first ran here
    assert row.step_ms_repeated == 12.0  # the median of 10, 12 and 14 ms
    bench.fill_timing(row, bench.Timed([5.0], [1], [0.1], None, ["d"], 1.0))
    assert row.new_shape_steps == 1 and row.step_ms_repeated is None


def test_first_runs_are_the_first_step_of_each_shape():
    assert bench.first_runs([900.0, 5.0, 800.0, 6.0, 4.0], ["a", "a", "b", "b", "a"]) == {
        "a": 900.0,
        "b": 800.0,
    }


def test_the_shape_filter_keeps_the_first_shapes_and_counts_the_rest():
    sizes = [3, 3, 5, 7, 3, 9, 5]
    batches = bench.ShapeFilter(iter(torch.zeros(1, n) for n in sizes), limit=2)
    assert [batch.shape[1] for batch in batches] == [3, 3, 5, 3, 5]
    assert batches.allowed == ["1x3", "1x5"] and batches.passed_over == 2
    everything = bench.ShapeFilter(iter(torch.zeros(1, n) for n in sizes), limit=None)
    assert len(list(everything)) == len(sizes) and everything.passed_over == 0


class CountingTrainee:
    """A trainee whose step only records the batch's width (no model): for the warm-up logic."""

    device = torch.device("cpu")

    def __init__(self):
        self.widths = []

    def step(self, batch, index):
        self.widths.append(batch.shape[1])
        return torch.zeros(())

    def tokens(self):
        return 1


def test_a_compiled_warm_up_runs_each_kept_shape_three_times():
    sizes = [3, 3, 5, 7, 3, 9, 5, 3, 11, 5, 5, 3]
    batches = bench.ShapeFilter(iter(torch.zeros(1, n) for n in sizes), limit=2)
    trainee = CountingTrainee()
    warm = bench.run_steps(trainee, batches, 1, 0)
    warm = bench.warm_each_shape(trainee, batches, warm)
    # 7, 9 and 11 are passed over; the warm-up stops once width 5 has run its third time
    assert trainee.widths == [3, 3, 5, 3, 5, 3, 5] and warm.shapes.count("1x5") == 3
    assert len(warm.times_ms) == 7 and batches.passed_over == 3
    single = bench.ShapeFilter(iter(torch.zeros(1, 4) for _ in range(100)), limit=2)
    warm = bench.warm_each_shape(trainee, single, bench.run_steps(trainee, single, 1, 0))
    assert len(warm.times_ms) == 3  # a loader of one shape: three runs, not 64 waiting for another
