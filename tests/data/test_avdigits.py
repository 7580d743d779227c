"""The bundled AV digits artifacts and the dataset composed from them (CPU, a few seconds).

Legend: K digits per example, S audio samples, C channels, H = W frame size.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from mmlongnet.data.avdigits import (
    DEFAULT_DATA_DIR,
    QUESTION_TYPES,
    SPLITS,
    WORDS,
    AVDigitsConfig,
    AVDigitsDataset,
    load_artifacts,
)
from mmlongnet.data.collate import collate_samples

VIDEO_ONLY = {"video": 1.0}
"""Cheapest samples, for tests that only look at sequences and answers."""


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return load_artifacts(str(DEFAULT_DATA_DIR))


def expected_answer(sample: dict) -> int:
    """The answer recomputed from the sample's digit sequence alone."""
    digits, d = sample["digits"], sample["query_digit"]
    question = sample["question"]
    if question == "first":
        return digits[0]
    if question == "last":
        return digits[-1]
    if question == "count":
        return digits.count(d)
    if question == "after":
        return digits[digits.index(d) + 1]
    if question == "most":
        counts = np.bincount(digits, minlength=10)
        assert (counts == counts.max()).sum() == 1, f"mode of {digits} is not unique"
        return int(counts.argmax())
    raise AssertionError(question)


# ---------------------------------------------------------------- artifacts


def test_artifacts_size_and_checksums():
    files = list(DEFAULT_DATA_DIR.iterdir())
    total = sum(f.stat().st_size for f in files)
    assert total <= 25e6, f"data/avdigits holds {total / 1e6:.1f} MB, more than 25 MB"
    manifest = json.loads((DEFAULT_DATA_DIR / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = (DEFAULT_DATA_DIR / name).read_bytes()
        assert len(data) == info["bytes"]
        assert hashlib.sha256(data).hexdigest() == info["sha256"]


def test_artifact_contents(arrays):
    manifest = json.loads((DEFAULT_DATA_DIR / "manifest.json").read_text())
    for name, info in manifest["arrays"].items():
        assert hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest() == info["sha256"], (
            name
        )
    images, labels = arrays["images"], arrays["image_labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert np.bincount(labels, minlength=10).min() >= 170  # every digit about 180 times
    offsets = arrays["clip_offsets"]
    assert offsets[0] == 0 and offsets[-1] == len(arrays["audio"]) and (np.diff(offsets) > 0).all()
    assert arrays["audio"].dtype == np.int16
    seconds = np.diff(offsets) / 16000
    assert 0.15 < seconds.min() and seconds.max() < 1.5  # one word each, silence trimmed
    # every clip scaled to RMS 0.1 (-20 dBFS) unless its peak would pass 0.99
    audio = arrays["audio"].astype(np.float64) / 32768
    rms = np.array(
        [np.sqrt(np.mean(audio[a:b] ** 2)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    )
    assert np.median(rms) == pytest.approx(0.1, abs=1e-3) and rms.max() < 0.1 + 1e-3


def test_split_pools_are_disjoint_and_complete(arrays):
    image_split, image_labels = arrays["image_split"], arrays["image_labels"]
    assert set(np.unique(image_split)) == {0, 1, 2}  # one split per image: a partition
    for digit in range(10):  # stratified 70 / 15 / 15
        counts = np.bincount(image_split[image_labels == digit], minlength=3)
        assert counts.min() >= 25 and abs(counts[1] - 0.15 * counts.sum()) <= 1 and counts[1] == counts[2]
    clip_split, clip_labels, speaker = arrays["clip_split"], arrays["clip_labels"], arrays["clip_speaker"]
    for code in range(3):
        assert set(clip_labels[clip_split == code]) == set(range(10))
        assert set(image_labels[image_split == code]) == set(range(10))
    # a speaker (voice, rate, pitch) belongs to one split, and says every digit once
    assert (arrays["speaker_split"][speaker] == clip_split).all()
    combos = [
        {
            (str(v), int(r), int(p))
            for v, r, p, s in zip(
                arrays["speaker_voice"],
                arrays["speaker_rate"],
                arrays["speaker_pitch"],
                arrays["speaker_split"],
                strict=True,
            )
            if s == code
        }
        for code in range(3)
    ]
    assert not (combos[0] & combos[1]) and not (combos[0] & combos[2]) and not (combos[1] & combos[2])
    assert [len(c) for c in combos] == [40, 8, 8]
    for code in range(3):  # every split covers every rate and pitch of the build
        members = arrays["speaker_split"] == code
        assert set(arrays["speaker_rate"][members]) == set(arrays["speaker_rate"])
        assert set(arrays["speaker_pitch"][members]) == set(arrays["speaker_pitch"])
    for s in range(len(arrays["speaker_voice"])):
        assert sorted(clip_labels[speaker == s]) == list(range(10))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_digits": 0}, "num_digits"),
        ({"num_digits": 2.5}, "num_digits"),
        ({"questions": []}, "questions"),
        ({"questions": ["first", "middle"]}, "questions"),
        ({"questions": "first"}, "questions"),
        ({"questions": ["first", "first"]}, "questions"),
        ({"questions": ["after"], "num_digits": 1}, "num_digits"),
        ({"modality_mix": {"both": 0.5, "text": 0.5}}, "modality_mix"),
        ({"modality_mix": {"both": 0.5, "audio": 0.25}}, "modality_mix"),
        ({"modality_mix": {"both": 1.5, "audio": -0.5}}, "modality_mix"),
        ({"question_mix": {"first": 0.5, "most": 0.5}, "questions": ["first", "last"]}, "question_mix"),
        ({"question_mix": {"first": 0.5}}, "question_mix"),
        ({"question_mix": [0.5, 0.5]}, "question_mix"),
        ({"noise": -0.1}, "noise"),
        ({"noise": math.inf}, "noise"),
        ({"gap_seconds": (0.3, 0.1)}, "gap_seconds"),
        ({"gap_seconds": (-0.1, 0.1)}, "gap_seconds"),
        ({"gap_seconds": 0.1}, "gap_seconds"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"frame_size": 0}, "frame_size"),
        ({"frame_resize": "bicubic"}, "frame_resize"),
        ({"channels": 2}, "channels"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AVDigitsConfig(**kwargs)


def test_config_accepts_yaml_style_values():
    config = AVDigitsConfig(gap_seconds=[0.0, 0.2], modality_mix={"audio": 1})
    assert config.gap_seconds == (0.0, 0.2)
    config = AVDigitsConfig(questions=("first",), num_digits=1)
    assert config.questions == ["first"]


def test_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        AVDigitsDataset("dev", 10)
    with pytest.raises(ValueError, match="num_examples"):
        AVDigitsDataset("train", -1)
    with pytest.raises(FileNotFoundError, match="build_avdigits.py"):
        AVDigitsDataset("train", 10, data_dir=tmp_path)
    dataset = AVDigitsDataset("val", 3)
    assert len(dataset) == 3 and dataset.num_classes == 10
    assert dataset[-1]["id"] == dataset[2]["id"] == "avdigits-val-2"
    with pytest.raises(IndexError):
        dataset[3]


# ---------------------------------------------------------------- samples


def assert_same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_deterministic_across_instances_and_order():
    config = AVDigitsConfig(num_digits=6, seed=3)
    first, second = AVDigitsDataset("train", 20, config), AVDigitsDataset("train", 20, config)
    forward = [first[i] for i in range(20)]
    for i in reversed(range(20)):
        assert_same_sample(second[i], forward[i])
        assert_same_sample(first[i], forward[i])
    # another seed or split gives other examples
    other_seed = AVDigitsDataset("train", 20, AVDigitsConfig(num_digits=6, seed=4))
    other_split = AVDigitsDataset("val", 20, config)
    assert sum(other_seed[i]["digits"] == forward[i]["digits"] for i in range(20)) <= 1
    assert sum(other_split[i]["digits"] == forward[i]["digits"] for i in range(20)) <= 1


def test_sequence_does_not_depend_on_the_modality_mix():
    both = AVDigitsDataset("test", 10, AVDigitsConfig(modality_mix={"both": 1.0}))
    video = AVDigitsDataset("test", 10, AVDigitsConfig(modality_mix=VIDEO_ONLY))
    for i in range(10):
        a, b = both[i], video[i]
        assert (a["digits"], a["text"], a["label"]) == (b["digits"], b["text"], b["label"])
        assert torch.equal(a["video"], b["video"]) and b["audio"] is None


def test_question_mix_sets_the_share_of_each_question_type():
    questions = ["first", "last", "count"]
    uniform = AVDigitsDataset("train", 600, AVDigitsConfig(num_digits=2, questions=questions))
    mixed = AVDigitsDataset(
        "train", 600,
        AVDigitsConfig(num_digits=2, questions=questions, question_mix={"count": 0.6, "last": 0.4}),
    )  # fmt: skip
    drawn = Counter(mixed[i]["question"] for i in range(600))
    assert drawn["first"] == 0 and abs(drawn["count"] / 600 - 0.6) < 0.06  # 3 sigma: 0.06
    shares = Counter(uniform[i]["question"] for i in range(600))
    assert all(abs(shares[q] / 600 - 1 / 3) < 0.06 for q in questions)


@pytest.mark.parametrize("num_digits", [2, 3, 8, 40])
@pytest.mark.parametrize("question", QUESTION_TYPES)
def test_answers_follow_from_the_sequence(question, num_digits):
    config = AVDigitsConfig(num_digits=num_digits, questions=[question], modality_mix=VIDEO_ONLY)
    dataset = AVDigitsDataset("train", 60, config)
    for i in range(60):
        sample = dataset[i]
        assert len(sample["digits"]) == num_digits and sample["question"] == question
        assert 0 <= sample["label"] <= 9
        assert sample["label"] == expected_answer(sample), sample
        d = sample["query_digit"]
        if question in ("count", "after"):
            assert str(d) in sample["text"] or WORDS[d] in sample["text"], sample["text"]
        else:
            assert d is None and not any(c.isdigit() for c in sample["text"])
        assert sample["text"].endswith("?")


@pytest.mark.parametrize("question", QUESTION_TYPES)
def test_answers_are_roughly_uniform(question):
    n, num_digits = 1000, 12
    config = AVDigitsConfig(num_digits=num_digits, questions=[question], modality_mix=VIDEO_ONLY, seed=1)
    dataset = AVDigitsDataset("train", n, config)
    labels = np.array([dataset[i]["label"] for i in range(n)])
    frequencies = np.bincount(labels, minlength=10) / n
    # uniform over 10 answers (count: 0..9 as well, since K >= 9); binomial std 0.0095, 4.5 std
    assert np.abs(frequencies - 0.1).max() < 4.5 * math.sqrt(0.1 * 0.9 / n), frequencies


def test_count_answers_stop_at_k_for_short_sequences():
    config = AVDigitsConfig(num_digits=3, questions=["count"], modality_mix=VIDEO_ONLY)
    dataset = AVDigitsDataset("train", 400, config)
    labels = [dataset[i]["label"] for i in range(400)]
    assert set(labels) == {0, 1, 2, 3}


def test_modality_mix_frequencies():
    n = 400
    mix = {"both": 0.5, "audio": 0.25, "video": 0.25}
    dataset = AVDigitsDataset("val", n, AVDigitsConfig(num_digits=2, modality_mix=mix))
    seen = {name: 0 for name in mix}
    for i in range(n):
        sample = dataset[i]
        seen[sample["mix"]] += 1
        assert (sample["audio"] is None) == (sample["mix"] == "video")
        assert (sample["video"] is None) == (sample["mix"] == "audio")
        assert (sample["clip_indices"] is None) == (sample["audio"] is None)
        assert (sample["image_indices"] is None) == (sample["video"] is None)
    for name, p in mix.items():
        assert abs(seen[name] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), seen
    audio_only = AVDigitsDataset("val", 20, AVDigitsConfig(modality_mix={"audio": 1.0}))
    assert all(audio_only[i]["video"] is None and audio_only[i]["audio"] is not None for i in range(20))


def test_frames_are_the_stored_images_of_the_digits(arrays):
    config = AVDigitsConfig(num_digits=10, modality_mix=VIDEO_ONLY)
    for code, split in enumerate(SPLITS):
        dataset = AVDigitsDataset(split, 10, config)
        for i in range(10):
            sample = dataset[i]
            video, indices = sample["video"], np.array(sample["image_indices"])
            assert video.shape == (10, 1, 8, 8) and video.dtype == torch.float32
            assert (arrays["image_labels"][indices] == sample["digits"]).all()
            assert (arrays["image_split"][indices] == code).all()
            expected = torch.from_numpy(arrays["images"][indices]).float() / 8 - 1  # (K, 8, 8)
            assert torch.equal(video[:, 0], expected)
            assert video.min() >= -1 and video.max() <= 1


def test_frame_size_and_channels(arrays):
    base = AVDigitsDataset("train", 2, AVDigitsConfig(modality_mix=VIDEO_ONLY))[1]["video"]  # (K, 1, 8, 8)
    nearest = AVDigitsConfig(modality_mix=VIDEO_ONLY, frame_size=16, channels=3)
    video = AVDigitsDataset("train", 2, nearest)[1]["video"]
    assert video.shape == (8, 3, 16, 16)
    assert torch.equal(video, base.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(-1, 3, -1, -1))
    bilinear = AVDigitsConfig(modality_mix=VIDEO_ONLY, frame_size=32, frame_resize="bilinear")
    video = AVDigitsDataset("train", 2, bilinear)[1]["video"]
    assert video.shape == (8, 1, 32, 32) and video.min() >= -1 and video.max() <= 1
    # block means of the bilinear upsampling stay close to the source pixels
    assert (video.unflatten(2, (8, 4)).unflatten(4, (8, 4)).mean((3, 5)) - base).abs().mean() < 0.15


def test_audio_is_the_clips_with_the_gaps_between(arrays):
    gap = 0.1
    config = AVDigitsConfig(num_digits=5, modality_mix={"audio": 1.0}, noise=0.0, gap_seconds=(gap, gap))
    audio, offsets = arrays["audio"], arrays["clip_offsets"]
    for code, split in enumerate(SPLITS):
        dataset = AVDigitsDataset(split, 5, config)
        for i in range(5):
            sample = dataset[i]
            clips = np.array(sample["clip_indices"])
            assert (arrays["clip_labels"][clips] == sample["digits"]).all()
            assert (arrays["clip_split"][clips] == code).all()
            wave, position = sample["audio"].numpy(), 0
            assert sample["audio"].dtype == torch.float32
            for k, j in enumerate(clips):
                clip = audio[offsets[j] : offsets[j + 1]].astype(np.float32) / 32768
                np.testing.assert_array_equal(wave[position : position + len(clip)], clip)
                position += len(clip)
                if k < len(clips) - 1:
                    assert not wave[position : position + 1600].any()  # 0.1 s of silence
                    position += 1600
            assert position == len(wave)


def test_audio_length_and_noise(arrays):
    low, high = 0.05, 0.2
    config = AVDigitsConfig(num_digits=8, modality_mix={"audio": 1.0}, noise=0.5, gap_seconds=(low, high))
    dataset = AVDigitsDataset("train", 20, config)
    lengths = np.diff(arrays["clip_offsets"])
    for i in range(20):
        sample = dataset[i]
        speech = int(lengths[sample["clip_indices"]].sum())
        silence = len(sample["audio"]) - speech  # the K - 1 gaps
        assert 7 * round(low * 16000) <= silence <= 7 * round(high * 16000)
    # noise: std 0.5 x the speech RMS (0.1) wherever there is no speech, i.e. at the gaps
    clean = AVDigitsDataset("train", 20, AVDigitsConfig(**{**vars(config), "noise": 0.0}))
    noise = torch.cat([dataset[i]["audio"] - clean[i]["audio"] for i in range(20)])
    assert noise.std().item() == pytest.approx(0.5 * dataset.speech_rms, rel=0.02)
    assert dataset.speech_rms == pytest.approx(0.1, rel=0.02)
    assert noise.abs().max().item() <= math.sqrt(3) * 0.5 * dataset.speech_rms * (1 + 1e-5)  # uniform


def test_longest_audio_bounds_every_example(arrays):
    config = AVDigitsConfig(num_digits=6, modality_mix={"audio": 1.0}, gap_seconds=(0.05, 0.2))
    dataset = AVDigitsDataset("val", 200, config)
    lengths = [len(dataset[i]["audio"]) for i in range(200)]
    clips = np.diff(arrays["clip_offsets"])[arrays["clip_split"] == 1]  # the val split's clips
    assert dataset.longest_audio() == 6 * clips.max() + 5 * round(0.2 * 16000)
    assert max(lengths) <= dataset.longest_audio()


def test_likely_longest_audio_bounds_sampled_examples_with_less_padding():
    config = AVDigitsConfig(num_digits=16, modality_mix={"audio": 1.0}, questions=["first", "count"])
    dataset = AVDigitsDataset("train", 1000, config)
    longest = max(len(dataset[i]["audio"]) for i in range(1000))
    assert longest <= dataset.likely_longest_audio() < 0.9 * dataset.longest_audio()
    assert dataset.likely_longest_audio(sigmas=0.0) < dataset.likely_longest_audio()
    one = AVDigitsDataset("train", 1, AVDigitsConfig(num_digits=1, questions=["first"]))  # capped
    assert one.likely_longest_audio() == one.longest_audio()


def test_sample_rate_resamples_the_clips(arrays):
    config = AVDigitsConfig(num_digits=4, modality_mix={"audio": 1.0}, noise=0.0, gap_seconds=(0.1, 0.1))
    at_16k = AVDigitsDataset("test", 3, config)
    at_8k = AVDigitsDataset("test", 3, AVDigitsConfig(**{**vars(config), "sample_rate": 8000}))
    for i in range(3):
        a, b = at_16k[i], at_8k[i]
        assert a["clip_indices"] == b["clip_indices"]
        assert abs(len(b["audio"]) - len(a["audio"]) / 2) <= 4  # rounding of 4 clips
        spectrum_a = torch.fft.rfft(a["audio"]).abs().square()
        assert spectrum_a[: len(spectrum_a) // 2].sum() > 0.5 * spectrum_a.sum()  # speech below 4 kHz


def test_long_sequences():
    config = AVDigitsConfig(num_digits=1000, seed=0, modality_mix={"both": 1.0})
    dataset = AVDigitsDataset("train", 5, config)
    for i in range(2):
        sample = dataset[i]
        assert sample["video"].shape == (1000, 1, 8, 8)
        seconds = len(sample["audio"]) / 16000
        assert 1000 * 0.3 < seconds < 1000 * 0.9  # about 0.45 s per word plus 0.07 s per gap
        assert sample["label"] == expected_answer(sample)


def test_collate_batches_samples():
    dataset = AVDigitsDataset("val", 6, AVDigitsConfig(num_digits=3, seed=2))
    samples = [dataset[i] for i in range(6)]
    batch = collate_samples(samples)
    assert batch.ids == [s["id"] for s in samples]
    assert batch.labels.tolist() == [s["label"] for s in samples]
    has_audio = [s["audio"] is not None for s in samples]
    has_video = [s["video"] is not None for s in samples]
    assert batch.present()["audio"] == has_audio and batch.present()["video"] == has_video
    assert batch.inputs["video"].shape == (6, 3, 1, 8, 8)
    assert batch.lengths["video"].tolist() == [3 if v else 0 for v in has_video]
    assert batch.lengths["audio"].tolist() == [0 if s["audio"] is None else len(s["audio"]) for s in samples]
    assert batch.lengths["text"].tolist() == [len(s["text"].encode()) for s in samples]
    for row, sample in enumerate(samples):
        if sample["audio"] is not None:
            assert torch.equal(batch.inputs["audio"][row, : len(sample["audio"])], sample["audio"])
