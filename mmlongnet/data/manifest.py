"""`ManifestDataset`: your own multimodal samples, listed one per line in a JSONL manifest.

Legend: S audio samples (at the dataset's `sample_rate`), T frames, C channels (1 grey or 3 RGB),
H x W frame size (the dataset's `frame_size`), h x w a frame's size as stored.

The manifest is a UTF-8 text file with one JSON object per line (blank lines are allowed):

    {"id": "clip-1", "text": "a dog barks", "audio": "wav/clip-1.wav", "label": "dog"}
    {"text": "a cat, no media, no label"}
    {"video": "frames/clip-2/", "target": 3, "meta": {"source": "free-form, ignored"}}
    {"video": "clips/clip-3.mp4", "audio": "clip-3.flac", "label": 0}

Keys (any other key is an error naming the line, so a typo such as "auido" is caught):
- "id": str or int, unique within the manifest; default "line-<n>" (n = line number, from 1).
- "text": str (an empty string counts as no text).
- "audio": path of a sound file soundfile reads (wav, flac, ogg, ...). Channels are averaged to
  mono and the waveform is resampled to `sample_rate` (torchaudio.functional.resample).
- "video": path of a video file PyAV decodes (mp4, webm, mkv, ...; its own audio track is not
  read, list it under "audio"), or of a folder of image frames (png, jpg, jpeg, bmp, webp) taken
  in file-name order (zero-pad the numbers: frame_0002.png sorts before frame_0010.png).
- "label" (or its synonym "target"; not both): an int class index (-1 = no label), or a class
  name looked up in `classes`. Default -1.
- "meta": anything; ignored (free-form notes about the sample).
A line needs at least one of text / audio / video. Relative paths are resolved against the
manifest's folder; "~" is expanded. A path must stay inside the manifest's folder (after following
symlinks): an absolute path elsewhere, a "../" that climbs out or a symlink to a file outside is an
error naming the line, unless the dataset is built with allow_outside_paths=True.

Samples are the dicts of `mmlongnet.data.collate` (`collate_samples` batches them):

    {"id": str, "text": str | None, "audio": (S,) float32 | None,
     "video": (T, C, H, W) float32 in [-1, 1] | None, "label": int}

Checks happen in two places. The constructor parses and validates every line and opens every
referenced file (soundfile.info for audio; av.open for a video file, at least one image file for
a frame folder), so a missing, misspelt or unreadable path is reported before training starts;
with on_error="skip" such lines are left out instead (see `skipped`). A WAV file is also checked
against its header there: one that holds fewer frames than its data chunk declares (a copy cut
short) is a bad line. Decoding happens lazily in `__getitem__`; a file that passed the check but
fails to decode there (a corrupt stream, an empty video, fewer audio frames than the header states,
fewer video frames than the container states) always raises, naming the line and the file.

Frame sampling (`frame_rate`): for a video file, frame_rate=None keeps every decoded frame;
frame_rate=r gives the frames shown at times k / r (k = 0, 1, ...) from the first frame's
timestamp up to the video's end, i.e. each output time takes the last frame whose timestamp is
at or before it: frames are skipped when r is below the stream's rate and repeated when above.
A frame folder has no timestamps, so its frames are always taken as they are (store them at
the rate the model expects). `max_frames` then keeps the first max_frames frames.

soundfile and av (the "media" extra: pip install 'mmlongnet[media]') are imported only when a
manifest lists audio or a video file; text-only manifests and frame folders need neither.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ManifestDataset"]

_KEYS = ("id", "text", "audio", "video", "label", "target", "meta")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# ITU-R BT.601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_CHUNK = 32  # video frames decoded before they are resized together


class _LineError(Exception):
    """A problem with one manifest line; the constructor raises it as `kind` or skips the line."""

    def __init__(self, kind: type[Exception], reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class _Entry:
    """One validated manifest line: paths resolved and checked, label as an index."""

    line: int
    id: str
    text: str | None
    audio: Path | None
    video: Path | None
    label: int


def _import_media(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ManifestDataset: reading {what} needs the '{module}' package; "
            f"install it with pip install 'mmlongnet[media]' (or pip install {module})"
        ) from err


def _wav_frames(path: Path) -> tuple[int, int] | None:
    """(frames the header of a RIFF WAVE file declares, frames the file holds), read from its "fmt "
    and "data" chunks; None for another layout, or a header that states no length (0 or 2^32 - 1,
    as streaming writers leave it)."""
    size = path.stat().st_size
    block_align = 0  # bytes per frame, from the "fmt " chunk
    with path.open("rb") as file:
        head = file.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:] != b"WAVE":
            return None
        while len(chunk := file.read(8)) == 8:
            kind, length = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"data":
                if not block_align or length in (0, 2**32 - 1):
                    return None
                held = min(length, size - file.tell())
                return length // block_align, held // block_align
            body = file.read(length + length % 2)  # chunks are padded to an even length
            if kind == b"fmt " and len(body) >= 14:
                block_align = int.from_bytes(body[12:14], "little")
    return None


def _frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, sorted by file name."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )


class ManifestDataset(torch.utils.data.Dataset):
    """Samples listed in a JSONL manifest (format in the module docstring), decoded lazily.

    Args:
        manifest: path of the .jsonl file; relative media paths are resolved against its folder.
        classes: class names; a string label must be one of them, and label i means classes[i].
            None: labels must be int indices.
        num_classes: K, the classes the model predicts: an int label must be in -1..K-1 (checked
            per line, so an out-of-range label names its line before training starts). None:
            len(classes) when classes are given, else any label >= -1 is accepted.
        sample_rate: audio is resampled to this many samples per second (Hz).
        frame_size: frames are resized to (H, W) = (frame_size, frame_size) for an int, or to the
            given (H, W); bilinear with antialiasing.
        channels: 3 for RGB, 1 for grey (BT.601 luma).
        frame_rate: frames per second to sample video files at; None = every frame.
        max_frames: keep at most this many (the first) frames of a video; None = all.
        on_error: what the constructor does with a bad line (invalid JSON or values, a missing
            or unreadable media file): "raise" the first problem, or "skip" such lines, list them
            in `skipped` and emit one warning with the count.
        allow_outside_paths: read media paths that resolve outside the manifest's folder
            (absolute paths elsewhere, "../", symlinks out); False: such a line is an error.

    Samples (`dataset[i]`):
        id: str; text: str | None; audio: (S,) float32 mono at sample_rate | None;
        video: (T, C, H, W) float32 in [-1, 1] | None; label: int class index (-1 = none).

    Attributes:
        manifest: the manifest's resolved path.
        classes: the class names as a tuple, or None.
        skipped: (line number, reason) of every line left out with on_error="skip"; empty otherwise.

    Raises:
        FileNotFoundError: the manifest, or (on_error="raise") a media file, does not exist.
        ValueError: an invalid argument, or (on_error="raise") a line that is not valid JSON,
            has an unknown key, a value of the wrong type, no modality, a duplicate id, an
            unknown class name, a label out of range, a path outside the manifest's folder, or a
            media file that cannot be opened or is truncated; also a manifest that ends up with no
            samples.
    """

    def __init__(
        self,
        manifest: str | Path,
        *,
        classes: Sequence[str] | None = None,
        sample_rate: int = 16000,
        frame_size: int | tuple[int, int] = 224,
        channels: Literal[1, 3] = 3,
        frame_rate: float | None = None,
        max_frames: int | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        num_classes: int | None = None,
        allow_outside_paths: bool = False,
    ):
        self.classes = self._check_classes(classes)
        if num_classes is not None:
            self._check_positive_int("num_classes", num_classes)
            if self.classes is not None and num_classes != len(self.classes):
                raise ValueError(
                    f"ManifestDataset: num_classes={num_classes}, but {len(self.classes)} classes are "
                    "given; make them agree, or leave num_classes unset"
                )
        self._num_classes = num_classes
        if not isinstance(allow_outside_paths, bool):
            raise TypeError(
                f"ManifestDataset: allow_outside_paths must be a bool, got {allow_outside_paths!r}"
            )
        self.allow_outside_paths = allow_outside_paths
        self.sample_rate = self._check_positive_int("sample_rate", sample_rate)
        self.frame_size = self._check_frame_size(frame_size)
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"ManifestDataset: channels={channels!r}; use 3 (RGB) or 1 (grey)")
        self.channels = int(channels)
        if frame_rate is not None and (
            isinstance(frame_rate, bool)
            or not isinstance(frame_rate, int | float)
            or not math.isfinite(frame_rate)
            or frame_rate <= 0
        ):
            raise ValueError(
                f"ManifestDataset: frame_rate={frame_rate!r}; use a positive number of frames per "
                "second, or None for every frame"
            )
        self.frame_rate = None if frame_rate is None else float(frame_rate)
        self.max_frames = None if max_frames is None else self._check_positive_int("max_frames", max_frames)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"ManifestDataset: on_error={on_error!r}; use 'raise' or 'skip'")
        self.on_error = on_error

        self.manifest = Path(manifest).expanduser().resolve()
        if not self.manifest.is_file():
            raise FileNotFoundError(
                f"ManifestDataset: manifest {self.manifest} does not exist (or is not a file); check the path"
            )
        self._class_index = None if self.classes is None else {c: i for i, c in enumerate(self.classes)}
        self.skipped: list[tuple[int, str]] = []
        self._entries: list[_Entry] = []
        seen_ids: dict[str, int] = {}
        total = 0
        try:
            # split, not splitlines: a JSON string may hold U+2028, which splitlines breaks at.
            lines = self.manifest.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"ManifestDataset: {self.manifest} is not UTF-8 text ({err}); save it as UTF-8 JSONL"
            ) from err
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                entry = self._parse_line(number, raw)
                if entry.id in seen_ids:
                    raise _LineError(
                        ValueError,
                        f"id {entry.id!r} is already used on line {seen_ids[entry.id]}; ids must be unique",
                    )
            except _LineError as err:
                if self.on_error == "raise":
                    raise err.kind(
                        f"ManifestDataset: {self.manifest}, line {number}: {err.reason}. Fix the line, "
                        "or pass on_error='skip' to leave out lines with problems"
                    ) from err.__cause__
                self.skipped.append((number, err.reason))
                continue
            seen_ids[entry.id] = number
            self._entries.append(entry)
        if self.skipped:
            first_line, first_reason = self.skipped[0]
            warnings.warn(
                f"ManifestDataset: skipped {len(self.skipped)} of {total} lines of {self.manifest} "
                f"(first: line {first_line}: {first_reason}); the list is in .skipped",
                stacklevel=2,
            )
        if not self._entries:
            raise ValueError(
                f"ManifestDataset: {self.manifest} has no samples ({total} non-blank lines, "
                f"{len(self.skipped)} skipped); add one JSON object per line"
            )

    # ---- argument checks -------------------------------------------------------------------

    @staticmethod
    def _check_positive_int(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"ManifestDataset: {name}={value!r}; use a positive int")
        return value

    @staticmethod
    def _check_frame_size(frame_size: Any) -> tuple[int, int]:
        size = (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
            raise ValueError(
                f"ManifestDataset: frame_size={frame_size!r}; use a positive int or a pair (H, W) of them"
            )
        return size

    @staticmethod
    def _check_classes(classes: Sequence[str] | None) -> tuple[str, ...] | None:
        if classes is None:
            return None
        if isinstance(classes, str):
            raise ValueError(
                f"ManifestDataset: classes={classes!r} is one string; pass a list of class names"
            )
        names = tuple(classes)
        if not names or not all(isinstance(c, str) for c in names):
            raise ValueError(f"ManifestDataset: classes={classes!r}; use a non-empty list of strings")
        duplicates = sorted({c for c in names if names.count(c) > 1})
        if duplicates:
            raise ValueError(
                f"ManifestDataset: classes has duplicates {duplicates}; class names must be unique"
            )
        return names

    # ---- parsing ---------------------------------------------------------------------------

    def _parse_line(self, number: int, raw: str) -> _Entry:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _LineError(
                ValueError,
                f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object",
            ) from err
        if not isinstance(record, dict):
            raise _LineError(ValueError, f"expected a JSON object {{...}}, got {type(record).__name__}")
        unknown = [key for key in record if key not in _KEYS]
        if unknown:
            raise _LineError(
                ValueError,
                f"unknown key {unknown[0]!r}; allowed keys are {', '.join(_KEYS)} "
                '(free-form fields go under "meta")',
            )
        if "label" in record and "target" in record:
            raise _LineError(
                ValueError, "both 'label' and 'target' are given; 'target' is a synonym, keep one"
            )

        sample_id = record.get("id")
        if sample_id is None:
            sample_id = f"line-{number}"
        elif isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
            raise _LineError(ValueError, f"'id' must be a string or int, got {sample_id!r}")
        text = record.get("text")
        if text is not None and not isinstance(text, str):
            raise _LineError(ValueError, f"'text' must be a string, got {type(text).__name__}")
        audio = self._resolve(record.get("audio"), "audio")
        video = self._resolve(record.get("video"), "video")
        if not text and audio is None and video is None:
            raise _LineError(
                ValueError, "no modality: give at least one of 'text' (non-empty), 'audio', 'video'"
            )
        label_key = "target" if "target" in record else "label"
        label = self._label(record.get(label_key), label_key)
        if audio is not None:
            self._check_audio(audio)
        if video is not None:
            self._check_video(video)
        return _Entry(number, str(sample_id), text, audio, video, label)

    def _resolve(self, value: Any, key: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _LineError(ValueError, f"'{key}' must be a non-empty path string, got {value!r}")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.manifest.parent / path
        folder = self.manifest.parent  # resolved, as the manifest is
        if not self.allow_outside_paths and not path.resolve().is_relative_to(folder):
            raise _LineError(
                ValueError,
                f"{key} path {value!r} resolves to {path.resolve()}, outside the manifest's folder "
                f"{folder}; move the file under that folder, or pass allow_outside_paths=True "
                "(ManifestDataset or ManifestDataModule) to read files elsewhere",
            )
        if not path.exists():
            raise _LineError(
                FileNotFoundError,
                f"{key} file {path} does not exist "
                f"(relative paths are resolved against {self.manifest.parent})",
            )
        return path

    def _label(self, value: Any, key: str) -> int:
        if value is None:
            return -1
        if isinstance(value, str):
            if self._class_index is None:
                raise _LineError(
                    ValueError,
                    f"'{key}' is the class name {value!r}, but no classes were given; pass classes=[...]",
                )
            if value not in self._class_index:
                raise _LineError(
                    ValueError, f"'{key}' {value!r} is not one of the classes {list(self.classes)}"
                )
            return self._class_index[value]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _LineError(ValueError, f"'{key}' must be an int class index or a class name, got {value!r}")
        limit = self._num_classes if self.classes is None else len(self.classes)
        if value < -1 or (limit is not None and value >= limit):
            allowed = "-1 (no label) or >= 0" if limit is None else f"-1 (no label) or 0..{limit - 1}"
            raise _LineError(ValueError, f"'{key}' {value} is out of range; use {allowed}")
        return value

    def _check_audio(self, path: Path) -> None:
        if path.is_dir():
            raise _LineError(ValueError, f"audio {path} is a folder; give a sound file (wav, flac, ogg, ...)")
        if not path.is_file():  # a FIFO or device would block the reader
            raise _LineError(ValueError, f"audio {path} is not a regular file; give a sound file")
        soundfile = _import_media("soundfile", f"audio ({path.name})")
        try:
            info = soundfile.info(str(path))
        except Exception as err:  # soundfile raises LibsndfileError / RuntimeError subclasses
            raise _LineError(
                ValueError,
                f"audio file {path} cannot be opened by soundfile ({err}); convert it to wav or flac",
            ) from err
        if info.frames == 0:
            raise _LineError(ValueError, f"audio file {path} has no samples")
        frames = _wav_frames(path) if info.format == "WAV" else None
        if frames is not None and frames[1] < frames[0]:
            raise _LineError(
                ValueError,
                f"audio file {path} is truncated: its header declares {frames[0]} frames, the file "
                f"holds {frames[1]}; copy or export it again",
            )

    def _check_video(self, path: Path) -> None:
        if not path.is_dir() and not path.is_file():  # a FIFO or device would block the reader
            raise _LineError(ValueError, f"video {path} is neither a regular file nor a folder of frames")
        if path.is_dir():
            files = _frame_files(path)
            if not files:
                raise _LineError(
                    ValueError,
                    f"video folder {path} has no image files ({', '.join(_IMAGE_SUFFIXES)})",
                )
            return
        av = _import_media("av", f"video ({path.name})")
        try:
            with av.open(str(path)) as container:
                has_video = bool(container.streams.video)
        except Exception as err:  # av.FFmpegError and its OSError / ValueError subclasses
            raise _LineError(
                ValueError, f"video file {path} cannot be opened by PyAV ({err}); convert it to mp4"
            ) from err
        if not has_video:
            raise _LineError(ValueError, f"video file {path} has no video stream")

    # ---- dataset protocol ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_classes(self) -> int | None:
        """len(classes) when classes were given; else the num_classes given; else the largest
        label + 1, or None without labels."""
        if self.classes is not None:
            return len(self.classes)
        if self._num_classes is not None:
            return self._num_classes
        largest = max(entry.label for entry in self._entries)
        return None if largest < 0 else largest + 1

    def __repr__(self) -> str:
        return f"ManifestDataset({str(self.manifest)!r}, samples={len(self)}, skipped={len(self.skipped)})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of manifest entry `index` (see the class docstring), decoded now."""
        entry = self._entries[index]
        return {
            "id": entry.id,
            "text": entry.text,
            "audio": None if entry.audio is None else self._decode(entry, entry.audio, self._read_audio),
            "video": None if entry.video is None else self._decode(entry, entry.video, self._read_video),
            "label": entry.label,
        }

    def _decode(self, entry: _Entry, path: Path, read: Callable[[Path], torch.Tensor]) -> torch.Tensor:
        """read(path), re-raising any failure as an error naming the manifest line and the file."""
        try:
            return read(path)
        except Exception as err:
            where = f"ManifestDataset: {self.manifest}, line {entry.line} (id {entry.id!r})"
            if not path.exists():
                raise FileNotFoundError(f"{where}: {path} no longer exists") from err
            raise ValueError(f"{where}: cannot decode {path}: {err}") from err

    # ---- decoding --------------------------------------------------------------------------

    def _read_audio(self, path: Path) -> torch.Tensor:
        """A sound file -> (S,) float32 mono at self.sample_rate."""
        import torchaudio.functional

        soundfile = _import_media("soundfile", f"audio ({path.name})")
        with soundfile.SoundFile(str(path)) as file:
            stated, rate = file.frames, file.samplerate
            data = file.read(dtype="float32", always_2d=True)  # (n, channels)
        if len(data) < stated:
            raise ValueError(f"its header states {stated} frames, {len(data)} decoded (a truncated file?)")
        wave = torch.from_numpy(data.mean(axis=1, dtype=np.float32))  # (n,)
        if rate != self.sample_rate:
            wave = torchaudio.functional.resample(wave, rate, self.sample_rate)  # (S,)
        return wave.contiguous()

    def _read_video(self, path: Path) -> torch.Tensor:
        """A video file or a frame folder -> (T, C, H, W) float32 in [-1, 1]."""
        if not path.is_dir():
            return self._read_video_file(path)
        files = _frame_files(path)[: self.max_frames]
        if not files:
            raise ValueError("the folder has no image files")
        # Frames of a folder may differ in size: each is resized on its own.
        return torch.cat([self._pixels(self._read_image(file)) for file in files])  # (T, C, H, W)

    @staticmethod
    def _read_image(path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return np.array(image.convert("RGB"))[None]  # (1, h, w, 3) uint8, a writable copy

    def _read_video_file(self, path: Path) -> torch.Tensor:
        """Decode (with frame_rate, sample) a video file's frames -> (T, C, H, W) float32 in [-1, 1].

        Frames are resized in chunks as they are decoded, so a long high-resolution video never
        sits in memory at its stored size.
        """
        av = _import_media("av", f"video ({path.name})")
        chunks: list[torch.Tensor] = []  # each (<= _CHUNK, C, H, W)
        pending: list[np.ndarray] = []  # decoded frames not yet resized, each (h, w, 3) uint8
        read = 0  # frames decoded from the stream (before any frame_rate sampling)

        def decode(container, stream):
            nonlocal read
            for frame in container.decode(stream):
                read += 1
                yield frame

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded = decode(container, stream)
            if self.frame_rate is None:
                frames = (frame.to_ndarray(format="rgb24") for frame in decoded)
            else:
                frames = self._at_frame_rate(decoded, stream)
            kept = 0
            for pixels in itertools.islice(frames, self.max_frames):  # islice(..., None): all
                kept += 1
                pending.append(pixels)
                if len(pending) == _CHUNK:
                    chunks.append(self._pixels(np.stack(pending)))
                    pending = []
            stated = stream.frames  # what the container says; 0 when it does not say
        whole = self.max_frames is None or kept < self.max_frames  # the stream was read to its end
        if whole and 0 < read < stated:
            raise ValueError(f"the container states {stated} frames, {read} decoded (a truncated file?)")
        if pending:
            chunks.append(self._pixels(np.stack(pending)))
        if not chunks:
            raise ValueError("no frames decoded")
        return torch.cat(chunks)  # (T, C, H, W)

    def _at_frame_rate(self, decoded, stream) -> Iterator[np.ndarray]:
        """The frames shown at times k / frame_rate (see the module docstring), each (h, w, 3) uint8.

        Args:
            decoded: the stream's decoded `av.VideoFrame`s, in presentation order.
            stream: the `av` video stream, whose rate dates frames without timestamps.

        A frame's time is its presentation timestamp relative to the first frame's (its index
        over the stream's rate when it has none); the video ends one frame duration after the
        start of its last frame.
        """
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        period = 1 / Fraction(rate) if rate else None  # seconds per source frame
        step = 1 / Fraction(self.frame_rate).limit_denominator(1_000_000)  # seconds per output frame
        emitted = 0  # output frames so far: the next one is shown at time emitted * step
        shown: np.ndarray | None = None  # the last frame decoded so far
        start = end = None  # the first frame's timestamp; the end of the last frame (relative)
        for index, frame in enumerate(decoded):
            if frame.pts is not None and frame.time_base is not None:
                time = frame.pts * Fraction(frame.time_base)
            elif period is not None:
                time = index * period
            else:
                raise ValueError("its frames have no timestamps and no frame rate; use frame_rate=None")
            start = time if start is None else start
            time -= start
            # Output times in [previous frame's time, this frame's time) show the previous frame.
            while shown is not None and emitted * step < time:
                yield shown
                emitted += 1
            if frame.duration and frame.time_base is not None:
                duration = frame.duration * Fraction(frame.time_base)
            else:
                duration = period if period is not None else step
            shown, end = frame.to_ndarray(format="rgb24"), time + duration
        while shown is not None and emitted * step < end:  # the last frame lasts until the end
            yield shown
            emitted += 1

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(T, h, w, 3) uint8 RGB -> (T, C, H, W) float32 in [-1, 1], resized and channel-converted."""
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
        if self.channels == 1:
            weights = torch.tensor(_GREY_WEIGHTS).view(1, 3, 1, 1)
            video = (video * weights).sum(dim=1, keepdim=True)  # (T, 1, h, w)
        if tuple(video.shape[2:]) != self.frame_size:
            video = F.interpolate(
                video, size=self.frame_size, mode="bilinear", antialias=True, align_corners=False
            )  # (T, C, H, W)
        return (video / 127.5 - 1.0).clamp_(-1.0, 1.0)
