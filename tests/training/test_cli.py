"""The command line explains itself (field docstrings in --help, errors that end with the key), and
configs/manifest.yaml trains on a manifest with media settings taken from the model, writing
everything under default_root_dir."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from mmlongnet.models import MMLongNetConfig
from mmlongnet.training import CLI, ManifestDataModule, RunCheckpoint

REPO = Path(__file__).resolve().parents[2]


def _exit(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        CLI(args=args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_shows_a_config_fields_docstring(capsys):
    code, out, _ = _exit(["fit", "--model.help", "mmlongnet.training.MultimodalClassifier"], capsys)
    assert code == 0
    assert "--model.model.d_model" in out
    assert "E, the width of every token" in " ".join(out.split())  # MMLongNetConfig.d_model's docstring


@pytest.mark.parametrize(
    "override, key",
    [({"model": {"init_args": {"model": {"d_modl": 8}}}}, "d_modl"),
     ({"model": {"init_args": {"num_classs": 3}}}, "num_classs")],
)  # fmt: skip
def test_a_typo_in_a_config_key_ends_the_error_with_the_line_naming_it(override, key, tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(override))
    code, _, err = _exit(["fit", "--config", str(REPO / "configs/demo.yaml"), "--config", str(typo)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert key in lines[-1] and lines[-1].startswith("error:")
    assert "usage:" not in err


def test_a_class_that_refuses_its_arguments_ends_the_error_with_its_message(capsys):
    code, _, err = _exit(
        ["fit", "--config", str(REPO / "configs/demo.yaml"), "--model.init_args.compile", "true",
         "--model.init_args.graphed", "true"],
        capsys,
    )  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == [
        "fit: the configuration does not build (mmlongnet.training.MultimodalClassifier)",
        "error: graphed=True records the eager model's steps; leave compile off with it",
    ]
    code, _, err = _exit(
        ["fit", "--config", str(REPO / "configs/demo.yaml"), "--data.init_args.train_question_mix",
         "{count: 0.5}"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        "fit: the configuration does not build (mmlongnet.training.AVDigitsDataModule)",
        "error: train_question_mix: question_mix values must sum to 1, got {'count': 0.5} (sum 0.5)",
    ]


def test_options_are_not_abbreviated(capsys):
    code, _, err = _exit(
        ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.max_epoch", "1"], capsys
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: unrecognized arguments: --trainer.max_epoch 1"


def test_manifest_media_settings_follow_the_model_unless_given():
    config = MMLongNetConfig.tiny()
    config.video.in_chans = 1
    data = ManifestDataModule(train="x.jsonl")
    media = data.media_settings(config)
    assert media == {"sample_rate": config.audio.sample_rate, "frame_size": config.video.image_size,
                     "channels": 1, "frame_rate": None}  # fmt: skip
    assert ManifestDataModule(train="x.jsonl").media_settings(None)["channels"] == 3
    with pytest.raises(ValueError, match="channels=3, but the model's video.in_chans is 1"):
        ManifestDataModule(train="x.jsonl", channels=3).media_settings(config)


def test_manifest_config_fits_and_predicts_with_class_names_under_default_root_dir(
    tmp_path, capsys, monkeypatch
):
    """configs/manifest.yaml on the example manifest (wav, flac, mp4, PNG frames and text files made
    by data/example_manifest/make_example.py), grey frames through the model's in_chans alone."""
    shutil.copytree(REPO / "data" / "example_manifest", tmp_path / "data" / "example_manifest")
    monkeypatch.chdir(tmp_path)  # the config's manifest paths are relative
    root = tmp_path / "run"
    common = ["--config", str(REPO / "configs/manifest.yaml"), "--trainer.default_root_dir", str(root),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--model.init_args.model.video.in_chans", "1"]  # fmt: skip
    cli = CLI(args=["fit", *common, "--trainer.max_epochs", "2"])
    assert cli.trainer.global_step == 4  # 5 samples, batches of 4
    assert cli.datamodule.datasets["train"].channels == 1  # linked to the model's video.in_chans
    assert (root / "checkpoints" / "last.ckpt").is_file() and list(root.glob("lightning_logs/*/metrics.csv"))
    capsys.readouterr()
    CLI(args=["predict", *common, "--ckpt_path", "last"])
    written = root / "predictions.jsonl"
    assert f"predictions: {written}" in capsys.readouterr().out
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["id"] for r in records] == [
        "text-only",
        "tone-and-text",
        "frame-folder",
        "mp4-and-flac",
        "line-5",
    ]
    classes = ["red", "green", "blue"]
    for record in records:
        assert record["prediction_name"] == classes[record["prediction"]]
        if "label" in record:
            assert record["label_name"] == classes[record["label"]]
    assert "label" not in records[-1]
    # a new process (here: a new CLI) finds the run's best checkpoint by name
    best = root / "checkpoints" / "best.ckpt"
    assert best.is_file()
    cli = CLI(args=["predict", *common, "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == str(best.resolve())


def test_ckpt_path_best_without_a_run_says_what_to_pass(tmp_path, capsys):
    root = tmp_path / "no_run"
    code, _, err = _exit(
        ["test", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(root),
         "--ckpt_path", "best"],
        capsys,
    )  # fmt: skip
    assert code != 0
    message = str(code) + err
    assert f"no best checkpoint at {root.resolve() / 'checkpoints' / 'best.ckpt'}" in message
    assert "Run `fit` with this config first" in message


@pytest.mark.parametrize(
    "options",
    [{"monitor": None, "filename": "best"}, {"monitor": "val_loss", "filename": "{epoch}-{val_loss:.2f}"}],
)
def test_ckpt_path_best_needs_a_monitor_and_a_fixed_file_name(options, tmp_path):
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="needs a RunCheckpoint with a `monitor` and a fixed `filename`"):
        RunCheckpoint(**options).find_best(trainer)
    found = RunCheckpoint(monitor="val_loss", filename="best")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")
    assert (
        found.find_best(trainer)
        == found.best_model_path
        == str((tmp_path / "checkpoints" / "best.ckpt").resolve())
    )


def test_a_gpu_config_without_a_gpu_says_how_to_run_it(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, _ = _exit(["fit", "--config", str(REPO / "configs/avdigits_k16.yaml")], capsys)
    assert "the config asks for a GPU (trainer.accelerator: gpu)" in str(code)
    assert "--trainer.accelerator cpu --trainer.precision 32-true" in str(code)
