"""Graphed training steps (`GraphedSteps`, `MultimodalClassifier(graphed=True)`,
`LanguageModel(graphed=True)`): the same training as the eager steps, gradients kept in place, one
graph per signature; on a GPU, replays equal the eager steps over batches of one length bucket."""

import copy
import logging
import pickle

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from mmlongnet.data.collate import LengthBuckets, collate_samples
from mmlongnet.models import LongNetLM, MMLongNetConfig
from mmlongnet.training import LanguageModel, MultimodalClassifier, OptimizerConfig
from mmlongnet.training.graphed import GraphedSteps

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bucket_batches(count: int, seed: int = 0, video_every: int = 1):
    """`count` labelled batches of one length bucket, with other lengths and modalities each; only
    every `video_every`-th batch holds video (the others leave the video encoder out)."""
    buckets, batches = LengthBuckets(), []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        audio = [int(x) for x in torch.randint(5200, 5700, (3,), generator=generator)]
        frames = [int(x) for x in torch.randint(1, 4, (3,), generator=generator)]
        samples = [
            {"id": "a", "text": "first digit?"[: 8 + index % 4], "label": index % 4,
             "audio": torch.randn(audio[0], generator=generator)},
            {"id": "b", "audio": torch.randn(audio[1], generator=generator), "label": -1 if index else 1,
             "video": torch.randn(frames[1], 3, 16, 16, generator=generator)},
            {"id": "c", "text": "count", "label": 3,
             "video": torch.randn(frames[2], 3, 16, 16, generator=generator)},
        ]  # fmt: skip
        if index % video_every:
            samples = [{key: value for key, value in sample.items() if key != "video"} for sample in samples]
        batches.append(collate_samples(samples, buckets=buckets))
    return batches


def train(module: MultimodalClassifier, batches, accelerator: str = "cpu", **trainer) -> pl.Trainer:
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    options = dict(
        accelerator=accelerator, devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=0.05,
    )  # fmt: skip
    fitter = pl.Trainer(**{**options, **trainer})
    fitter.fit(module, loader)
    return fitter


def twins(**options) -> tuple[MultimodalClassifier, MultimodalClassifier]:
    """An eager classifier and a graphed one with the same weights."""
    torch.manual_seed(0)
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=0)
    eager = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4, optimizer=optimizer)
    graphed = MultimodalClassifier(
        MMLongNetConfig.tiny(), num_classes=4, optimizer=optimizer, graphed=True, **options
    )
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def test_a_graphed_classifier_trains_as_the_eager_one():
    """On the CPU the graphed path runs eagerly: its own backward, clipping and zeroing of the
    gradients give the eager module's training, step for step (clipping active: the norm of the
    first gradients is far above 0.05)."""
    eager, graphed = twins()
    batches = bucket_batches(4)
    train(eager, batches)
    train(graphed, batches)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    steps = graphed.graphed_steps
    assert steps.signatures == 1 and steps.recorded == 0
    assert all(p.grad is grad for p, grad in zip(steps.parameters, steps.grads, strict=True))


def test_parameters_a_batch_does_not_train_are_left_to_the_optimizer_as_eager_steps_leave_them():
    """Batches without video between batches with it: the video encoder gets no gradient there
    (`.grad` None), so AdamW neither decays nor moves it, as in the eager steps."""
    eager, graphed = twins()
    batches = bucket_batches(5, video_every=2)
    assert "video" not in batches[1].inputs and "video" in batches[2].inputs
    train(eager, batches)
    train(graphed, batches)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    steps = graphed.graphed_steps
    assert steps.signatures == 2
    video = [p.grad for name, p in graphed.named_parameters() if name.startswith("model.encoders.video")]
    assert video and all(grad is not None for grad in video)  # the last batch held video


def test_a_copy_of_a_graphed_classifier_trains_afresh():
    _, graphed = twins()
    train(graphed, bucket_batches(2))
    for copied in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        steps = copied.graphed_steps
        assert steps.module is copied and steps.signatures == 0 and steps.parameters == []
        assert (steps.warmup, steps.record) == (graphed.graphed_steps.warmup, graphed.graphed_steps.record)
        torch.testing.assert_close(dict(copied.state_dict()), dict(graphed.state_dict()))
    assert graphed.graphed_steps.signatures == 1


def test_a_graphed_classifier_refuses_what_its_steps_do_not_do():
    _, graphed = twins()
    with pytest.raises(ValueError, match="accumulate_grad_batches: 1"):
        train(graphed, bucket_batches(2), accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="graphed=True does not run with sequence sharding"):
        graphed.parallelize(None)
    with pytest.raises(ValueError, match="leave compile off with it"):
        MultimodalClassifier(MMLongNetConfig.tiny(), graphed=True, compile=True)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedSteps(graphed, warmup=0)


def test_graphed_steps_zero_the_gradients_in_place_and_count_signatures():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    steps = GraphedSteps(model, warmup=1)

    def step(tensors):
        loss = model(tensors[0]).square().sum()
        loss.backward()
        return [loss]

    x = torch.randn(4, 3)
    first = steps("a", [x], step)
    grad = model.weight.grad
    second = steps("a", [x], step)
    assert model.weight.grad is grad  # the same tensor, zeroed and written again
    torch.testing.assert_close(grad, 2 * model(x).detach().T @ x)  # one step's, not two
    torch.testing.assert_close(first[0], second[0])
    assert not first[0].requires_grad
    steps("b", [torch.randn(2, 3)], step)
    assert steps.signatures == 2 and steps.recorded == 0  # on the CPU nothing is recorded


@pytest.mark.cuda
@cuda
def test_graphed_steps_replay_the_eager_step_on_new_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1)).cuda()
    steps = GraphedSteps(model, warmup=2)

    def step(tensors):
        x, y = tensors
        loss = (model(x).squeeze(-1) - y).square().mean()
        loss.backward()
        nn.utils.clip_grad_norm_(list(model.parameters()), 0.1, foreach=True)
        return [loss]

    for index in range(5):
        x, y = torch.randn(32, 8, device="cuda"), torch.randn(32, device="cuda")
        (loss,) = steps(("batch", 32), [x, y], step)
        # The reference leaves `.grad` alone: the recorded graph writes into those tensors.
        want_loss = (model(x).squeeze(-1) - y).square().mean()
        want = torch.autograd.grad(want_loss, list(model.parameters()))
        scale = (0.1 / (torch.stack([g.norm() for g in want]).norm() + 1e-6)).clamp(max=1.0)
        torch.testing.assert_close(loss, want_loss.detach())
        for g, p in zip(want, model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, g * scale)
        assert steps.recorded == (index >= 2)
        del want_loss  # its autograd graph, made on another stream, must not reach a recording


@pytest.mark.cuda
@cuda
def test_a_step_that_cannot_be_recorded_warns_and_runs_eagerly():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).cuda()
    steps = GraphedSteps(model, warmup=1)

    def step(tensors):
        loss = model(tensors[0]).square().mean()
        loss.backward()
        return [loss * float(loss)]  # a host read: refused while recording

    x = torch.randn(8, 4, device="cuda")
    steps("a", [x], step)
    with pytest.warns(UserWarning, match="could not be recorded as a CUDA graph"):
        (loss,) = steps("a", [x], step)
    (again,) = steps("a", [x], step)
    want = model(x).square().mean()
    torch.testing.assert_close(loss, want * want)
    torch.testing.assert_close(again, want * want)
    assert steps.recorded == 0 and steps.unrecordable == {"a"}


@pytest.mark.cuda
@cuda
def test_a_graphed_classifier_trains_as_the_eager_one_on_a_gpu(caplog):
    """Recorded after two eager steps, the replays over new batches of the bucket (other lengths,
    other modalities missing) train as the eager module does, float32; the recording is logged."""
    eager, graphed = twins()
    batches = bucket_batches(6)
    caplog.set_level(logging.INFO)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        train(eager, batches, "gpu")
        train(graphed, batches, "gpu")
    assert graphed.graphed_steps.recorded == 1
    logged = [r.getMessage() for r in caplog.records if "as a CUDA graph" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("recorded a training step as a CUDA graph for a new")
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.cuda
@cuda
def test_a_graphed_classifier_records_under_bf16_mixed_precision():
    """Lightning's bf16-mixed autocast around the recorded step: recorded once, the same training
    as the eager module within bf16's rounding."""
    eager, graphed = twins()
    start = [p.detach().clone() for p in eager.parameters()]
    batches = bucket_batches(6)
    train(eager, batches, "gpu", precision="bf16-mixed")
    train(graphed, batches, "gpu", precision="bf16-mixed")
    assert graphed.graphed_steps.recorded == 1
    assert all(torch.isfinite(p).all() for p in graphed.parameters())
    final = [p.detach().cpu() for p in eager.parameters()]
    moved = torch.cat([(a - s.cpu()).flatten() for a, s in zip(final, start, strict=True)])
    got = [p.detach().cpu() for p in graphed.parameters()]
    apart = torch.cat([(b - a).flatten() for a, b in zip(final, got, strict=True)])
    assert moved.norm() > 0 and apart.norm() < 0.2 * moved.norm()  # the same updates, to bf16's rounding


def lm_twins() -> tuple[LanguageModel, LanguageModel]:
    """An eager byte LM and a graphed one with the same weights (dilated attention, two branches)."""
    torch.manual_seed(0)
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=0)

    def lm():
        return LongNetLM(num_tokens=256, d_model=32, nhead=4, num_layers=2, dim_feedforward=64,
                         segment_lengths=[16, 64], dilation_rates=[1, 2])  # fmt: skip

    eager = LanguageModel(lm(), optimizer=optimizer)
    graphed = LanguageModel(lm(), optimizer=optimizer, graphed=True)
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def windows(count: int, length: int = 96) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, length + 1), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=[pytest.mark.cuda, cuda])])
def test_a_graphed_language_model_trains_as_the_eager_one(accelerator, caplog):
    """On the CPU the graphed path runs eagerly; on a GPU the later steps replay the recording
    (float32). Either way the same training as the eager module, step for step, with clipping."""
    eager, graphed = lm_twins()
    batches = windows(5)
    caplog.set_level(logging.INFO)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = False
        train(eager, batches, accelerator)
        train(graphed, batches, accelerator)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    steps = graphed.graphed_steps
    assert steps.signatures == 1 and steps.recorded == (accelerator == "gpu")
    assert graphed.last_batch_tokens == 2 * 96
    logged = [r.getMessage() for r in caplog.records if "as a CUDA graph" in r.getMessage()]
    assert logged == (["recorded a training step as a CUDA graph for a new batch signature "
                       "(#1: windows 2x97), once per signature"] if accelerator == "gpu" else [])  # fmt: skip


def test_a_graphed_language_model_refuses_what_its_steps_do_not_do():
    _, graphed = lm_twins()
    with pytest.raises(ValueError, match="accumulate_grad_batches: 1"):
        train(graphed, windows(2), accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="graphed=True does not run with sequence sharding"):
        graphed.parallelize(None)
    with pytest.raises(ValueError, match="leave compile off with it"):
        LanguageModel(graphed.model, graphed=True, compile=True)
