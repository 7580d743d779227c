"""ManifestDataset: parsing and validation of JSONL manifests, and decoding against references.

Legend: S audio samples, T frames, C channels, H x W frame size, h x w stored frame size.

Media are generated in tmp_path: sine waves written with soundfile, PNG frames with PIL, mp4
clips with PyAV (libx264, lossless; mpeg4 at a high bit rate where the build lacks libx264).
Decoded values are compared with references computed by hand: torchaudio's resample on the
written waveform, PIL's own resize of the PNGs, and the grey level each mp4 frame was painted.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio.functional
from PIL import Image

from mmlongnet.data import ManifestDataset, collate_samples

MEDIA = "needs the media extra: pip install 'mmlongnet[media]'"
av = pytest.importorskip("av", reason=MEDIA)  # writes the mp4 clips
soundfile = pytest.importorskip("soundfile", reason=MEDIA)  # writes the audio files

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "data" / "example_manifest" / "manifest.jsonl"
LEVEL = 1 / 127.5  # one uint8 grey level in the dataset's [-1, 1] units


def write_manifest(folder: Path, lines: list[dict | str], name: str = "manifest.jsonl") -> Path:
    """Write lines (dicts as JSON, strings verbatim) one per line; returns the path."""
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_sine(path: Path, n: int, rate: int, channels: int, subtype: str = "FLOAT") -> np.ndarray:
    """Write n frames of per-channel sines; returns the (n, channels) float32 written."""
    t = np.arange(n) / rate
    data = np.stack([0.5 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)], axis=1)
    soundfile.write(path, data.astype(np.float32), rate, subtype=subtype)
    return soundfile.read(path, dtype="float32", always_2d=True)[0]  # what the file holds (PCM rounds)


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """(T, h, w, 3) uint8 -> folder/frame_000.png ..."""
    folder.mkdir()
    for index, pixels in enumerate(frames):
        Image.fromarray(pixels).save(folder / f"frame_{index:03d}.png")


def grey_level(index: int) -> int:
    """The uint8 grey level painted on frame `index` of the test mp4s (distinct by 25 levels)."""
    return 20 + 25 * index


def write_mp4(path: Path, frames: int = 8, size: int = 32, fps: int = 8) -> None:
    """An mp4 of `frames` uniform grey frames (frame i at grey_level(i)), fps frames per second."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": "0"}  # lossless
        else:
            stream.bit_rate = 4_000_000
        for index in range(frames):
            pixels = np.full((size, size, 3), grey_level(index), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def mp4_frame_levels(video: torch.Tensor) -> list[int]:
    """(T, C, H, W) in [-1, 1] -> the nearest painted frame index of every frame."""
    levels = (video.mean(dim=(1, 2, 3)) + 1) * 127.5  # (T,) uint8 units
    return [round((level.item() - 20) / 25) for level in levels]


# ---- decoding, against references ------------------------------------------------------------


def test_stereo_8k_wav_is_averaged_to_mono_and_resampled(tmp_path):
    written = write_sine(tmp_path / "a.wav", n=1001, rate=8000, channels=2)
    path = write_manifest(tmp_path, [{"audio": "a.wav"}])
    audio = ManifestDataset(path, sample_rate=16000)[0]["audio"]
    mono = torch.from_numpy(written).mean(dim=1)  # (n,)
    expected = torchaudio.functional.resample(mono, 8000, 16000)  # (S,)
    assert audio.dtype == torch.float32 and audio.shape == (math.ceil(1001 * 16000 / 8000),)
    torch.testing.assert_close(audio, expected, rtol=0, atol=1e-6)
    left = torchaudio.functional.resample(torch.from_numpy(written[:, 0]), 8000, 16000)
    assert not torch.allclose(audio, left, atol=1e-2)  # the channels differ: reading one would fail


def test_flac_at_the_dataset_rate_is_read_unchanged(tmp_path):
    written = write_sine(tmp_path / "a.flac", n=4000, rate=16000, channels=1, subtype="PCM_16")
    path = write_manifest(tmp_path, [{"audio": "a.flac", "text": "hi"}])
    sample = ManifestDataset(path, sample_rate=16000)[0]
    torch.testing.assert_close(sample["audio"], torch.from_numpy(written[:, 0]), rtol=0, atol=0)
    assert sample["text"] == "hi" and sample["video"] is None


def test_frame_folder_matches_the_pngs_unresized_and_resized(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)  # (T, h, w, 3)
    write_frames(tmp_path / "frames", frames)
    path = write_manifest(tmp_path, [{"video": "frames"}])

    video = ManifestDataset(path, frame_size=(20, 24))[0]["video"]
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, h, w)
    torch.testing.assert_close(video, expected, rtol=0, atol=1e-6)

    # Resized to (H, W) = (10, 12): PIL's bilinear reduction is the same antialiased triangle
    # filter; it rounds to uint8, so the two agree within one grey level.
    video = ManifestDataset(path, frame_size=(10, 12))[0]["video"]
    pil = np.stack([np.asarray(Image.fromarray(f).resize((12, 10), Image.BILINEAR)) for f in frames])
    expected = torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, 3, H, W)
    assert video.shape == (3, 3, 10, 12)
    torch.testing.assert_close(video, expected, rtol=0, atol=LEVEL)

    # Grey: BT.601 luma, as PIL's convert("L") (which rounds to uint8).
    video = ManifestDataset(path, frame_size=(20, 24), channels=1)[0]["video"]
    grey = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in frames])  # (T, h, w)
    torch.testing.assert_close(video[:, 0], torch.from_numpy(grey).float() / 127.5 - 1, rtol=0, atol=LEVEL)

    assert ManifestDataset(path, frame_size=(20, 24), max_frames=2)[0]["video"].shape == (2, 3, 20, 24)


def test_frame_folder_is_sorted_by_file_name(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name, level in (("b.png", 200), ("a.png", 100), ("c.jpg", 0)):
        Image.fromarray(np.full((4, 4, 3), level, dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not a frame")
    video = ManifestDataset(write_manifest(tmp_path, [{"video": "frames"}]), frame_size=4)[0]["video"]
    levels = ((video.mean(dim=(1, 2, 3)) + 1) * 127.5).tolist()
    assert levels == pytest.approx([100, 200, 0], abs=2)  # jpeg is lossy


def test_mp4_every_frame_and_sampled_at_a_frame_rate(tmp_path):
    write_mp4(tmp_path / "clip.mp4", frames=8, size=32, fps=8)
    path = write_manifest(tmp_path, [{"video": "clip.mp4"}])

    video = ManifestDataset(path, frame_size=32)[0]["video"]
    assert video.dtype == torch.float32 and video.shape == (8, 3, 32, 32)
    # yuv420p stores grey exactly in Y; the limited-range RGB -> Y -> RGB round trip rounds
    # twice, off by at most 1 level (+ float rounding).
    expected = torch.tensor([grey_level(i) for i in range(8)]).float().view(8, 1, 1, 1) / 127.5 - 1
    torch.testing.assert_close(video, expected.expand_as(video), rtol=0, atol=1.01 * LEVEL)

    def frames(**options):
        return ManifestDataset(path, frame_size=16, **options)[0]["video"]

    assert frames().shape == (8, 3, 16, 16)
    assert mp4_frame_levels(frames(frame_rate=4)) == [0, 2, 4, 6]  # times 0, 0.25, 0.5, 0.75 s
    assert mp4_frame_levels(frames(frame_rate=16)) == [i // 2 for i in range(16)]  # each shown twice
    assert mp4_frame_levels(frames(frame_rate=40)) == [i // 5 for i in range(40)]  # > one resize chunk
    assert mp4_frame_levels(frames(frame_rate=3)) == [0, 2, 5]  # times 0, 1/3, 2/3 s
    assert mp4_frame_levels(frames(max_frames=3)) == [0, 1, 2]
    assert mp4_frame_levels(frames(frame_rate=4, max_frames=3)) == [0, 2, 4]
    assert frames(channels=1).shape == (8, 1, 16, 16)


# ---- labels, ids, classes --------------------------------------------------------------------


def test_labels_by_name_by_index_target_synonym_and_none(tmp_path):
    path = write_manifest(
        tmp_path,
        [
            {"text": "a", "label": "dog"},
            {"text": "b", "label": 0},
            {"text": "c", "target": "bird"},
            {"text": "d", "target": 1},
            {"text": "e"},
            {"text": "f", "label": None},
            {"text": "g", "label": -1},
        ],
    )
    dataset = ManifestDataset(path, classes=["cat", "dog", "bird"])
    assert [dataset[i]["label"] for i in range(len(dataset))] == [1, 0, 2, 1, -1, -1, -1]
    assert dataset.num_classes == 3


def test_num_classes_without_classes(tmp_path):
    labelled = write_manifest(tmp_path, [{"text": "a", "label": 4}, {"text": "b", "target": 1}], "a.jsonl")
    assert ManifestDataset(labelled).num_classes == 5
    unlabelled = write_manifest(tmp_path, [{"text": "a"}, {"text": "b", "label": -1}], "b.jsonl")
    assert ManifestDataset(unlabelled).num_classes is None


def test_id_defaults_to_the_line_number_counting_blank_lines(tmp_path):
    path = write_manifest(
        tmp_path, [{"text": "a", "id": "first"}, "", "   ", {"text": "b"}, {"text": "c", "id": 7}]
    )
    dataset = ManifestDataset(path)
    assert [dataset[i]["id"] for i in range(len(dataset))] == ["first", "line-4", "7"]


def test_meta_is_free_form_and_ignored(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a", "meta": {"anything": [1, {"nested": True}]}}])
    assert ManifestDataset(path)[0] == {
        "id": "line-1",
        "text": "a",
        "audio": None,
        "video": None,
        "label": -1,
    }


def test_absolute_paths_and_paths_relative_to_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write_sine(tmp_path / "a.wav", n=160, rate=16000, channels=1)
    write_sine(tmp_path / "sub" / "b.wav", n=320, rate=16000, channels=1)
    path = write_manifest(
        tmp_path / "sub",
        [
            {"audio": "../a.wav"},
            {"audio": str(tmp_path / "a.wav")},
            {"audio": str(tmp_path / "sub" / "b.wav")},
        ],
    )
    monkeypatch.chdir(REPO)  # not the manifest's folder
    dataset = ManifestDataset(path, allow_outside_paths=True)
    assert dataset[0]["audio"].shape == dataset[1]["audio"].shape == (160,)
    assert dataset[2]["audio"].shape == (320,)
    inside = write_manifest(tmp_path / "sub", [{"audio": str(tmp_path / "sub" / "b.wav")}], "inside.jsonl")
    assert ManifestDataset(inside)[0]["audio"].shape == (320,)  # absolute, but inside: allowed


@pytest.mark.parametrize("escape", ["dot-dot", "absolute", "symlink", "symlinked folder"])
def test_a_path_outside_the_manifest_folder_is_rejected_unless_allowed(tmp_path, escape):
    (tmp_path / "sub").mkdir()
    write_sine(tmp_path / "a.wav", n=160, rate=16000, channels=1)
    value = {"dot-dot": "../a.wav", "absolute": str(tmp_path / "a.wav"), "symlink": "link.wav",
             "symlinked folder": "linked/a.wav"}[escape]  # fmt: skip
    (tmp_path / "sub" / "link.wav").symlink_to(tmp_path / "a.wav")
    (tmp_path / "sub" / "linked").symlink_to(tmp_path, target_is_directory=True)
    path = write_manifest(tmp_path / "sub", [{"text": "fine"}, {"text": "x", "audio": value}])
    with pytest.raises(ValueError) as info:
        ManifestDataset(path)
    message = str(info.value)
    assert f"{path}, line 2: audio path {value!r} resolves to {(tmp_path / 'a.wav').resolve()}" in message
    assert "outside the manifest's folder" in message and "allow_outside_paths=True" in message
    assert ManifestDataset(path, allow_outside_paths=True)[1]["audio"].shape == (160,)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert len(ManifestDataset(path, on_error="skip")) == 1


# ---- errors ----------------------------------------------------------------------------------


def test_missing_file_names_the_manifest_line_and_file(tmp_path):
    path = write_manifest(tmp_path, [{"text": "ok"}, {"text": "x", "audio": "missing/nothing.wav"}])
    with pytest.raises(FileNotFoundError) as info:
        ManifestDataset(path)
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "nothing.wav" in message
    assert "on_error='skip'" in message


def test_missing_video_folder_or_file(tmp_path):
    path = write_manifest(tmp_path, [{"video": "frames_gone"}])
    with pytest.raises(FileNotFoundError, match=r"line 1: video file .*frames_gone does not exist"):
        ManifestDataset(path)


def test_unknown_key_names_the_line_and_the_key(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a"}, {"text": "b"}, {"text": "c", "auido": "a.wav"}])
    with pytest.raises(ValueError, match=r"line 3: unknown key 'auido'.*meta"):
        ManifestDataset(path)


def test_json_syntax_error_names_the_file_and_the_line(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a"}, '{"text": "b",}'])
    with pytest.raises(ValueError, match=r"manifest\.jsonl, line 2: invalid JSON") as info:
        ManifestDataset(path)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ({"id": "x"}, "no modality"),
        ({"text": ""}, "no modality"),
        ({"text": "a", "meta": {}, "label": None, "audio": None}, None),  # valid: text only
        ('["text", "a"]', "expected a JSON object"),
        ({"text": 3}, "'text' must be a string"),
        ({"text": "a", "audio": 5}, "'audio' must be a non-empty path"),
        ({"text": "a", "id": True}, "'id' must be a string or int"),
        ({"text": "a", "label": 1.5}, "'label' must be an int"),
        ({"text": "a", "label": True}, "'label' must be an int"),
        ({"text": "a", "label": 3}, r"'label' 3 is out of range; use -1 \(no label\) or 0..2"),
        ({"text": "a", "target": -2}, "'target' -2 is out of range"),
        ({"text": "a", "label": "cow"}, r"'label' 'cow' is not one of the classes \['cat', 'dog', 'bird'\]"),
        ({"text": "a", "label": 0, "target": 0}, "both 'label' and 'target'"),
    ],
)
def test_invalid_lines(tmp_path, line, match):
    path = write_manifest(tmp_path, [line])
    if match is None:
        assert len(ManifestDataset(path, classes=["cat", "dog", "bird"])) == 1
        return
    with pytest.raises(ValueError, match=f"line 1: {match}"):
        ManifestDataset(path, classes=["cat", "dog", "bird"])


def test_class_name_without_classes(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a", "label": "dog"}])
    with pytest.raises(
        ValueError, match=r"line 1: 'label' is the class name 'dog', but no classes.*classes=\["
    ):
        ManifestDataset(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a", "id": "x"}, {"text": "b"}, {"text": "c", "id": "x"}])
    with pytest.raises(ValueError, match="line 3: id 'x' is already used on line 1"):
        ManifestDataset(path)


def test_unopenable_media_is_reported_at_construction(tmp_path):
    (tmp_path / "fake.wav").write_text("not audio")
    (tmp_path / "fake.mp4").write_text("not video")
    (tmp_path / "empty").mkdir()
    for line, match in (
        ({"audio": "fake.wav"}, r"audio file .*fake\.wav cannot be opened by soundfile"),
        ({"video": "fake.mp4"}, r"video file .*fake\.mp4 cannot be opened by PyAV"),
        ({"video": "empty"}, r"video folder .*empty has no image files"),
        ({"audio": "empty"}, r"audio .*empty is a folder"),
    ):
        with pytest.raises(ValueError, match=f"line 1: {match}"):
            ManifestDataset(write_manifest(tmp_path, [line]))


def test_on_error_skip_leaves_out_bad_lines_and_warns_once(tmp_path):
    write_sine(tmp_path / "a.wav", n=100, rate=16000, channels=1)
    path = write_manifest(
        tmp_path,
        [
            {"text": "good", "audio": "a.wav"},
            {"text": "x", "audio": "gone.wav"},
            "{not json",
            "",
            {"text": "good too"},
            {"text": "y", "colour": "red"},
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ManifestDataset(path, on_error="skip")
    assert [str(w.message) for w in caught if "skipped" in str(w.message)] == [
        f"ManifestDataset: skipped 3 of 5 lines of {path} (first: line 2: audio file {tmp_path / 'gone.wav'} "
        f"does not exist (relative paths are resolved against {tmp_path})); the list is in .skipped"
    ]
    assert [line for line, _ in dataset.skipped] == [2, 3, 6]
    assert "invalid JSON" in dataset.skipped[1][1] and "'colour'" in dataset.skipped[2][1]
    assert len(dataset) == 2
    assert [dataset[i]["id"] for i in range(2)] == ["line-1", "line-5"]


def test_a_manifest_without_samples_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"has no samples \(0 non-blank lines"):
        ManifestDataset(write_manifest(tmp_path, ["", ""]))
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(ValueError, match="1 skipped"):
        ManifestDataset(write_manifest(tmp_path, [{"text": ""}]), on_error="skip")
    with pytest.raises(FileNotFoundError, match="manifest .*nowhere.jsonl does not exist"):
        ManifestDataset(tmp_path / "nowhere.jsonl")


def test_decoding_error_at_read_time_names_the_line_and_the_file(tmp_path):
    write_mp4(tmp_path / "clip.mp4", frames=2)
    write_sine(tmp_path / "a.wav", n=100, rate=16000, channels=1)
    dataset = ManifestDataset(
        write_manifest(tmp_path, [{"text": "a"}, {"video": "clip.mp4", "audio": "a.wav"}])
    )
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)  # corrupted after the check
    with pytest.raises(ValueError, match=r"line 2 \(id 'line-2'\): cannot decode .*clip\.mp4"):
        dataset[1]
    (tmp_path / "a.wav").unlink()
    write_mp4(tmp_path / "clip.mp4", frames=2)
    with pytest.raises(FileNotFoundError, match=r"line 2 \(id 'line-2'\): .*a\.wav no longer exists"):
        dataset[1]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"channels": 2}, "channels=2"),
        ({"frame_size": (0, 4)}, r"frame_size=\(0, 4\)"),
        ({"frame_size": (4, 4, 4)}, "frame_size="),
        ({"sample_rate": 0}, "sample_rate=0"),
        ({"frame_rate": -1.0}, "frame_rate=-1.0"),
        ({"max_frames": 0}, "max_frames=0"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"classes": "cat"}, "is one string; pass a list"),
        ({"classes": ["a", "a"]}, r"duplicates \['a'\]"),
    ],
)
def test_invalid_arguments(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        ManifestDataset(write_manifest(tmp_path, [{"text": "a"}]), **options)


# ---- batching and the shipped example ----------------------------------------------------------


def test_collate_batches_samples_of_mixed_modalities(tmp_path):
    write_sine(tmp_path / "a.wav", n=800, rate=8000, channels=1)
    write_frames(tmp_path / "frames", np.zeros((3, 8, 8, 3), dtype=np.uint8))
    write_mp4(tmp_path / "clip.mp4", frames=5, size=16)
    path = write_manifest(
        tmp_path,
        [
            {"text": "abc", "label": 1},
            {"audio": "a.wav", "video": "frames", "label": 0},
            {"text": "de", "video": "clip.mp4"},
        ],
    )
    dataset = ManifestDataset(path, frame_size=8)
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    assert batch.ids == ["line-1", "line-2", "line-3"]
    assert batch.lengths["text"].tolist() == [3, 0, 2]
    assert batch.lengths["audio"].tolist() == [0, 1600, 0]
    assert batch.lengths["video"].tolist() == [0, 3, 5]
    assert batch.inputs["video"].shape == (3, 5, 3, 8, 8)
    assert batch.inputs["audio"].shape == (3, 1600)
    assert batch.labels.tolist() == [1, 0, -1]
    torch.testing.assert_close(batch.inputs["video"][1, :3], torch.full((3, 3, 8, 8), -1.0))


def test_the_shipped_example_loads_and_every_sample_decodes():
    dataset = ManifestDataset(EXAMPLE, classes=["red", "green", "blue"], frame_size=32)
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped == [] and dataset.num_classes == 3
    assert [s["id"] for s in samples] == [
        "text-only",
        "tone-and-text",
        "frame-folder",
        "mp4-and-flac",
        "line-5",
    ]
    assert [s["label"] for s in samples] == [0, 0, 1, 2, -1]
    assert samples[1]["audio"].shape == (16000 // 2,)  # 0.5 s at 8 kHz -> 16 kHz
    assert samples[2]["video"].shape == (8, 3, 32, 32)
    assert samples[3]["video"].shape == (16, 3, 32, 32) and samples[3]["audio"].shape == (32000,)
    # The folder's square is green and the clip's blue: the brightest channel says so.
    assert samples[2]["video"].amax(dim=(0, 2, 3)).argmax().item() == 1
    assert samples[3]["video"].amax(dim=(0, 2, 3)).argmax().item() == 2
    batch = collate_samples(samples)
    assert batch.labels.tolist() == [0, 0, 1, 2, -1]
    assert batch.lengths["video"].tolist() == [0, 0, 8, 16, 0]


@pytest.mark.parametrize("key", ["audio", "video"])
def test_a_fifo_is_rejected_without_opening_it(tmp_path, key):
    """Only regular files (and frame folders) are opened: a FIFO would block the reader forever,
    also with on_error='skip'."""
    import os

    os.mkfifo(tmp_path / "pipe")
    path = write_manifest(tmp_path, [{"text": "a", key: "pipe"}])
    with pytest.raises(ValueError, match=r"line 1: .*(not|neither) a regular file"):
        ManifestDataset(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):  # the only line is skipped: nothing is left
            ManifestDataset(path, on_error="skip")


# ---- media checked against their headers, labels against the model -------------------------


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_a_truncated_wav_is_a_bad_line_naming_the_file(tmp_path):
    """The header declares 8000 frames, the file holds 2652 (soundfile alone would read them silently)."""
    write_sine(tmp_path / "cut.wav", n=8000, rate=16000, channels=1, subtype="PCM_16")
    truncate(tmp_path / "cut.wav", 44 + 2 * 2652)  # 44-byte header, 2 bytes a frame
    write_sine(tmp_path / "whole.wav", n=800, rate=16000, channels=1, subtype="PCM_16")
    path = write_manifest(tmp_path, [{"audio": "whole.wav"}, {"audio": "cut.wav"}])
    with pytest.raises(ValueError) as info:
        ManifestDataset(path)
    assert (
        f"{path}, line 2: audio file {tmp_path / 'cut.wav'} is truncated: its header declares 8000 "
        "frames, the file holds 2652" in str(info.value)
    )
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        dataset = ManifestDataset(path, on_error="skip")
    assert [line for line, _ in dataset.skipped] == [2] and dataset[0]["audio"].shape == (800,)


def test_audio_decoding_fewer_frames_than_the_header_states_raises(tmp_path, monkeypatch):
    """For formats whose header is not parsed up front (flac, ogg, ...): checked when decoding."""
    write_sine(tmp_path / "a.flac", n=1600, rate=16000, channels=1, subtype="PCM_16")
    dataset = ManifestDataset(write_manifest(tmp_path, [{"audio": "a.flac"}]))
    read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda self, *a, **k: read(self, *a, **k)[:1000])
    with pytest.raises(ValueError, match=r"line 1 .*a\.flac: its header states 1600 frames, 1000 decoded"):
        dataset[0]


def write_cut_mp4(path: Path, frames: int, keep: int) -> None:
    """An mp4 (index first, intra-only mjpeg) stating `frames` frames, cut after its first `keep`."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuvj420p"
        for index in range(frames):
            pixels = np.full((32, 32, 3), grey_level(index), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        ends = [packet.pos + packet.size for packet in container.demux(video=0) if packet.size]
    truncate(path, ends[keep - 1])  # at a packet boundary: the decoder itself sees no error


@pytest.mark.parametrize("frame_rate", [None, 4.0])
def test_a_video_holding_fewer_frames_than_its_container_states_raises(tmp_path, frame_rate):
    write_cut_mp4(tmp_path / "cut.mp4", frames=8, keep=4)
    dataset = ManifestDataset(
        write_manifest(tmp_path, [{"video": "cut.mp4"}]), frame_size=32, frame_rate=frame_rate
    )
    with pytest.raises(ValueError, match=r"line 1 .*cut\.mp4: the container states 8 frames, 4 decoded"):
        dataset[0]
    short = ManifestDataset(dataset.manifest, frame_size=32, max_frames=3)  # stops before the cut
    assert mp4_frame_levels(short[0]["video"]) == [0, 1, 2]


def test_a_label_out_of_range_of_num_classes_names_its_line(tmp_path):
    path = write_manifest(tmp_path, [{"text": "a", "label": 2}, {"text": "b", "label": 3}, {"text": "c"}])
    assert ManifestDataset(path).num_classes == 4  # unchecked without num_classes
    with pytest.raises(ValueError) as info:
        ManifestDataset(path, num_classes=3)
    assert f"{path}, line 2: 'label' 3 is out of range; use -1 (no label) or 0..2" in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        assert ManifestDataset(path, num_classes=3, on_error="skip").num_classes == 3
    with pytest.raises(ValueError, match="num_classes=3, but 2 classes are given"):
        ManifestDataset(path, classes=["x", "y"], num_classes=3)


def test_the_data_module_passes_num_classes_and_allow_outside_paths_on(tmp_path):
    from mmlongnet.training import ManifestDataModule

    (tmp_path / "sub").mkdir()
    write_sine(tmp_path / "a.wav", n=160, rate=16000, channels=1)
    path = write_manifest(tmp_path / "sub", [{"audio": "../a.wav", "label": 1}])
    with pytest.raises(ValueError, match="line 1: 'label' 1 is out of range"):
        ManifestDataModule(train=str(path), num_classes=1, allow_outside_paths=True).setup("fit")
    with pytest.raises(ValueError, match="line 1: audio path '../a.wav' resolves to"):
        ManifestDataModule(train=str(path), num_classes=2).setup("fit")
    data = ManifestDataModule(train=str(path), num_classes=2, allow_outside_paths=True)
    data.setup("fit")
    assert data.datasets["train"].num_classes == 2 and data.datasets["train"][0]["label"] == 1


def test_data_module_takes_num_classes_from_the_model(tmp_path):
    """A label the classifier cannot predict is found when the data module is set up."""
    from types import SimpleNamespace

    from mmlongnet.training import ManifestDataModule

    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 7}\n')
    module = ManifestDataModule(train=str(manifest), buckets=None)
    module.trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"num_classes": 5}, model=None))
    with pytest.raises(ValueError, match=r"train.jsonl.*line 2"):
        module.setup("fit")
