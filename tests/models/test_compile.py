"""torch.compile of the models: MMLongNet whole (fullgraph) with a host-made plan, no recompile
over batches of one length bucket, outputs and gradients equal to eager; LongNetLM likewise."""

import logging
import re

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mmlongnet.data.collate import LengthBuckets, collate_samples
from mmlongnet.models import LongNetLM, MMLongNet, MMLongNetConfig

# aot_eager traces forward and backward as Inductor would, without its (slow on CPU) code generation.
BACKEND = "aot_eager"


def bucket_batches(model, count: int):
    """`count` collated batches with other raw lengths each, all in one length bucket."""
    buckets = LengthBuckets()
    batches = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        audio = [int(x) for x in torch.randint(5200, 5700, (3,), generator=generator)]
        frames = [int(x) for x in torch.randint(1, 4, (3,), generator=generator)]
        samples = [
            {"id": "a", "text": "first digit?"[: 8 + seed],
             "audio": torch.randn(audio[0], generator=generator)},
            {"id": "b", "audio": torch.randn(audio[1], generator=generator),
             "video": torch.randn(frames[1], 3, 16, 16, generator=generator)},
            {"id": "c", "text": "count", "video": torch.randn(frames[2], 3, 16, 16, generator=generator)},
        ]  # fmt: skip
        batches.append(collate_samples(samples, buckets=buckets))
    assert len({tuple((k, tuple(v.shape)) for k, v in b.inputs.items()) for b in batches}) == 1
    assert len({tuple(tuple(v.tolist()) for v in b.lengths.values()) for b in batches}) == count
    return batches


@pytest.mark.parametrize(
    "overrides",
    [
        {"rotary_fraction": 1.0},
        {"rotary_fraction": 0.5},  # half of each head position-free
        {"global_modalities": ["text"], "global_read": True, "boundary_embeddings": True},
    ],
)
def test_mmlongnet_compiles_whole_and_never_recompiles_within_a_bucket(overrides):
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny(**overrides)).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    for batch in bucket_batches(model, 4):
        plan = model.plan_batch(batch.inputs, batch.lengths)
        got = compiled(batch.inputs, plan=plan)
        model.zero_grad()
        (got.pooled.square().sum() + got.tokens.sum()).backward()
        got_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        want = model(batch.inputs, batch.lengths)
        model.zero_grad()
        (want.pooled.square().sum() + want.tokens.sum()).backward()
        want_grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)
        assert len(got_grads) == len(want_grads)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_always_masked_plans_give_one_graph_for_padded_and_unpadded_batches_of_a_bucket():
    """A batch that fills its buckets exactly has no padding, so its stacks would run unmasked
    (another graph); `always_masked` plans run every batch masked, with unchanged outputs."""
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny()).eval()
    generator = torch.Generator().manual_seed(1)

    def batch(audio: list[int], frames: list[int], text: list[int]):
        samples = [
            {"id": str(i), "text": "x" * t, "audio": torch.randn(a, generator=generator),
             "video": torch.randn(f, 3, 16, 16, generator=generator)}
            for i, (a, f, t) in enumerate(zip(audio, frames, text, strict=True))
        ]  # fmt: skip
        return collate_samples(samples, buckets=LengthBuckets())

    full = batch([6400] * 3, [4] * 3, [64] * 3)  # each modality exactly one bucket long
    padded = batch([6400, 5300, 6000], [4, 1, 3], [64, 20, 50])
    assert full.inputs["audio"].shape == padded.inputs["audio"].shape  # one bucket
    default = model.plan_batch(full.inputs, full.lengths)
    assert not default.fused_padding and not any(default.stack_padding.values())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    for b in (full, padded, full):
        plan = model.plan_batch(b.inputs, b.lengths, always_masked=True)
        assert plan.fused_padding and all(plan.stack_padding.values())
        got = compiled(b.inputs, plan=plan)
        want = model(b.inputs, b.lengths)
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


def test_language_model_compiles_whole():
    torch.manual_seed(0)
    lm = LongNetLM(61, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, segment_lengths=[8, 16],
                   dilation_rates=[1, 2])  # fmt: skip
    torch._dynamo.reset()
    compiled = torch.compile(lm, fullgraph=True, backend=BACKEND)
    tokens = torch.randint(0, 61, (2, 40))
    torch.testing.assert_close(compiled(tokens), lm(tokens), rtol=1e-5, atol=1e-5)


def test_a_plan_and_lengths_together_are_refused():
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny()).eval()
    inputs, lengths = model.example_inputs(2)
    plan = model.plan_batch(inputs, lengths)
    with pytest.raises(ValueError, match="either lengths"):
        model(inputs, lengths, plan=plan)
    shorter = {**inputs, "text": inputs["text"][:, :-1]}
    with pytest.raises(ValueError, match="plan this batch"):
        model(shorter, plan=plan)


def test_the_classifier_runs_its_model_compiled_when_asked(monkeypatch):
    from mmlongnet.training.module import COMPILE_OPTIONS, MultimodalClassifier

    compiled, compile_ = [], torch.compile

    def compile_fast(fn, **options):  # the module's own options, on the quick backend
        compiled.append(options)
        return compile_(fn, **options | {"backend": BACKEND, "options": None})

    monkeypatch.setattr(torch, "compile", compile_fast)
    torch._dynamo.reset()
    torch.manual_seed(0)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4, compile=True)
    classifier.log = lambda *args, **kwargs: None
    eager = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4)
    eager.load_state_dict(classifier.state_dict())
    for batch in bucket_batches(classifier.model, 2):
        batch.labels = torch.tensor([1, -1, 3])
        torch.testing.assert_close(classifier(batch), eager(batch), rtol=1e-5, atol=1e-5)
    options = {**COMPILE_OPTIONS, "triton.cudagraphs": False}  # CUDA graphs on a GPU only
    assert compiled == [{"fullgraph": True, "dynamic": False, "options": options}]
    assert set(classifier.state_dict()) == set(eager.state_dict())  # nothing compiled is saved


def test_the_first_call_of_each_input_shape_says_it_compiles(monkeypatch, caplog):
    from mmlongnet.training.module import MultimodalClassifier

    compile_, quick = torch.compile, {"backend": BACKEND, "options": None}
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_(fn, **options | quick))
    torch._dynamo.reset()
    caplog.set_level(logging.INFO)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4, compile=True)
    first, second = bucket_batches(classifier.model, 2)  # two batches of one bucket: one shape
    classifier(first)
    classifier(second)
    messages = [r.getMessage() for r in caplog.records if "compil" in r.getMessage()]
    assert len(messages) == 2 and messages[0].startswith("compiling MMLongNet for a new input shape (#1: 3x")
    assert "; training), once per shape" in messages[0]
    assert re.fullmatch(r"compiled MMLongNet's forward for that shape in \d+ s", messages[1])
    with torch.no_grad():
        classifier(first)  # inference compiles its own graph
    shorter = collate_samples([{"id": "d", "text": "first"}], buckets=LengthBuckets())
    classifier(shorter)  # another shape
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiling")]
    assert len(messages) == 3 and "(#2: " in messages[1] and "; inference)" in messages[1]
    assert "(#3: 1x" in messages[2] and messages[2].count("x") == 1  # text only


def test_a_compiled_models_first_step_of_each_shape_promotes_its_forward_and_backward(monkeypatch):
    """The step that compiles a shape runs eagerly (CUDA graphs record from the next one): inside
    `SELECTOR.promoting()`, forward and backward, so that every attention call takes its fastest
    kernel there and the recording finds it; later steps of the shape do not promote."""
    from mmlongnet.attention.kernels import SELECTOR
    from mmlongnet.training.module import LanguageModel

    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # the logic, not the compiler
    lm = LongNetLM(num_tokens=8, d_model=8, nhead=2, num_layers=1, dim_feedforward=8,
                   segment_lengths=[4, 8], dilation_rates=[1, 2])  # fmt: skip
    module = LanguageModel(lm, compile=True)
    seen = []
    layer = lm.decoder.layers[0]
    layer.register_forward_hook(lambda *args: seen.append(("forward", SELECTOR.promote_now)))
    layer.register_full_backward_hook(lambda *args: seen.append(("backward", SELECTOR.promote_now)))
    for length in (8, 8, 6, 8, 6):
        seen.append(("step", length))
        module.backward(module(torch.randint(0, 8, (2, length))).float().square().mean())
    assert seen == [
        ("step", 8), ("forward", True), ("backward", True),
        ("step", 8), ("forward", False), ("backward", False),
        ("step", 6), ("forward", True), ("backward", True),
        ("step", 8), ("forward", False), ("backward", False),
        ("step", 6), ("forward", False), ("backward", False),
    ]  # fmt: skip
    assert SELECTOR.promote_now is False


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def long_av_batch(num_digits: int, batch_size: int):
    """A training batch of AV digits, padded to the length buckets a compiled run uses."""
    from mmlongnet.data import AVDigitsConfig, AVDigitsDataset

    dataset = AVDigitsDataset("train", batch_size, AVDigitsConfig(num_digits=num_digits, seed=0))
    buckets = LengthBuckets(audio_minimum=dataset.likely_longest_audio(), video_minimum=num_digits)
    batch = collate_samples([dataset[i] for i in range(batch_size)], buckets=buckets)
    batch.labels = torch.tensor([int(dataset[i]["label"]) for i in range(batch_size)])
    return batch


@pytest.mark.cuda
@cuda
def test_the_compiled_classifier_gives_the_eager_gradients_on_a_long_batch():
    """`MultimodalClassifier(compile=True)` (Inductor, CUDA graphs) against the same weights eager,
    float32, on AV digits at K = 256, 18 samples (~50K fused tokens, ~30K audio ones: norms whose
    backward sums over more rows than Inductor's mix-order reductions get right; `COMPILE_OPTIONS`
    turns those off)."""
    from mmlongnet.training.module import MultimodalClassifier

    torch.manual_seed(0)
    width, schedule = 64, {"segment_lengths": [256, 1024], "dilation_rates": [1, 2]}
    config = MMLongNetConfig(
        d_model=width, nhead=2, dim_feedforward=2 * width, text={"embed_dim": width},
        audio={"embed_dim": width, "n_mels": 40, "conv_channels": 32},
        video={"embed_dim": width, "image_size": 8, "patch_size": 8, "in_chans": 1},
        text_stack={"num_layers": 1, **schedule}, audio_stack={"num_layers": 1, **schedule},
        video_stack={"num_layers": 1, **schedule}, fusion_stack={"num_layers": 2, **schedule},
    )  # fmt: skip
    compiled = MultimodalClassifier(config, num_classes=10, pooling="text", compile=True).cuda()
    eager = MultimodalClassifier(config, num_classes=10, pooling="text").cuda()
    eager.load_state_dict(compiled.state_dict())
    batch = long_av_batch(256, 18)
    batch = compiled.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    labels = batch.labels.cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for _ in range(3):  # CUDA graphs record on the third call
            logits = compiled(batch)
            grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(compiled.parameters()))
        want_logits = eager(batch)
        want = torch.autograd.grad(F.cross_entropy(want_logits, labels), list(eager.parameters()))
    assert eager.last_batch_tokens > 40_000
    torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-4)
    for (name, _), got, expected in zip(compiled.named_parameters(), grads, want, strict=True):
        assert torch.isfinite(got).all(), name
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        assert error < 1e-2, f"{name}: {error:.1e} of the eager gradient's largest entry"
