"""collate_samples: padding, lengths per modality, absent modalities, errors."""

from functools import partial

import pytest
import torch

from mmlongnet.data.collate import collate_samples
from mmlongnet.modalities import ByteTokenizer


def test_pads_each_modality_and_gives_zero_lengths_to_missing_ones():
    samples = [
        {"id": "a", "text": "hi", "audio": torch.ones(5), "video": None, "label": 3},
        {
            "id": "b",
            "text": None,
            "audio": torch.full((2,), 2.0),
            "video": torch.ones(3, 1, 4, 4),
            "label": 1,
        },
        {"id": "c", "text": "hello", "video": torch.full((1, 1, 4, 4), 5.0)},
    ]
    batch = collate_samples(samples)
    assert batch.ids == ["a", "b", "c"] and len(batch) == 3
    assert batch.labels.tolist() == [3, 1, -1]
    assert {k: v.tolist() for k, v in batch.lengths.items()} == {
        "text": [2, 0, 5], "audio": [5, 2, 0], "video": [0, 3, 1]
    }  # fmt: skip
    tokenizer = ByteTokenizer()
    assert batch.inputs["text"][2].tolist() == tokenizer.encode("hello")
    assert batch.inputs["text"][0].tolist() == tokenizer.encode("hi") + [tokenizer.pad_id] * 3
    assert batch.inputs["audio"].tolist() == [[1.0] * 5, [2.0, 2.0, 0, 0, 0], [0.0] * 5]
    assert batch.inputs["video"].shape == (3, 3, 1, 4, 4)
    assert batch.inputs["video"][0].abs().sum() == 0 and batch.inputs["video"][2, 1:].abs().sum() == 0
    assert batch.inputs["video"][2, 0].eq(5.0).all()
    assert batch.present() == {
        "text": [True, False, True],
        "audio": [True, True, False],
        "video": [False, True, True],
    }


def test_a_modality_no_sample_has_is_left_out_and_text_is_truncated():
    batch = collate_samples([{"id": "x", "text": "abcdef", "label": 0}], max_text_length=3)
    assert set(batch.inputs) == {"text"} and batch.inputs["text"].shape == (1, 3)


@pytest.mark.parametrize(
    "samples, match",
    [
        ([], "empty batch"),
        ([{"id": "s1", "text": None, "label": 0}], "sample 's1' has none of the modalities"),
        ([{"id": "s2", "audio": torch.ones(2, 3)}], r"sample 's2': audio must be \(S,\)"),
        (
            [{"id": "p", "video": torch.ones(1, 1, 4, 4)}, {"id": "q", "video": torch.ones(1, 1, 5, 5)}],
            r"sample 'q': video frames of shape \(1, 5, 5\) differ",
        ),
    ],
)
def test_errors_name_the_sample(samples, match):
    with pytest.raises(ValueError, match=match):
        collate_samples(samples)


class _Samples(torch.utils.data.Dataset):
    """Samples of varied lengths; the padding must come out zero from buffers that are not."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {
            "id": str(i),
            "audio": torch.full((3 + 2 * i,), float(i + 1)),
            "video": torch.ones(i + 1, 1, 2, 2),
        }


def _collate_and_say_if_shared(samples):
    batch = collate_samples(samples)
    return batch, {name: x.is_shared() for name, x in batch.inputs.items()}  # as built, in the worker


def test_a_worker_collates_into_shared_memory_the_same_batch():
    """In a DataLoader worker the batch is built in shared memory (sent without a copy); its values
    are those collated in the main process, padding zero."""
    garbage = torch.randn(1 << 20)  # leave non-zero memory behind for uninitialised buffers
    del garbage
    loader = torch.utils.data.DataLoader(
        _Samples(), batch_size=4, num_workers=1, collate_fn=_collate_and_say_if_shared
    )
    ((shared, built_shared),) = list(loader)
    local = collate_samples([_Samples()[i] for i in range(4)])
    assert built_shared == {"audio": True, "video": True}
    for name in ("audio", "video"):
        assert not local.inputs[name].is_shared()
        assert torch.equal(shared.inputs[name], local.inputs[name])
    assert local.inputs["audio"][0].tolist() == [1.0] * 3 + [0.0] * 6
    assert local.inputs["video"][0, 1:].abs().sum() == 0


def test_media_in_half_precision_are_the_samples_rounded_once_and_half_the_bytes():
    samples = [_Samples()[i] for i in range(4)]
    samples[1]["audio"] = torch.linspace(-1.0, 1.0, 5) / 3.0  # values float16 must round
    full = collate_samples(samples)
    half = collate_samples(samples, media_dtype=torch.float16)
    for name in ("audio", "video"):
        assert half.inputs[name].dtype == torch.float16 and full.inputs[name].dtype == torch.float32
        assert torch.equal(half.inputs[name], full.inputs[name].half())
        assert half.inputs[name].nbytes * 2 == full.inputs[name].nbytes
    assert not torch.equal(half.inputs["audio"].float(), full.inputs["audio"])  # rounded, not a no-op
    assert {k: v.tolist() for k, v in half.lengths.items()} == {
        k: v.tolist() for k, v in full.lengths.items()
    }
    worker = torch.utils.data.DataLoader(
        _Samples(),
        batch_size=4,
        num_workers=1,
        collate_fn=partial(collate_samples, media_dtype=torch.float16),
    )
    (shared,) = list(worker)
    assert shared.inputs["audio"].is_shared() and shared.inputs["audio"].dtype == torch.float16
    with pytest.raises(ValueError, match="media_dtype must be a floating torch dtype"):
        collate_samples(samples, media_dtype=torch.int16)
