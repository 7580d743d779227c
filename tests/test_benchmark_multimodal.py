"""The multimodal training-step benchmark on the CPU: a tiny end-to-end run, the input sizes from
the encoders' token arithmetic, FLOP counts, the plan, the checkpointing fallback and --plot-only."""

import json
import math
import re
import warnings

import pytest
import torch
from benchmark_loader import load_benchmark

bench = load_benchmark("multimodal")


def test_tiny_cpu_run_writes_json_png_and_table(tmp_path, capsys, one_thread):
    argv = ["--device", "cpu", "--tiny", "--sizes", "256", "--out", str(tmp_path), "--tag", "t"]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "multimodal_t.json").read_text())
    assert (tmp_path / "multimodal_t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "multimodal_t.json.tmp").exists()
    meta, rows = data["meta"], data["rows"]
    assert meta["model"]["name"] == "tiny" and meta["model"]["d_model"] == 32
    assert meta["mix"] == {"text": 0.10, "audio": 0.45, "video": 0.45}
    assert [(r["kind"], r["target"]) for r in rows] == [("dilated", 256), ("dense-fusion", 256)]
    for row in rows:
        assert row["status"] == "ok" and row["checkpointing"] is False
        assert row["runs"] == 5 and len(row["times_ms"]) == 5
        # the step checks the model's fused length against the plan: realized L = sum of the modalities
        assert row["n"] == sum(row["tokens"].values()) and abs(row["n"] - 256) <= 0.03 * 256
        assert row["tokens"]["audio"] == round(0.45 * 256)  # 115 tokens of 40 ms
        assert row["inputs"]["audio_seconds"] == pytest.approx((115 - 1) / 25)  # the first token is at t = 0
        assert row["inputs"]["video_frames"] == row["tokens"]["video"] // 4 * 2  # P = 4, t = 2
        assert row["tokens_per_s"] == pytest.approx(row["n"] / (row["ms"] / 1e3)) and row["tokens_per_s"] > 0
        assert row["flops"] > 0 and row["input_gib"] > 0
        # cross-entropy over 16 classes: ln 16 = 2.77 at initialisation, a few AdamW steps lower
        assert 0.0 < row["loss"] < math.log(16) + 0.5
    dilated, dense = rows
    assert dilated["fusion_segments"] == [16, 32] and dense["fusion_segments"] == [256]
    assert dense["flops"] > dilated["flops"]  # all 256^2 pairs against segments of 16 and 32
    assert dilated["ratio"] == pytest.approx(dilated["tokens_per_s"] / dense["tokens_per_s"])
    assert dense["ratio"] is None
    table = capsys.readouterr().out
    assert "| dilated | 256 | 25 | 115 | 116 | no |" in table
    assert "| dense-fusion | 256 | 25 | 115 | 116 | no |" in table


@pytest.mark.parametrize("target", [16384, 65536, 262144, 100_000])
def test_plan_hits_the_target_with_the_mix(target):
    config = bench.base_config()
    plan = bench.plan_inputs(config, target)
    assert plan.length == target  # text takes what audio and video leave
    assert plan.audio_tokens == round(0.45 * target)
    assert abs(plan.video_tokens - 0.45 * target) <= 49 / 2  # whole tubelets of 7 x 7 patches
    assert abs(plan.text_tokens - 0.10 * target) <= 49 / 2 + 1
    # audio: 25 tokens/s, N(S) = ceil((1 + S // 160) / 4), and S is the shortest waveform that gives N_a
    assert -(-(1 + plan.audio_samples // 160) // 4) == plan.audio_tokens
    assert -(-(1 + (plan.audio_samples - 1) // 160) // 4) == plan.audio_tokens - 1
    assert plan.audio_samples == 640 * (
        plan.audio_tokens - 1
    )  # (N_a - 1) / 25 s: the first token is at t = 0
    # video: tubelets of 2 frames, 49 patches of 32 x 32 per 224 x 224 frame
    assert plan.video_frames == plan.video_tokens // 49 * 2 and plan.frame_shape == (3, 224, 224)
    assert (
        plan.input_bytes()
        == 8 * plan.text_tokens + 4 * plan.audio_samples + 4 * plan.video_frames * 3 * 224**2
    )


def test_plan_at_16k_matches_the_documented_inputs():
    plan = bench.plan_inputs(bench.base_config(), 16384)
    assert plan.tokens() == {"text": 1661, "audio": 7373, "video": 7350}
    assert plan.video_frames == 300 and plan.audio_samples == 4_718_080  # 4.9 minutes at 16 kHz
    big = bench.plan_inputs(bench.base_config(), 262144)
    assert big.video_frames == 4814 and 2.8 < big.input_bytes() / 2**30 < 3.0  # about 2.9 GiB of frames


def test_plan_matches_the_encoders_on_real_inputs():
    config = bench.tiny_config()
    plan = bench.plan_inputs(config, 512)
    model = bench.mmlongnet_models().MMLongNet(config).eval()
    inputs = bench.make_inputs(config, plan, 2, torch.device("cpu"))
    assert inputs["video"].min() >= -1.0 and inputs["video"].max() <= 1.0 and inputs["text"].min() >= 3
    with torch.no_grad():
        out = model(inputs)
    assert out.tokens.shape == (2, 512, 32)
    counts = [(out.modality_ids[0] == i).sum().item() for i in range(3)]
    assert counts == [plan.text_tokens, plan.audio_tokens, plan.video_tokens]


def test_sizes_too_short_for_the_mix_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--sizes", "8"])
    assert "leaves no text" in capsys.readouterr().err


def test_step_flops_count_layers_attention_and_encoders():
    config = bench.base_config()
    plan = bench.plan_inputs(config, 65536)
    per_layer = 4 * 768**2 + 2 * 768 * 3072
    matmuls = 6.0 * per_layer * (2 * 65536 + 4 * 65536)  # every token: 2 stack layers, then 4 fusion layers
    # audio: conv 1 -> 768 at (F/2, 40), conv 768 -> 768 at (F/4, 20), projection 768 * 20 -> 768 per token
    frames = 1 + plan.audio_samples // 160
    audio = 4 * 768 * 9 * -(-frames // 2) * 40 + 6 * 768**2 * 9 * -(-frames // 4) * 20
    audio += 6 * 768 * 20 * 768 * plan.audio_tokens
    video = 4 * 3 * 2 * 32**2 * 768 * plan.video_tokens
    assert bench.encoder_flops(config, plan) == audio + video
    fwdbwd_per_pair = 3.5 * 4 * 64
    dense = bench.step_flops(config, plan, "dense-fusion", 1)
    stack_pairs = sum(
        2 * bench.attention_bench.count_pairs(n, [2048, 4096, 8192], [1, 2, 4], 12)
        for n in plan.tokens().values()
    )
    fusion_pairs = 4 * 12 * 65536**2
    assert dense == pytest.approx(matmuls + audio + video + fwdbwd_per_pair * (stack_pairs + fusion_pairs))
    dilated = bench.step_flops(config, plan, "dilated", 2)
    assert 2 * (matmuls + audio + video) < dilated < 2 * dense


def test_dry_run_plans_every_kind_at_every_size(tmp_path, capsys):
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    planned = re.findall(r"(dilated|dense-fusion)\s+L=\s*(\d+) \(text (\d+), audio (\d+).*planned", out)
    assert [(kind, int(n)) for kind, n, _, _ in planned] == [
        (kind, n) for n in (16384, 65536, 262144) for kind in ("dilated", "dense-fusion")
    ]
    assert ("dilated", "16384", "1661", "7373") in planned
    assert "6 configurations" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_out_of_memory_retries_with_checkpointing_then_records_oom(tmp_path, monkeypatch):
    calls = []

    def fake_measure(config, plan, kind, batch, checkpointing, steps, device):
        calls.append((kind, plan.target, checkpointing))
        if kind == "dense-fusion" and (not checkpointing or plan.target >= 512):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return bench.Measurement([10.0, 30.0, 20.0], 2.7, None)

    monkeypatch.setattr(bench, "measure_config", fake_measure)
    args = bench.parse_args(["--device", "cpu", "--tiny", "--sizes", "256", "512", "1024"])
    sweep = bench.Sweep(args, {}, tmp_path / "multimodal_t.json", dry_run=False)
    bench.longnet_bench.run_sweep(sweep, args.sizes, args.kinds)
    rows = {(r.kind, r.target): r for r in sweep.rows}
    assert calls == [
        ("dilated", 256, False), ("dense-fusion", 256, False), ("dense-fusion", 256, True),
        ("dilated", 512, False), ("dense-fusion", 512, True), ("dilated", 1024, False),
    ]  # fmt: skip
    dense = rows["dense-fusion", 256]
    assert dense.status == "ok" and dense.checkpointing is True
    assert dense.oom_without_checkpointing.startswith("OutOfMemoryError: CUDA out of memory")
    assert dense.ms == 20.0 and dense.tokens_per_s == pytest.approx(256 / 0.020)
    assert rows["dilated", 256].ratio == pytest.approx(1.0)  # the same fake time for both kinds
    assert rows["dense-fusion", 512].status == "oom" and rows["dilated", 512].ratio is None
    assert rows["dense-fusion", 1024].status == "skipped"
    saved = json.loads((tmp_path / "multimodal_t.json.tmp").read_text())["rows"]
    assert [r["status"] for r in saved] == ["ok", "ok", "ok", "oom", "ok", "skipped"]
    assert saved[0]["tokens"] == {"text": 25, "audio": 115, "video": 116}


def test_plot_only_redraws_png_from_synthetic_json(tmp_path, capsys):
    def row(kind, n, ms, status="ok", checkpointing=False):
        ok = status == "ok"
        text, audio = n // 10, round(0.45 * n)
        return {
            "kind": kind, "n": n, "target": n, "batch": 1, "status": status, "flops": 1e13,
            "checkpointing": checkpointing, "ms": ms if ok else None,
            "tokens_per_s": n / (ms / 1e3) if ok else None, "tflops": 1e13 / ms / 1e9 if ok else None,
            "peak_gib": n / 8192 if ok else None, "loss": 2.7 if ok else None, "runs": 5 if ok else 0,
            "tokens": {"text": text, "audio": audio, "video": n - text - audio}, "future_field": 1,
        }  # fmt: skip

    rows = [
        row("dilated", 16384, 100.0), row("dense-fusion", 16384, 120.0),
        row("dilated", 65536, 400.0), row("dense-fusion", 65536, 1600.0),
        row("dilated", 262144, 2000.0, checkpointing=True), row("dense-fusion", 262144, 0, "oom", True),
    ]  # fmt: skip
    meta = {"device": "synthetic", "device_memory_gib": 79.1, "model": {"d_model": 768}, "mix": bench.MIX}
    path = tmp_path / "multimodal_synthetic.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    assert bench.main(["--plot-only", str(path)]) == 0
    png = tmp_path / "multimodal_synthetic.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| dilated | 65,536 | 6,553 | 29,491 | 29,492 | no | 400.0 | 163,840 | 25.0 | 8.0 | 4.00 |" in out
    assert "| dense-fusion | 262,144 | 26,214 | 117,965 | 117,965 | - | oom | - | - | - | - |" in out
    assert "text 10% / audio 45% / video 45%" in out


def test_audio_conv_channels_option_shrinks_the_audio_front_end():
    args = bench.parse_args(["--audio-conv-channels", "256"])
    config = bench.make_config(args)
    assert config.audio.conv_channels == 256 and config.audio.embed_dim == 768
    plan = bench.plan_inputs(config, 16384)
    assert plan == bench.plan_inputs(bench.base_config(), 16384)  # the token arithmetic does not change
    # the 768 -> 768 convolution dominates: 3x fewer channels in and out = 9x fewer of its FLOPs
    ratio = bench.encoder_flops(bench.base_config(), plan) / bench.encoder_flops(config, plan)
    assert 5 < ratio < 9


def test_kernel_fallbacks_are_recorded_and_forgotten_between_configurations(tmp_path, monkeypatch):
    from mmlongnet.attention import kernels

    message = "dilated_attention: the cudnn kernel refused a forward call of shape (1, 2); using the next"

    def fake_time_steps(step, device, steps):
        assert not kernels.SELECTOR.refusals  # what an earlier configuration's kernels refused is forgotten
        kernels.SELECTOR.refusals[("cudnn", "forward", (1, 2))] = 1
        warnings.warn(message, stacklevel=1)
        return [3.0, 1.0, 2.0], 2.7

    monkeypatch.setattr(bench.longnet_bench, "time_steps", fake_time_steps)
    monkeypatch.setattr(kernels, "SELECTOR", kernels.KernelSelector())
    kernels.SELECTOR.refusals[("cudnn", "forward", (3, 4))] = 1
    args = bench.parse_args(["--device", "cpu", "--tiny", "--sizes", "256"])
    sweep = bench.Sweep(args, {}, tmp_path / "multimodal_t.json", dry_run=False)
    bench.longnet_bench.run_sweep(sweep, args.sizes, args.kinds)
    assert [(r.kind, r.status, r.ms) for r in sweep.rows] == [
        ("dilated", "ok", 2.0),
        ("dense-fusion", "ok", 2.0),
    ]
    assert all(r.kernel_fallbacks == [message] for r in sweep.rows)
