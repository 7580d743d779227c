"""A training step reads no tensor back on the host: the batch layout comes from CPU lengths.

Also the fused layout against a loop twin, and the classifier's loss against the plain mean over
labelled samples.
"""

import pytest
import torch
import torch.nn.functional as F

from mmlongnet.data.collate import collate_samples
from mmlongnet.models import LongNetLM, MMLongNet, MMLongNetConfig
from mmlongnet.models.packing import FusedLayout, to_device_at_once
from mmlongnet.training.module import MultimodalClassifier


def mixed_batch(model, batch_size=4, seed=3):
    """Example inputs in which samples lack modalities (lengths on the CPU, as a collate gives)."""
    inputs, lengths = model.example_inputs(batch_size, seed=seed)
    lengths["text"][1] = 0
    lengths["audio"][2] = 0
    lengths["video"][3] = 0
    return inputs, lengths


def test_multimodal_forward_and_backward_read_nothing_back(host_reads):
    torch.manual_seed(0)
    model = MMLongNet(MMLongNetConfig.tiny()).train()
    inputs, lengths = mixed_batch(model)
    with host_reads as reads:
        plan = model.plan_batch(inputs, lengths)
        out = model(inputs, plan=plan)
        (out.pooled.square().sum() + out.tokens.sum()).backward()
    assert reads.ops == []
    assert plan.valid_tokens == int((~out.padding_mask).sum())
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_language_model_forward_and_backward_read_nothing_back(host_reads):
    torch.manual_seed(0)
    lm = LongNetLM(61, d_model=32, nhead=4, num_layers=2, dim_feedforward=64, segment_lengths=[8, 16],
                   dilation_rates=[1, 2])  # fmt: skip
    tokens = torch.randint(0, 61, (2, 40))
    with host_reads as reads:
        F.cross_entropy(lm(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert reads.ops == []


def labelled_samples() -> list[dict]:
    """Three samples of different modalities; the second has no label."""
    generator = torch.Generator().manual_seed(0)
    return [
        {"id": "a", "text": "one two", "audio": torch.randn(3000, generator=generator), "label": 1},
        {"id": "b", "video": torch.randn(3, 3, 16, 16, generator=generator), "label": -1},
        {"id": "c", "text": "three", "video": torch.randn(5, 3, 16, 16, generator=generator), "label": 3},
    ]


def test_classifier_step_reads_nothing_back_and_averages_over_labelled_samples(host_reads, monkeypatch):
    torch.manual_seed(0)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4).train()
    monkeypatch.setattr(classifier, "log", lambda *args, **kwargs: None)  # logging may read values
    samples = labelled_samples()
    batch = classifier.transfer_batch_to_device(collate_samples(samples), torch.device("cpu"), 0)
    with host_reads as reads:
        loss = classifier.training_step(batch, 0)
        loss.backward()
    assert reads.ops == []
    with torch.no_grad():
        logits = classifier(batch)
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([1, 3]))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    assert classifier.last_batch_tokens == batch_tokens(classifier.model, batch)


def batch_tokens(model, batch):
    out = model(batch.inputs, batch.lengths)
    return int((~out.padding_mask).sum())


def test_a_batch_without_labels_gives_a_zero_loss():
    torch.manual_seed(0)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4)
    batch = collate_samples([{"id": "a", "text": "only text", "label": -1}])
    loss = classifier.training_step(batch, 0)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in classifier.parameters())


def test_fused_layout_packs_like_a_loop_over_samples():
    generator = torch.Generator().manual_seed(0)
    widths, ids = [5, 3, 4], [0, 2, 1]
    counts = [torch.tensor([5, 0, 2]), torch.tensor([1, 3, 0]), torch.tensor([0, 4, 4])]
    streams = [torch.randn(3, w, 2, generator=generator, dtype=torch.float64) for w in widths]
    layout = FusedLayout.build(counts, widths, ids, num_ways=3)
    fused = layout.pack(streams)
    assert layout.length == sum(widths) == fused.shape[1]
    for b in range(3):
        rows = [s[b, : int(n[b])] for s, n in zip(streams, counts, strict=True)]
        expected_ids = [m for m, n in zip(ids, counts, strict=True) for _ in range(int(n[b]))]
        total = len(expected_ids)
        assert torch.equal(fused[b, :total], torch.cat(rows))
        assert not fused[b, total:].any()
        assert layout.padding_mask[b].tolist() == [i >= total for i in range(layout.length)]
        assert layout.modality_ids[b, :total].tolist() == expected_ids
    assert layout.valid_tokens == sum(int(n.sum()) for n in counts)
    assert layout.present.tolist() == [[True, False, True], [True, True, False], [False, True, True]]
    # each expert's capacity is its stream's B * N_m: shapes depend on the widths only
    assert layout.routing.capacities == (15, 12, 9)


def test_a_sample_without_any_token_is_named():
    with pytest.raises(ValueError, match="sample 1 has no modality at all"):
        FusedLayout.build([torch.tensor([2, 0])], [2], [0], num_ways=1)


def host_tensors():
    return [torch.tensor([3, -1, 7]), torch.tensor([[True, False], [False, True]]), torch.zeros(0, 4).long()]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tensors_move_at_once_with_their_shapes_and_dtypes(device):
    moved = to_device_at_once(host_tensors(), torch.device(device))
    for got, want in zip(moved, host_tensors(), strict=True):
        assert (got.shape, got.dtype, got.device.type) == (want.shape, want.dtype, device)
        if device == "cpu":
            assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensors_move_at_once_to_a_gpu_with_their_values():
    for _ in range(2):  # the second reuses the cached pinned block
        moved = to_device_at_once(host_tensors(), torch.device("cuda"))
        for got, want in zip(moved, host_tensors(), strict=True):
            assert got.device.type == "cuda" and got.dtype == want.dtype and torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_runs_under_sync_debug_errors():
    """Forward and backward of a bf16 classifier step on a collated mixed batch: any host sync raises."""
    torch.manual_seed(0)
    classifier = MultimodalClassifier(MMLongNetConfig.tiny(), num_classes=4).cuda().train()
    classifier.log = lambda *args, **kwargs: None  # logging reads values by design
    samples = labelled_samples()
    batch = classifier.transfer_batch_to_device(collate_samples(samples), torch.device("cuda"), 0)
    for _ in range(2):  # the second step runs with every kernel and workspace already chosen
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = classifier.training_step(batch, 0)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    assert all(torch.isfinite(p.grad).all() for p in classifier.parameters() if p.grad is not None)
