"""The digits curriculum: its order of batches, its settings' errors, and a fit through the CLI
whose stages end by the training loss (`DigitsCurriculum`, `CurriculumOrder`, `AdvanceCurriculum`)."""

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from mmlongnet.data.avdigits import AVDigitsConfig
from mmlongnet.training import (
    CLI,
    AdvanceCurriculum,
    AVDigitsDataModule,
    DigitsCurriculum,
    ManifestDataModule,
)
from mmlongnet.training.data import CurriculumBatches, CurriculumOrder, ResumableLoader, draw_stage

REPO = Path(__file__).resolve().parents[2]


def _order(seed: int = 3, rank: int = 0, num_replicas: int = 1) -> CurriculumOrder:
    batches = CurriculumBatches([list(range(10)), list(range(20)), list(range(30))], [list, list, list])
    return CurriculumOrder(batches, [2, 3, 4], 40, num_replicas=num_replicas, rank=rank, seed=seed)


def test_the_order_draws_the_active_stages_and_replays_from_its_stage_starts():
    order = _order()
    order.set_epoch(1)
    items = iter(order)
    first = [next(items) for _ in range(10)]
    assert all(k == 0 for k, _ in first)  # one stage active
    for _, indices in first:
        assert len(indices) == 2 and len(set(indices)) == 2 and all(0 <= i < 10 for i in indices)
    order.advance(47)  # with item 47 in training: stage 1 from the next item drawn, 50, on
    rest = list(items)
    assert order.stage_starts == [50] and len(first) + len(rest) == 40
    assert {k for k, _ in rest} == {0, 1}
    for k, indices in rest:
        assert len(indices) == [2, 3][k] and len(set(indices)) == len(indices)
        assert all(0 <= i < [10, 20][k] for i in indices)
    whole = first + rest

    resumed = _order()  # a resumed run: the stages and the place in the epoch from a checkpoint
    resumed.set_epoch(1)
    resumed.stage_starts, resumed.start = [50], 7
    assert list(resumed) == whole[7:]
    assert list(resumed) == whole  # `start` holds for one iteration only
    assert resumed.stage_of(55) == resumed.draw(55)[0] == whole[15][0]

    loader = ResumableLoader(order.dataset, lambda: 7, order=_order(), batch_size=None, collate_fn=list)
    state = loader.state_dict()
    assert state["stage_starts"] == [] and state["batches"] == 7
    del state["stage_starts"]  # a checkpoint of a run without a curriculum: its stages start afresh
    loader.sampler.stage_starts = [3]
    loader.load_state_dict(state)
    assert loader.sampler.stage_starts == [] and loader.sampler.start == 7

    other_rank = _order(rank=1, num_replicas=2)
    other_rank.set_epoch(1)
    assert list(other_rank)[:10] != first
    order.advance(70)  # the epoch was drawn to its end: from the next one on
    order.advance(75)  # past the last stage: nothing
    assert order.stage == 2 and order.stage_starts == [50, 80]

    ahead = CurriculumOrder(order.dataset, [2, 3, 4], 40, lookahead=5, seed=3)  # a loader with workers
    ahead.set_epoch(1)
    items = iter(ahead)
    next(items), next(items), next(items)
    ahead.advance(41)  # items 40-42 drawn, 41 in training: up to 46 may be drawn already
    assert ahead.stage_starts == [47]


def test_the_newest_stage_takes_its_share_of_the_batches():
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    assert [draw_stage(rng, 3) for _ in range(50)] == [int(twin.integers(3)) for _ in range(50)]
    assert {draw_stage(rng, 1, 0.75) for _ in range(50)} == {0}
    counts = np.bincount([draw_stage(rng, 3, 0.75) for _ in range(8000)], minlength=3) / 8000
    assert counts[2] == pytest.approx(0.75, abs=0.02)
    assert counts[0] == pytest.approx(0.125, abs=0.02) and counts[1] == pytest.approx(0.125, abs=0.02)
    assert {draw_stage(rng, 2, 1.0) for _ in range(50)} == {1}

    batches = CurriculumBatches([list(range(10)), list(range(20))], [list, list])
    order = CurriculumOrder(batches, [2, 3], 4000, newest_share=0.9, seed=1)
    order.set_epoch(0)
    items = iter(order)
    assert {next(items)[0] for _ in range(100)} == {0}
    order.advance(99)
    stages = np.array([k for k, _ in items])
    assert stages.mean() == pytest.approx(0.9, abs=0.02)
    uniform = CurriculumOrder(batches, [2, 3], 4000, seed=1)
    uniform.stage_starts = [101]
    assert np.array([uniform.stage_of(g) for g in range(101, 4000)]).mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_digits": []}, "non-empty increasing"),
        ({"num_digits": [8, 4]}, "non-empty increasing"),
        ({"num_digits": [0, 4]}, "non-empty increasing"),
        ({"num_digits": [4], "batch_sizes": [8]}, "batch_sizes must hold 2"),
        ({"num_digits": [4], "batch_sizes": [8, 0]}, "batch_sizes must hold 2"),
        ({"num_digits": [4], "advance_loss": -1.0}, "advance_loss"),
        ({"num_digits": [4], "window": 0}, "window"),
        ({"num_digits": [4], "reads": 0}, "reads"),
        ({"num_digits": [4], "max_stage_steps": 0}, "max_stage_steps"),
        ({"num_digits": [4], "advance_loss": None}, "advance_loss, max_stage_steps or both"),
        ({"num_digits": [4], "newest_share": 0.0}, "newest_share"),
        ({"num_digits": [4], "newest_share": 1.5}, "newest_share"),
        ({"num_digits": [4], "newest_share": True}, "newest_share"),
    ],
)
def test_curriculum_settings_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsCurriculum(**kwargs)


def test_the_data_module_checks_its_curriculum_and_batches_one_k_at_a_time():
    with pytest.raises(ValueError, match="must stay below the dataset's num_digits"):
        AVDigitsDataModule(AVDigitsConfig(num_digits=4), curriculum=DigitsCurriculum([2, 4]))
    with pytest.raises(ValueError, match='curriculum stage of 1 digits: questions includes "after"'):
        AVDigitsDataModule(AVDigitsConfig(num_digits=4), curriculum=DigitsCurriculum([1]))
    torch.manual_seed(0)  # the loaders' seed: torch's initial seed
    module = AVDigitsDataModule(
        AVDigitsConfig(num_digits=4), train_examples=64, batch_size=4,
        curriculum=DigitsCurriculum([2], batch_sizes=[6, 4]),
    )  # fmt: skip
    module.setup("fit")
    assert module.stage_digits == [2, 4]
    loader = module.train_dataloader()  # no trainer: nothing checks for the callback
    order = module.curriculum_order
    assert order is loader.sampler and len(loader) == 64 // 4
    batches = iter(loader)
    for _ in range(3):
        batch = next(batches)
        assert len(batch) == 6 and batch.lengths["video"].max() <= 2  # K = 2: two frames at most
    order.advance(2)  # item 2 in training (the loader drew up to 2): stage 1 from item 2 + 1 + 1 on
    assert order.stage_starts == [4]
    seen = set()
    for item, batch in enumerate(batches, start=3):
        k = order.stage_of(item)
        seen.add(k)
        assert len(batch) == [6, 4][k] and int(batch.lengths["video"].max()) <= [2, 4][k]
    assert seen == {0, 1}

    workers = AVDigitsDataModule(
        AVDigitsConfig(num_digits=4), train_examples=24, batch_size=4, num_workers=2,
        curriculum=DigitsCurriculum([2], batch_sizes=[6, 4]),
    )  # fmt: skip
    workers.setup("fit")
    single = AVDigitsDataModule(
        AVDigitsConfig(num_digits=4), train_examples=24, batch_size=4,
        curriculum=DigitsCurriculum([2], batch_sizes=[6, 4]),
    )  # fmt: skip
    single.setup("fit")
    for a, b in zip(workers.train_dataloader(), single.train_dataloader(), strict=True):  # batches made in
        assert a.ids == b.ids and torch.equal(a.inputs["text"], b.inputs["text"])  # worker processes alike

    both = AVDigitsConfig(num_digits=4, modality_mix={"both": 1.0})  # (a batch lacking a modality differs)
    one_shape = AVDigitsDataModule(
        both, train_examples=64, batch_size=4, buckets="one_shape",
        curriculum=DigitsCurriculum([2], batch_sizes=[6, 4]),
    )  # fmt: skip
    one_shape.setup("fit")
    shapes = {}
    for item, batch in zip(range(24), one_shape.train_dataloader(), strict=False):
        k = one_shape.curriculum_order.stage_of(item)
        shape = tuple((name, tuple(x.shape)) for name, x in sorted(batch.inputs.items()))
        shapes.setdefault(k, set()).add(shape)
        if item == 5:
            one_shape.curriculum_order.advance(item)
    assert set(shapes) == {0, 1} and all(len(seen) == 1 for seen in shapes.values())  # one shape per K
    with pytest.raises(ValueError, match='buckets must be LengthBuckets, "one_shape" or None'):
        AVDigitsDataModule(buckets="per_k")

    module.trainer = pl.Trainer(callbacks=[], logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="add `- class_path: mmlongnet.training.AdvanceCurriculum`"):
        module.train_dataloader()


def _fit(tmp_path: Path, curriculum: dict, max_steps: int) -> CLI:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["trainer"].update(
        default_root_dir=str(tmp_path), max_epochs=1, max_steps=max_steps, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    config["trainer"]["callbacks"].append({"class_path": "mmlongnet.training.AdvanceCurriculum"})
    config["data"]["init_args"].update(train_examples=96, val_examples=8, batch_size=8, curriculum=curriculum)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(config))
    return CLI(args=["fit", "--config", str(path)])


def _logged(tmp_path: Path, name: str) -> list[tuple[int, float]]:
    rows = csv.DictReader((tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines())
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


def test_a_fit_ends_its_stages_by_the_training_loss(tmp_path, caplog):
    """Window 3, 2 reads: a loss below 100 (always) ends the first stage after 6 steps; a loss
    below 1e-3 (never, at chance) keeps it to the end."""
    caplog.set_level(logging.INFO)
    cli = _fit(tmp_path / "a", {"num_digits": [2], "advance_loss": 100.0, "window": 3, "reads": 2}, 9)
    assert "curriculum: K = 4 joins at step 6" in caplog.text
    order = cli.datamodule.curriculum_order
    assert order.stage_starts == [7]  # item 5 trained at step 6, item 6 drawn (Lightning's prefetch)
    digits = dict(_logged(tmp_path / "a", "curriculum_digits"))
    assert digits[2] == 2.0 and digits[8] == 4.0
    losses = dict(_logged(tmp_path / "a", "train_loss"))
    read = dict(_logged(tmp_path / "a", "curriculum_loss"))  # the mean over steps 0-2, all at K = 2
    assert read[2] == pytest.approx(sum(losses[step] for step in range(3)) / 3, rel=1e-5)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, AdvanceCurriculum))
    assert (callback.steps, callback.below) == (3, 1)

    cli = _fit(tmp_path / "b", {"num_digits": [2], "advance_loss": 1e-3, "window": 3, "reads": 2}, 9)
    assert cli.datamodule.curriculum_order.stage_starts == []
    assert caplog.text.count("joins") == 1  # the first fit's
    assert {value for _, value in _logged(tmp_path / "b", "curriculum_digits")} == {2.0}


def test_a_training_question_mix_applies_to_the_training_split_only():
    with pytest.raises(ValueError, match="train_question_mix: question_mix values must sum to 1"):
        AVDigitsDataModule(AVDigitsConfig(num_digits=4), train_question_mix={"count": 0.5})
    module = AVDigitsDataModule(
        AVDigitsConfig(num_digits=4, questions=["first", "count"]), train_examples=200, val_examples=200,
        test_examples=200, train_question_mix={"first": 0.1, "count": 0.9},
        curriculum=DigitsCurriculum([2]),
    )  # fmt: skip
    module.setup("fit")
    assert module.stage_configs[0].question_mix == {"first": 0.1, "count": 0.9}

    def count_share(dataset) -> float:
        return np.mean([dataset[i]["question"] == "count" for i in range(200)])

    for stage in module.datasets["train"].datasets:  # the curriculum stage (K = 2), then K = 4
        assert count_share(stage) > 0.8
    for split in ("val", "test"):
        assert 0.35 < count_share(module.datasets[split]) < 0.65  # the dataset's uniform mix


def test_the_data_modules_collate_media_in_the_dtype_named():
    torch.manual_seed(0)
    batches = {}
    for name in ("float32", "float16"):
        module = AVDigitsDataModule(
            AVDigitsConfig(num_digits=4, modality_mix={"both": 1.0}), train_examples=8, batch_size=4,
            curriculum=DigitsCurriculum([2]), media_dtype=name,
        )  # fmt: skip
        module.setup("fit")
        batches[name] = next(iter(module.train_dataloader()))
    for modality in ("audio", "video"):
        full, half = batches["float32"].inputs[modality], batches["float16"].inputs[modality]
        assert full.dtype == torch.float32 and half.dtype == torch.float16
        assert torch.equal(half, full.half())  # the same batch, rounded once
    with pytest.raises(ValueError, match=r"media_dtype must be one of \['float32', 'float16'\], got 'int8'"):
        AVDigitsDataModule(media_dtype="int8")
    with pytest.raises(ValueError, match="media_dtype must be one of"):
        ManifestDataModule(train="x.jsonl", media_dtype="bfloat16")
    assert ManifestDataModule(train="x.jsonl", media_dtype="float16").collate_fn.keywords["media_dtype"] == (
        torch.float16
    )
