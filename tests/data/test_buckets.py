"""Length buckets: the rule (values, monotone, bounded padding, few buckets), the bucketed collate
(shapes, exact lengths, zero / pad-id padding, the text cap), the data modules' default, errors."""

import dataclasses

import pytest
import torch

from mmlongnet.data.collate import LengthBuckets, bucket_length, collate_samples
from mmlongnet.modalities import ByteTokenizer
from mmlongnet.training.data import AVDigitsDataModule, ManifestDataModule


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # 4 steps per octave, multiple 1: every length up to 8, then 4 values per octave.
        ({}, {0: 0, 1: 1, 5: 5, 8: 8, 9: 10, 11: 12, 15: 16, 16: 16, 17: 20, 25: 28, 33: 40,
              100: 112, 1000: 1024, 1025: 1280, 3000: 3072}),
        # Multiples of 8 from 32 on.
        ({"multiple": 8, "minimum": 32}, {1: 32, 32: 32, 33: 40, 64: 64, 65: 80, 81: 96, 100: 112,
                                          128: 128, 129: 160, 200: 224, 1000: 1024}),
        # Multiples of 640 samples (one default audio token) from 5120 on: the audio defaults.
        ({"multiple": 640, "minimum": 5120}, {1: 5120, 5121: 6400, 16000: 17920, 48000: 51200}),
        # One step per octave: powers of two times the multiple.
        ({"steps_per_octave": 1, "multiple": 3}, {1: 3, 4: 6, 7: 12, 13: 24, 25: 48}),
        ({"steps_per_octave": 2}, {5: 6, 7: 8, 9: 12, 13: 16, 17: 24, 25: 32}),
    ],
)  # fmt: skip
def test_bucket_values(kwargs, expected):
    assert {n: bucket_length(n, **kwargs) for n in expected} == expected


@pytest.mark.parametrize(
    "steps, multiple, minimum", [(4, 1, 1), (4, 8, 32), (2, 640, 5120), (8, 4, 4), (1, 3, 10), (4, 5, 7)]
)
def test_buckets_are_monotone_cover_n_and_pad_by_at_most_one_step(steps, multiple, minimum):
    lengths = range(0, 20000)
    buckets = [bucket_length(n, steps, multiple, minimum) for n in lengths]
    assert all(a <= b for a, b in zip(buckets[:-1], buckets[1:], strict=True))
    for n, bucket in zip(lengths, buckets, strict=True):
        assert n <= bucket and bucket % multiple == 0
        if n:  # padding: under one grid step of 1 / steps of the (rounded-up) length
            assert bucket < (max(n, minimum) + multiple) * (1 + 1 / steps)


def test_many_lengths_share_few_buckets():
    # Up to 2^17: the 8 values 1..8, then 4 per octave for the 14 octaves from 8 to 2^17.
    assert len({bucket_length(n) for n in range(1, 2**17 + 1)}) == 8 + 4 * 14
    # A minute of audio at 16 kHz in 960000 sample counts: 31 shapes with the default buckets.
    buckets = LengthBuckets()
    audio = {buckets.length("audio", n) for n in range(1, 60 * 16000 + 1)}
    assert len(audio) == 31 and all(b % 640 == 0 for b in audio)
    # 1024 frames in multiples of 4: the 8 values 4..32, then 4 per octave up to 1024 frames.
    assert len({buckets.length("video", n) for n in range(1, 1025)}) == 8 + 4 * 5


@pytest.mark.parametrize(
    "args, match",
    [((-1,), "n must be >= 0"), ((8, 3), "power of two"), ((8, 0), "power of two"),
     ((8, 4, 0), "multiple and minimum must be >= 1"), ((8, 4, 1, 0), "multiple and minimum")],
)  # fmt: skip
def test_bucket_length_errors(args, match):
    with pytest.raises(ValueError, match=match):
        bucket_length(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"steps_per_octave": 6}, "buckets.steps_per_octave must be a power of two, got 6"),
     ({"steps_per_octave": 0}, "buckets.steps_per_octave must be an int >= 1, got 0"),
     ({"text_multiple": 0}, "buckets.text_multiple must be an int >= 1, got 0"),
     ({"audio_minimum": -5}, "buckets.audio_minimum must be an int >= 1, got -5"),
     ({"video_multiple": 2.0}, "buckets.video_multiple must be an int >= 1, got 2.0"),
     ({"video_minimum": True}, "buckets.video_minimum must be an int >= 1, got True")],
)  # fmt: skip
def test_length_buckets_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthBuckets(**kwargs)


def test_length_buckets_per_modality_and_unknown_modality():
    buckets = LengthBuckets(text_multiple=4, text_minimum=8, video_multiple=2, video_minimum=2)
    assert [buckets.length("text", n) for n in (0, 1, 9, 33)] == [0, 8, 12, 40]
    assert [buckets.length("audio", n) for n in (1, 6000)] == [5120, 6400]
    assert [buckets.length("video", n) for n in (1, 3, 17)] == [2, 4, 20]
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        buckets.length("image", 3)


def samples():
    """Four samples of mixed modalities and lengths: text ids 2..11, audio 700..5300, video 1..5."""
    video = torch.ones(5, 1, 4, 4)
    return [
        {"id": "a", "text": "hi", "audio": torch.full((5300,), 1.0), "video": video, "label": 3},
        {"id": "b", "audio": torch.full((700,), 2.0), "label": 1},
        {"id": "c", "text": "hello world", "video": 3.0 * video[:1], "label": 0},
        {"id": "d", "text": "abc", "video": 4.0 * video[:3]},
    ]


def test_collate_pads_to_buckets_with_exact_lengths_and_zero_or_pad_id():
    plain = collate_samples(samples())
    batch = collate_samples(samples(), buckets=LengthBuckets())
    assert {k: tuple(v.shape) for k, v in plain.inputs.items()} == {
        "text": (4, 11), "audio": (4, 5300), "video": (4, 5, 1, 4, 4)
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in batch.inputs.items()} == {
        "text": (4, 64), "audio": (4, 6400), "video": (4, 8, 1, 4, 4)
    }  # fmt: skip
    assert {k: v.tolist() for k, v in batch.lengths.items()} == {
        "text": [2, 0, 11, 3], "audio": [5300, 700, 0, 0], "video": [5, 0, 1, 3]
    }  # fmt: skip
    for name, padded in batch.inputs.items():
        assert torch.equal(batch.lengths[name], plain.lengths[name])
        width = plain.inputs[name].shape[1]
        assert torch.equal(padded[:, :width], plain.inputs[name])  # the same valid values and padding
    pad_id = ByteTokenizer().pad_id
    assert batch.inputs["text"][:, 11:].eq(pad_id).all() and batch.inputs["text"][1].eq(pad_id).all()
    assert batch.inputs["audio"][:, 5300:].eq(0).all() and batch.inputs["audio"][1, 700:].eq(0).all()
    assert batch.inputs["video"][:, 5:].eq(0).all() and batch.inputs["video"][3, 3:].eq(0).all()
    assert batch.present() == plain.present() and batch.labels.tolist() == [3, 1, 0, -1]


def test_text_buckets_never_exceed_max_text_length():
    batch = collate_samples(samples(), max_text_length=20, buckets=LengthBuckets())
    assert batch.inputs["text"].shape == (4, 20) and batch.lengths["text"].tolist() == [2, 0, 11, 3]
    batch = collate_samples(samples(), max_text_length=5, buckets=LengthBuckets())
    assert batch.inputs["text"].shape == (4, 5) and batch.lengths["text"].tolist() == [2, 0, 5, 3]
    batch = collate_samples(samples(), max_text_length=100, buckets=LengthBuckets())
    assert batch.inputs["text"].shape == (4, 64)


def test_none_pads_to_the_longest_and_absent_modalities_stay_absent():
    batch = collate_samples(samples(), buckets=None)
    assert batch.inputs["audio"].shape == (4, 5300) and batch.inputs["text"].shape == (4, 11)
    audio_only = collate_samples([samples()[1]], buckets=LengthBuckets())
    assert set(audio_only.inputs) == {"audio"} and audio_only.inputs["audio"].shape == (1, 5120)


def test_data_modules_bucket_by_default_and_take_none_or_a_rule():
    default = AVDigitsDataModule().collate_fn(samples())
    assert default.inputs["audio"].shape == (4, 6400) and default.inputs["video"].shape[1] == 8
    assert AVDigitsDataModule(buckets=None).collate_fn(samples()).inputs["audio"].shape == (4, 5300)
    rule = dataclasses.replace(LengthBuckets(), audio_multiple=1000, audio_minimum=1000)
    manifest = ManifestDataModule(train="unused.jsonl", buckets=rule, max_text_length=4)
    batch = manifest.collate_fn(samples())
    assert batch.inputs["audio"].shape == (4, 6000) and batch.inputs["text"].shape == (4, 4)
    assert ManifestDataModule(train="unused.jsonl").collate_fn(samples()).inputs["text"].shape == (4, 64)
