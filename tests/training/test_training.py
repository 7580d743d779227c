"""Training: the optimizer schedule, the classifier's pooling and predictions, every config
through the CLI, and short end-to-end fits (demo task, byte LM, a manifest)."""

import copy
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from devices import DEVICES

from mmlongnet.data.collate import collate_samples
from mmlongnet.models import LongNetLM, MMLongNetConfig
from mmlongnet.training import CLI, LanguageModel, MultimodalClassifier, OptimizerConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# configs that hold only what differs from a base config, given after it: `--config base --config overlay`
OVERLAYS = {"sp_cpu.yaml": "demo.yaml"}


def test_schedule_warms_up_then_decays_to_the_floor():
    config = OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert config.factor(0, 110) == pytest.approx(0.1)
    assert config.factor(9, 110) == pytest.approx(1.0)
    assert config.factor(60, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert config.factor(110, 110) == pytest.approx(0.1)
    linear = dataclasses.replace(config, schedule="linear", min_lr_ratio=0.0)
    assert linear.factor(35, 110) == pytest.approx(0.75)
    assert dataclasses.replace(config, schedule="constant").factor(100, 110) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lr": 0.0}, "lr must be positive"), ({"warmup_steps": -1}, "warmup_steps must be an int"),
     ({"schedule": "step"}, "schedule must be"), ({"betas": (0.9, 1.0)}, "betas must be")],
)  # fmt: skip
def test_optimizer_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_the_optimizer_is_fused_adamw_with_the_reference_update():
    """One fused AdamW step (decay and no-decay groups) equals the per-parameter AdamW's."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin = copy.deepcopy(module)
    config = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    optimizer = config.build(module, total_steps=10)["optimizer"]
    assert optimizer.defaults["fused"] is True
    groups = [
        {"params": [twin[0].weight], "weight_decay": 0.1},
        {"params": [twin[0].bias, *twin[1].parameters()], "weight_decay": 0.0},
    ]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=config.betas, foreach=False)
    for _ in range(3):
        for model, opt in ((module, optimizer), (twin, reference)):
            model(torch.ones(2, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(module.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _clipping_module(scaler=None) -> tuple[LanguageModel, torch.optim.Optimizer, list[torch.Tensor]]:
    """A tiny LanguageModel with its fused AdamW and known gradients (norm 13), attached to a
    stand-in trainer whose precision plugin has `scaler`; with a scaler the gradients are scaled."""
    module = LanguageModel(LongNetLM(num_tokens=8, d_model=8, nhead=2, num_layers=1, dim_feedforward=8,
                                     segment_lengths=[4], dilation_rates=[1]))  # fmt: skip
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    optimizer = module.optimizer_config.build(module, 10)["optimizer"]
    if scaler is not None:
        scaler.scale(torch.ones(()))  # as the scaled loss would: the scaler's state begins
    grads = []
    for index, parameter in enumerate(module.parameters()):
        grad = torch.zeros_like(parameter)
        grad.view(-1)[0] = {0: 5.0, 1: -12.0}.get(index, 0.0)  # the total norm: 13
        grads.append(grad)
        parameter.grad = grad * (scaler.get_scale() if scaler is not None else 1.0)
    return module, optimizer, grads


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_works_with_the_fused_optimizer_in_bf16_and_fp16(algorithm):
    """Lightning's mixed-precision plugins refuse to clip for a fused optimizer; the modules clip
    themselves: the true gradients (fp16: unscaled first, and the step knows it) to the limit."""
    module, optimizer, grads = _clipping_module()
    module.configure_gradient_clipping(optimizer, 2.6, algorithm)
    clipped = [p.grad for p in module.parameters()]
    if algorithm == "norm":  # scaled by 2.6 / 13
        expected = [g * 0.2 for g in grads]
    else:
        expected = [g.clamp(-2.6, 2.6) for g in grads]
    for got, want in zip(clipped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    module, optimizer, grads = _clipping_module(scaler)
    module.configure_gradient_clipping(optimizer, 2.6, algorithm)
    for got, want in zip([p.grad for p in module.parameters()], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    before = [p.detach().clone() for p in module.parameters()]
    scaler.step(optimizer)  # no second unscaling of the gradients
    scaler.update()
    twin, twin_optimizer, _ = _clipping_module()
    for parameter, original, grad in zip(twin.parameters(), before, expected, strict=True):
        parameter.data.copy_(original)
        parameter.grad = grad.clone()
    twin_optimizer.step()
    for a, b in zip(module.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_the_demo_trains_in_bf16_mixed_precision_with_gradient_clipping(device, tmp_path):
    """The GPU configs' setting (bf16-mixed, gradient_clip_val 1.0, fused AdamW)."""
    cli = run_cli(
        "fit", "--config", config_in(tmp_path, "demo.yaml"), "--trainer.precision", "bf16-mixed",
        "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
        "--trainer.max_steps", "2", "--data.init_args.train_examples", "16",
        "--data.init_args.val_examples", "8", "--data.init_args.batch_size", "8",
    )  # fmt: skip
    assert cli.trainer.global_step == 2 and cli.trainer.gradient_clip_val == 1.0
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_multiway_stacks_decay_as_one_expert_s_parameter_would():
    from mmlongnet.layers import MultiwayNetwork

    linear, norm = MultiwayNetwork(torch.nn.Linear(4, 3), 3), MultiwayNetwork(torch.nn.LayerNorm(3), 3)
    module = torch.nn.Sequential(linear, norm, torch.nn.Linear(3, 2))
    optimizer = OptimizerConfig(weight_decay=0.1).build(module, total_steps=10)["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module[0].experts.weight), id(module[2].weight)}
    assert len(no_decay["params"]) == 4  # the stacked bias (3, 3), LayerNorm gains and biases (3, 3), bias


def small_batch(model):
    inputs, lengths = model.model.example_inputs(3, seed=1)
    samples = []
    for row in range(3):
        samples.append({
            "id": f"s{row}", "text": "what is the first digit?" if row != 1 else None,
            "audio": inputs["audio"][row, : lengths["audio"][row]],
            "video": inputs["video"][row, : lengths["video"][row]], "label": row,
        })  # fmt: skip
    return collate_samples(samples)


def test_text_pooling_reads_the_fused_text_tokens_and_predictions_name_modalities():
    torch.manual_seed(0)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4, pooling="text").eval()
    batch = small_batch(classifier)
    out = classifier.model(batch.inputs, batch.lengths)
    text = classifier.model.config.modalities.index("text")
    features = classifier.features(batch)
    for row in range(3):
        chosen = (out.modality_ids[row] == text) & ~out.padding_mask[row]
        expected = out.tokens[row, chosen].mean(0) if chosen.any() else out.pooled[row]
        torch.testing.assert_close(features[row], expected)
    assert classifier.last_batch_tokens == int((~out.padding_mask).sum())
    records = classifier.predict_step(batch, 0)
    assert [r["id"] for r in records] == ["s0", "s1", "s2"]
    assert records[1]["modalities"] == ["audio", "video"] and records[0]["label"] == 0
    probabilities = classifier(batch).softmax(-1)
    for row, record in enumerate(records):
        assert record["prediction"] == int(probabilities[row].argmax())
        assert record["probability"] == pytest.approx(float(probabilities[row].max()), abs=1e-6)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_builds_through_the_cli(path, tmp_path):
    base = ["--config", str(path.parent / OVERLAYS[path.name])] if path.name in OVERLAYS else []
    cli = CLI(
        args=[*base, "--config", str(path), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
        run=False,
    )  # fmt: skip
    assert cli.model is not None and cli.datamodule is not None
    assert sum(p.numel() for p in cli.model.parameters()) > 0


@pytest.mark.parametrize("overlay, base", OVERLAYS.items())
def test_an_overlay_config_repeats_nothing_of_its_base(overlay, base):
    """An overlay names no model or data block of its base, and no trainer key with the base's value."""
    config = yaml.safe_load((REPO / "configs" / overlay).read_text())
    under = yaml.safe_load((REPO / "configs" / base).read_text())
    assert not {"model", "data", "seed_everything"} & set(config)
    repeated = [key for key, value in config["trainer"].items() if under["trainer"].get(key) == value]
    assert repeated == []


def run_cli(*args):
    return CLI(args=list(args))


def config_in(tmp_path, name):
    """A copy of configs/<name> writing everything under tmp_path (its default_root_dir: the logger,
    the checkpoints and the predictions follow it)."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_demo_config_fits_tests_and_predicts_end_to_end(tmp_path):
    common = [
        "--config", config_in(tmp_path, "demo.yaml"), "--data.init_args.train_examples", "32",
        "--data.init_args.val_examples", "16", "--data.init_args.test_examples", "16",
        "--data.init_args.predict_examples", "8", "--data.init_args.batch_size", "8",
    ]  # fmt: skip
    cli = run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1")  # 4 steps
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train_loss"])) and 0.0 <= float(metrics["val_acc"]) <= 1.0
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"  # RunCheckpoint: the run's folder
    assert checkpoint.is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert list(tmp_path.glob("lightning_logs/version_0/metrics.csv"))
    assert "lr-AdamW" in (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()  # the LR monitor
    checkpoint = str(checkpoint)
    tested = run_cli("test", *common, "--ckpt_path", checkpoint)
    assert 0.0 <= float(tested.trainer.callback_metrics["test_acc"]) <= 1.0
    run_cli("predict", *common, "--ckpt_path", checkpoint)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and len({line["id"] for line in lines}) == 8
    for line in lines:
        assert set(line) == {"id", "modalities", "prediction", "probability", "label"}
        assert 0 <= line["prediction"] < 10 and 0.0 < line["probability"] <= 1.0 and line["modalities"]


def test_byte_language_model_fits_on_a_text_directory(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"t{i}.txt").write_text(f"line {i}: the quick brown fox jumps over the lazy dog\n" * 10)
    lm = "--model.init_args.model.init_args."
    cli = run_cli(
        "fit", "--config", config_in(tmp_path, "lm_bytes.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.precision", "32-true", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "1", "--data.init_args.root", str(texts),
        "--data.init_args.pattern", "*.txt", "--data.init_args.window", "32",
        "--data.init_args.batch_size", "2", f"{lm}d_model", "32", f"{lm}nhead", "2", f"{lm}num_layers", "1",
        f"{lm}dim_feedforward", "64", f"{lm}segment_lengths", "[8, 16]", f"{lm}dilation_rates", "[1, 2]",
    )  # fmt: skip
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["val_loss"]))


def test_a_manifest_of_mixed_media_trains_through_the_manifest_data_module():
    import lightning.pytorch as pl

    from mmlongnet.training import ManifestDataModule

    manifest = str(REPO / "data" / "example_manifest" / "manifest.jsonl")
    data = ManifestDataModule(
        train=manifest, val=manifest, classes=["red", "green", "blue"], frame_size=16, batch_size=5
    )
    torch.manual_seed(0)
    model = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("model.encoders.audio") for name in changed)
    assert any(name.startswith("model.encoders.video") for name in changed)


def test_prediction_writer_writes_each_sample_once_per_data_parallel_group(tmp_path):
    from types import SimpleNamespace

    from mmlongnet.training import JSONLPredictionWriter

    writer = JSONLPredictionWriter(str(tmp_path / "p.jsonl"))

    def trainer(rank, world, sp=None):
        strategy = SimpleNamespace(sequence_parallel_size=sp) if sp else SimpleNamespace()
        return SimpleNamespace(global_rank=rank, world_size=world, strategy=strategy)

    assert writer.path_for(trainer(0, 1)) == tmp_path / "p.jsonl"
    assert writer.path_for(trainer(1, 2)) == tmp_path / "p.part1.jsonl"
    assert [writer.path_for(trainer(r, 2, sp=2)) for r in range(2)] == [tmp_path / "p.jsonl", None]
    paths = [writer.path_for(trainer(r, 4, sp=2)) for r in range(4)]
    assert paths == [tmp_path / "p.part0.jsonl", None, tmp_path / "p.part1.jsonl", None]
