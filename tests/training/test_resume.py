"""Resuming and checkpoint writes: a fit killed mid-epoch and resumed with `--ckpt_path last` ends
bit-identical to an uninterrupted one; a kill during a checkpoint write leaves the previous one
loadable; the training order resumes part-way through an epoch."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmlongnet.training.checkpoint import TEMPORARY_SUFFIX, atomic_save
from mmlongnet.training.data import ResumableShuffle

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def test_the_training_order_resumes_part_way_through_an_epoch_and_splits_over_ranks():
    data = list(range(23))
    full = ResumableShuffle(data, seed=5)
    full.set_epoch(3)
    order = list(full)
    assert sorted(order) == data and order != data
    resumed = ResumableShuffle(data, seed=5)
    resumed.set_epoch(3)
    resumed.start = 8
    assert list(resumed) == order[8:]
    assert list(resumed) == order  # `start` holds for one iteration only
    ranks = [ResumableShuffle(data, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert sorted(set(list(ranks[0]) + list(ranks[1]))) == data


def _fit(config: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config),
               "--trainer.default_root_dir", str(root), *extra]  # fmt: skip
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}  # fmt: skip
    return subprocess.run(command, cwd=root.parent, capture_output=True, text=True, timeout=240, env=env)


def _last_val_row(root: Path) -> dict:
    rows = []
    for metrics in sorted(root.glob("lightning_logs/version_*/metrics.csv")):
        rows += [row for row in csv.DictReader(metrics.read_text().splitlines()) if row.get("val_loss")]
    return rows[-1]


# stages end after 3 loss reads of 2 steps each: K = 3 joins after step 6, K = 4 after step 12, so
# the checkpoint of step 8 holds a stage begun and a read of the next one
CURRICULUM = {"num_digits": [2, 3], "advance_loss": 100.0, "window": 2, "reads": 3}


@pytest.mark.parametrize("curriculum", [None, CURRICULUM], ids=["plain", "curriculum"])
def test_a_fit_killed_mid_epoch_resumes_with_ckpt_path_last_bit_identical(tmp_path, curriculum):
    """configs/demo.yaml on 48 examples (6 steps an epoch), 2 epochs, last.ckpt every 4 steps; one
    run is SIGKILLed after step 10 (last.ckpt from step 8: 2 batches into epoch 1) and resumed;
    also with a digits curriculum whose stages end by the training loss."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_epochs=2, max_time=None, enable_progress_bar=False, enable_model_summary=False)
    for callback in trainer["callbacks"]:
        if "every_n_train_steps" in callback.get("init_args", {}):
            callback["init_args"]["every_n_train_steps"] = 4
    config["data"]["init_args"].update(train_examples=48, val_examples=16, batch_size=8)
    if curriculum is not None:
        config["data"]["init_args"]["curriculum"] = curriculum
        trainer["callbacks"].append({"class_path": "mmlongnet.training.AdvanceCurriculum"})
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(config))
    trainer["callbacks"].append({"class_path": "kill_at_step.KillAtStep", "init_args": {"step": 10}})
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(config))

    uninterrupted = _fit(plain, tmp_path / "a")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    interrupted = _fit(killed, tmp_path / "b")
    assert interrupted.returncode == -signal.SIGKILL, interrupted.stderr[-3000:]
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 8 and saved["epoch"] == 1  # mid-epoch
    if curriculum is not None:
        assert len(saved["AVDigitsDataModule"]["train_loader"]["stage_starts"]) == 1
    resumed = _fit(plain, tmp_path / "b", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert "not resumable" not in resumed.stderr

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    moments_a = a["optimizer_states"][0]["state"]
    moments_b = b["optimizer_states"][0]["state"]
    for key, state in moments_a.items():
        assert torch.equal(state["exp_avg_sq"], moments_b[key]["exp_avg_sq"])
    row_a, row_b = _last_val_row(tmp_path / "a"), _last_val_row(tmp_path / "b")
    assert (row_a["step"], row_a["val_loss"], row_a["val_acc"]) == (
        row_b["step"],
        row_b["val_loss"],
        row_b["val_acc"],
    )
    assert (tmp_path / "b" / "checkpoints" / "best.ckpt").is_file()
    if curriculum is not None:
        starts = [c["AVDigitsDataModule"]["train_loader"]["stage_starts"] for c in (a, b)]
        assert starts[0] == starts[1] and len(starts[0]) == 2


_WRITER = """
import sys, torch
from mmlongnet.training.checkpoint import atomic_save
path, round_ = sys.argv[1], 0
while True:
    round_ += 1
    atomic_save({"round": round_, "weights": torch.full((4_000_000,), float(round_))}, path)
"""


def test_a_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, with TMPDIR elsewhere; the
    checkpoint stays whole every time, and the next save removes the killed write's temporary."""
    folder, elsewhere = tmp_path / "checkpoints", tmp_path / "tmpdir"
    elsewhere.mkdir()
    path = folder / "last.ckpt"
    atomic_save({"round": 0, "weights": torch.zeros(4_000_000)}, path)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "TMPDIR": str(elsewhere)}  # fmt: skip
    for attempt in range(4):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
        start = path.stat().st_mtime_ns
        deadline = time.monotonic() + 60
        while path.stat().st_mtime_ns == start and time.monotonic() < deadline:
            time.sleep(0.01)  # the writer has replaced the checkpoint at least once
        time.sleep(0.013 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["weights"].shape == (4_000_000,)
        assert torch.equal(checkpoint["weights"], torch.full_like(checkpoint["weights"], checkpoint["round"]))
    assert not [p for p in elsewhere.rglob("*") if "ckpt" in p.name]  # no checkpoint went through TMPDIR
    atomic_save({"round": -1}, path)
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # temporaries of killed writes removed
    assert not list(folder.glob(f"*{TEMPORARY_SUFFIX}"))


def test_fast_dev_run_leaves_no_checkpoint(tmp_path):
    """A trial run (`--trainer.fast_dev_run true`) writes no last.ckpt, at its end either."""
    import lightning.pytorch as pl

    from mmlongnet.training.checkpoint import RunCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    for fast_dev_run in (True, False):
        root = tmp_path / f"fast_dev_run_{fast_dev_run}"
        trainer = pl.Trainer(
            default_root_dir=root, fast_dev_run=fast_dev_run, max_steps=2, logger=False,
            callbacks=[RunCheckpoint(save_last=True)], enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(Tiny(), data)
        assert (root / "checkpoints" / "last.ckpt").exists() is not fast_dev_run
