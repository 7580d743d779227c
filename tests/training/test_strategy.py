"""Sequence parallelism under DDP: the mesh layout, the sampler, the LM's and MMLongNet's sharded
losses and gradients against one process (2 gloo ranks, float64), and a 2-process CLI fit."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DistributedSampler

from mmlongnet.distributed import new_sequence_parallel_groups, parallelize_sequence
from mmlongnet.models import LongNetLM, MMLongNet, MMLongNetConfig
from mmlongnet.training import LanguageModel, SequenceParallelStrategy
from mmlongnet.training.strategy import sequence_parallel_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from distributed_helpers import run_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-10


def test_layout_of_a_world_of_4_with_sequence_parallel_2():
    sequence, data = sequence_parallel_layout(4, 2)
    assert sequence == [[0, 1], [2, 3]] and data == [[0, 2], [1, 3]]
    assert sequence_parallel_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="sequence_parallel_size=3 must divide the world size 4"):
        sequence_parallel_layout(4, 3)
    with pytest.raises(ValueError, match="must be a positive int"):
        SequenceParallelStrategy(sequence_parallel_size=0)


def test_parallelize_refuses_compile_and_the_strategy_a_module_without_parallelize():
    lm = LongNetLM(
        13, d_model=16, nhead=4, num_layers=1, dim_feedforward=32, segment_lengths=[4], dilation_rates=[1]
    )
    with pytest.raises(ValueError, match="compile=True does not run with sequence sharding"):
        LanguageModel(lm, compile=True).parallelize(None)  # before any process group is asked
    strategy = SequenceParallelStrategy(sequence_parallel_size=2)
    strategy.sequence_group = object()
    strategy._lightning_module = torch.nn.Linear(2, 2)  # what `Strategy.connect` sets
    with pytest.raises(TypeError, match="Linear has none"):
        strategy.setup(None)


def test_sampler_gives_sequence_peers_the_same_indices(monkeypatch):
    # `set_global_rank` also sets Lightning's process-wide rank (`rank_zero_only.rank`): put it
    # back afterwards, or later tests in this process would log nothing, as if not rank 0.
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    indices = {}
    for rank in range(4):
        environment = LightningEnvironment()
        environment.set_world_size(4)
        environment.set_global_rank(rank)
        strategy = SequenceParallelStrategy(
            sequence_parallel_size=2, parallel_devices=[torch.device("cpu")] * 4,
            cluster_environment=environment,
        )  # fmt: skip
        kwargs = strategy.distributed_sampler_kwargs
        assert kwargs == {"num_replicas": 2, "rank": rank // 2}
        indices[rank] = list(DistributedSampler(range(20), shuffle=True, seed=3, **kwargs))
    assert indices[0] == indices[1] and indices[2] == indices[3]
    assert sorted(indices[0] + indices[2]) == list(range(20))


def _average_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DDP does: the mean over all ranks of every parameter's gradient."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g / dist.get_world_size()
    return grads


def _lm(rank: int, world: int) -> None:
    torch.manual_seed(0)
    network = LongNetLM(13, d_model=16, nhead=4, num_layers=2, dim_feedforward=32, segment_lengths=[4, 8, 16],
                        dilation_rates=[1, 2, 4], dtype=torch.float64)  # fmt: skip
    module = LanguageModel(network)
    windows = torch.randint(0, 13, (3, 17), generator=torch.Generator().manual_seed(1))  # (B, N + 1), N = 16
    expected = module.training_step(windows, 0)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    module.parallelize(None)  # what SequenceParallelStrategy.setup does
    loss = module.training_step(windows, 0)
    assert module.last_batch_tokens == 3 * 16 // world  # this rank's slice only
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, expected.detach(), rtol=0, atol=TOL)
    assert not torch.allclose(loss, expected)  # a slice's loss, not the full one
    for name, g in _average_grads(module).items():
        torch.testing.assert_close(g, expected_grads[name], rtol=0, atol=TOL, msg=f"grad of {name}")
    with pytest.raises(ValueError, match="cannot be split evenly over P=2 ranks"):
        module.training_step(windows[:, :16], 0)  # N = 15


def _mmlongnet(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny(), dtype=torch.float64)
    unsharded = MMLongNet(MMLongNetConfig.tiny(), dtype=torch.float64)
    unsharded.load_state_dict(model.state_dict())
    parallelize_sequence(model)
    for batch_size, seed in ((3, 0), (2, 5)):
        inputs, lengths = model.example_inputs(batch_size, seed=seed)
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        g = torch.Generator().manual_seed(seed)
        head = torch.randn(32, generator=g, dtype=torch.float64)

        def loss_of(out, head=head):  # every fused token (via the pooled mean), and one in particular
            return (out.pooled @ head).square().sum() + out.tokens[:, -1].sum()

        unsharded.zero_grad()
        expected = unsharded(inputs, lengths)
        loss_of(expected).backward()
        expected_grads = {
            name: p.grad.clone() for name, p in unsharded.named_parameters() if p.grad is not None
        }
        model.zero_grad()
        out = model(inputs, lengths)
        loss_of(out).backward()  # the same loss on every rank of the group
        torch.testing.assert_close(out.tokens, expected.tokens.detach(), rtol=0, atol=TOL)
        torch.testing.assert_close(out.pooled, expected.pooled.detach(), rtol=0, atol=TOL)
        assert torch.equal(out.padding_mask, expected.padding_mask)
        grads = _average_grads(model)
        for name, expected_grad in expected_grads.items():
            torch.testing.assert_close(grads[name], expected_grad, rtol=0, atol=TOL, msg=f"grad of {name}")
        assert any(name.startswith("fusion") for name in expected_grads)
        assert any(name.startswith("encoders.audio") for name in expected_grads)
        if seed == 5:
            assert expected.tokens.shape[1] % world, "this case should need padding tokens"


def _groups(rank: int, world: int) -> None:
    for size in (1, world):  # the groups the strategy builds agree with the layout
        group, layout = new_sequence_parallel_groups(size)
        assert layout == sequence_parallel_layout(world, size)[0]
        assert dist.get_process_group_ranks(group) == layout[rank // size]
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)  # the sum over this rank's sequence group only
        assert value.item() == sum(layout[rank // size])


def _sharded_steps(rank: int, world: int) -> None:
    _groups(rank, world)
    _lm(rank, world)
    _mmlongnet(rank, world)


def test_sharded_steps_on_2_ranks_equal_one_process():
    """The groups; the LM's slice losses and MMLongNet's sharded fusion: their mean loss and their
    DDP-averaged gradients equal the single-process loss and gradients (one spawn for all three)."""
    run_ranks(_sharded_steps, 2, timeout=120)


def test_two_process_sequence_parallel_fit_through_the_cli(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "sp_cpu.yaml").read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(tmp_path)  # the logger's save_dir follows it
    trainer["callbacks"] = []
    path = tmp_path / "sp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--config", str(path), "--trainer.max_steps", "2",
        "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--data.init_args.train_examples", "8", "--data.init_args.val_examples", "4",
        "--data.init_args.test_examples", "4", "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr  # Lightning's DDP launch
    (metrics,) = tmp_path.glob("**/metrics.csv")
    rows = list(csv.DictReader(metrics.read_text().splitlines()))
    losses = [float(row["train_loss"]) for row in rows if row.get("train_loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    val = [float(row["val_loss"]) for row in rows if row.get("val_loss")]
    assert len(val) == 1 and math.isfinite(val[0])


def test_sequence_parallel_fit_with_a_slice_without_video_does_not_deadlock(tmp_path):
    """configs/sp_cpu.yaml through the CLI on 2 gloo processes, with batches of audio-only and
    video-only samples: the audio tokens make the fused sequence long and every sample's video tokens
    sit in its first half, so rank 1's slice often holds no video token while the batch has some
    (the probe records it per step). The video experts of the multiway fusion layers must still take
    part in rank 1's backward, or DDP waits for their gradients; a short `timeout_s` turns such a
    wait into a failure within seconds instead of 30 minutes."""
    config = yaml.safe_load((REPO / "configs" / "sp_cpu.yaml").read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(tmp_path)  # the logger's save_dir follows it
    trainer["strategy"]["init_args"]["timeout_s"] = 20
    probe = tmp_path / "probe.txt"
    probe_callback = {"class_path": "fused_probe.FusedSliceProbe", "init_args": {"path": str(probe)}}
    trainer["callbacks"] = [probe_callback]
    config["data"] = {"init_args": {"dataset": {"modality_mix": {"audio": 0.5, "video": 0.5}}}}
    path = tmp_path / "sp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    steps = 8
    command = [
        sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--config", str(path),
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--data.init_args.train_examples", "64",
        "--data.init_args.val_examples", "4", "--data.init_args.batch_size", "4",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
             "PYTHONPATH": f"{REPO}:{Path(__file__).resolve().parent}"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    records = [tuple(int(x) for x in line.split()) for line in probe.read_text().splitlines()]
    rank_one = {step: (in_batch, in_slice) for step, rank, in_batch, in_slice in records if rank == 1}
    assert sorted(rank_one) == list(range(steps))  # every step ran on rank 1
    hit = [step for step, (in_batch, in_slice) in rank_one.items() if in_batch > 0 and in_slice == 0]
    assert len(hit) >= 2, rank_one  # the case of the deadlock, reached and passed more than once
    (metrics,) = tmp_path.glob("**/metrics.csv")
    losses = [float(row["train_loss"]) for row in csv.DictReader(metrics.read_text().splitlines())
              if row.get("train_loss")]  # fmt: skip
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
