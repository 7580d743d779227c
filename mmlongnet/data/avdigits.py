"""The bundled "AV digits" task: questions about a sequence of handwritten and spoken digits.

An example shows one sequence of K digits two ways: as K frames (8x8 handwritten images from the
UCI digits, one per digit) and as K spoken words (synthesised speech, "zero".."nine", joined by
short random silences, with white noise). A text question asks about the sequence; the answer is
a digit class 0..9. Per the configured modality mix a sample carries both views, only the audio
or only the video; either view alone holds the whole sequence, so the answer always follows from
what is present. The material is built by data/build_avdigits.py into data/avdigits/ (see
data/README.md); this module only composes examples from it, nothing is downloaded.

Question types (`AVDigitsConfig.questions`), answers drawn roughly uniformly over their range:
    first   what is the first digit?                           0..9
    last    what is the last digit?                            0..9
    count   how many times does digit d occur?                 0..min(9, K)
    after   which digit comes right after the first d?         0..9   (needs K >= 2)
    most    which digit occurs most often? (a unique mode)     0..9

Determinism: example i of a split is a function of (config, split, i) only, through
`numpy.random.default_rng([seed, split_index, i])`; it is the same in any process, in any order,
and uses only the images and clips of its split's pools (disjoint across splits).

Legend: K digits per example, S audio samples, C channels (1 or 3), H = W = frame_size,
n images of a split's pool, m clips of a split's pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch.utils.data import Dataset

from mmlongnet.data.collate import LengthBuckets

__all__ = ["AVDigitsConfig", "AVDigitsDataset", "DEFAULT_DATA_DIR", "MIXES", "QUESTION_TYPES", "SPLITS"]

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "avdigits"
"""Where the built artifacts live in the repository."""
ARTIFACT = "avdigits.npz"
STORED_SAMPLE_RATE = 16000
"""Rate (Hz) of the stored clips."""
STORED_FRAME_SIZE = 8
MAX_GREY = 16
"""Grey levels of the stored images are 0..MAX_GREY."""
SPLITS = ("train", "val", "test")
QUESTION_TYPES = ("first", "last", "count", "after", "most")
MIXES = ("both", "audio", "video")
"""Modality mixes: both views, audio only, video only."""
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS = ("zeros", "ones", "twos", "threes", "fours", "fives", "sixes", "sevens", "eights", "nines")

TEMPLATES = {
    "first": (
        "What is the first digit?",
        "Which digit comes first?",
        "Which digit does the sequence start with?",
        "What is the first number in the sequence?",
    ),
    "last": (
        "What is the last digit?",
        "Which digit comes last?",
        "Which digit does the sequence end with?",
        "What is the final number in the sequence?",
    ),
    "count": (
        "How many times does the digit {d} occur?",
        "How many times does {word} appear in the sequence?",
        "How many {plural} are there?",
        "How often does the digit {d} appear?",
    ),
    "after": (
        "Which digit comes right after the first {d}?",
        "What digit immediately follows the first {word}?",
        "What is the digit just after the first occurrence of {d}?",
        "Which number follows the first {word}?",
    ),
    "most": (
        "Which digit occurs most often?",
        "What is the most frequent digit?",
        "Which digit appears the most times?",
        "Which number is repeated most often in the sequence?",
    ),
}
"""Question type -> phrasings; {d} is the queried digit as a numeral, {word} / {plural} in words."""


@dataclass
class AVDigitsConfig:
    """How AV digits examples are composed (see the module docstring)."""

    num_digits: int = 8
    """K, digits per example: K frames and K spoken words. K >= 2 when "after" is asked."""
    questions: list[str] = field(default_factory=lambda: list(QUESTION_TYPES))
    """Question types drawn per example (uniformly unless `question_mix` says otherwise): any of
    first, last, count, after, most."""
    question_mix: dict[str, float] | None = None
    """Probabilities of the question types (keys among `questions`, missing keys 0, the values sum
    to 1), e.g. to train more on a type learned last; None: uniform."""
    modality_mix: dict[str, float] = field(
        default_factory=lambda: {"both": 0.5, "audio": 0.25, "video": 0.25}
    )
    """Probabilities of the views a sample carries: keys among both, audio (video is None), video
    (audio is None); missing keys are 0; the values sum to 1."""
    noise: float = 0.1
    """Std of white noise added to the whole waveform, relative to the RMS of the split's speech
    (every clip is stored at about the same RMS): 0.1 = 20 dB SNR, 0 = clean. The samples are iid
    uniform (as white as Gaussian noise, and several times cheaper to draw for long examples)."""
    gap_seconds: tuple[float, float] = (0.02, 0.12)
    """Silence between consecutive spoken digits, uniform in [low, high] seconds (none before the
    first or after the last)."""
    sample_rate: int = 16000
    """Rate (Hz) of the returned audio; the stored 16 kHz clips are resampled once if it differs."""
    frame_size: int = 8
    """H = W of the returned frames; the stored 8x8 images are resized (see frame_resize) if it differs."""
    frame_resize: Literal["nearest", "bilinear"] = "nearest"
    """Interpolation used when frame_size != 8 (bilinear is antialiased when shrinking)."""
    channels: Literal[1, 3] = 1
    """C of the returned frames: 1 (grey) or 3 (the grey image repeated, for RGB backbones)."""
    seed: int = 0
    """Seed of the examples: example i of a split comes from default_rng([seed, split_index, i])."""

    def __post_init__(self) -> None:
        if isinstance(self.num_digits, bool) or not isinstance(self.num_digits, int) or self.num_digits < 1:
            raise ValueError(f"num_digits must be a positive int, got {self.num_digits!r}")
        if isinstance(self.questions, str):
            raise ValueError(f"questions must be a list of question types, got the string {self.questions!r}")
        self.questions = list(self.questions)
        if not self.questions:
            raise ValueError(f"questions must name at least one of {QUESTION_TYPES}, got []")
        unknown = [q for q in self.questions if q not in QUESTION_TYPES]
        if unknown:
            raise ValueError(f"questions has unknown types {unknown}; allowed: {list(QUESTION_TYPES)}")
        if len(set(self.questions)) != len(self.questions):
            raise ValueError(f"questions must not repeat a type, got {self.questions}")
        if "after" in self.questions and self.num_digits < 2:
            raise ValueError(
                f'questions includes "after", which needs num_digits >= 2, got num_digits={self.num_digits}'
            )
        if self.question_mix is not None:
            _check_mix("question_mix", self.question_mix, self.questions)
        _check_mix("modality_mix", self.modality_mix, MIXES)
        if (
            isinstance(self.noise, bool)
            or not isinstance(self.noise, (int, float))
            or not 0.0 <= self.noise < math.inf
        ):
            raise ValueError(f"noise must be a finite float >= 0, got {self.noise!r}")
        gap = tuple(self.gap_seconds) if isinstance(self.gap_seconds, (list, tuple)) else None
        if (
            gap is None
            or len(gap) != 2
            or not all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) for g in gap
            )
            or not 0.0 <= gap[0] <= gap[1]
        ):
            raise ValueError(
                f"gap_seconds must be (low, high) seconds with 0 <= low <= high, got {self.gap_seconds!r}"
            )
        self.gap_seconds = (float(gap[0]), float(gap[1]))
        for name in ("sample_rate", "frame_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.frame_resize not in ("nearest", "bilinear"):
            raise ValueError(f"frame_resize must be 'nearest' or 'bilinear', got {self.frame_resize!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")


@lru_cache(maxsize=4)
def load_artifacts(data_dir: str) -> dict[str, np.ndarray]:
    """The arrays of `data_dir`/avdigits.npz (listed in data/build_avdigits.py), loaded once per process.

    Raises:
        FileNotFoundError: the artifacts were not built, with the command that builds them.
    """
    path = Path(data_dir) / ARTIFACT
    if not path.is_file():
        raise FileNotFoundError(
            f"AV digits artifacts not found: {path}. Rebuild them with `python data/build_avdigits.py "
            f"--out {data_dir}` (needs scikit-learn and Debian's espeak-ng; see data/README.md)"
        )
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for array in arrays.values():
        array.flags.writeable = False  # shared by every caller
    return arrays


def _by_digit(labels: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort a split's pool by digit for O(1) draws.

    Args:
        labels: (N,) digit of every stored item.
        members: (N,) bool, the items of the split.

    Returns:
        order (n,) indices of the pool's items sorted by digit; start (10,) and count (10,), so the
        items of digit d are order[start[d] : start[d] + count[d]].
    """
    order = np.flatnonzero(members)
    order = order[np.argsort(labels[order], kind="stable")]  # (n,), grouped by digit
    count = np.bincount(labels[order], minlength=10)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return order, start, count


@dataclass(frozen=True)
class _Pool:
    """The images and clips of one split, arranged for O(1) draws; shared by the datasets of a process.

    Legend: N stored images, M stored clips, n / m those of the split, A the split's audio samples.
    """

    image_order: np.ndarray
    """(n,) stored image indices grouped by digit: digit d's are
    image_order[image_start[d] : image_start[d] + image_count[d]]."""
    image_start: np.ndarray
    """(10,) where each digit's images begin in image_order."""
    image_count: np.ndarray
    """(10,) images per digit."""
    frames: torch.Tensor
    """(N, 8, 8) float32 every stored image scaled to [-1, 1], indexed by stored image index."""
    clip_order: np.ndarray
    """(m,) stored clip indices grouped by digit, as image_order."""
    clip_start: np.ndarray
    """(10,) where each digit's clips begin in clip_order."""
    clip_count: np.ndarray
    """(10,) clips per digit."""
    clip_audio: np.ndarray
    """(A,) float32 the split's clips back to back, at the dataset's sample rate."""
    clip_offset: np.ndarray
    """(M,) int64 where each stored clip begins in clip_audio; -1 for clips of other splits."""
    clip_length: np.ndarray
    """(M,) int64 each stored clip's length in clip_audio; -1 for clips of other splits."""
    speech_rms: float
    """RMS of clip_audio."""


@lru_cache(maxsize=16)
def _split_pool(data_dir: str, split_index: int, sample_rate: int) -> _Pool:
    """The `_Pool` of split SPLITS[split_index] with its clips at `sample_rate` (resampled once)."""
    arrays = load_artifacts(data_dir)
    image_order, image_start, image_count = _by_digit(
        arrays["image_labels"], arrays["image_split"] == split_index
    )
    clip_order, clip_start, clip_count = _by_digit(arrays["clip_labels"], arrays["clip_split"] == split_index)
    for kind, count in (("images", image_count), ("clips", clip_count)):
        if (count == 0).any():
            missing = np.flatnonzero(count == 0).tolist()
            raise ValueError(f"{data_dir}: the {SPLITS[split_index]} split has no {kind} of digits {missing}")
    frames = torch.from_numpy(arrays["images"].astype(np.float32) / (MAX_GREY / 2) - 1)  # (N, 8, 8)

    audio, offsets = arrays["audio"], arrays["clip_offsets"]
    clips = [audio[offsets[j] : offsets[j + 1]].astype(np.float32) / 32768.0 for j in clip_order]
    if sample_rate != STORED_SAMPLE_RATE:
        clips = [
            torchaudio.functional.resample(torch.from_numpy(c), STORED_SAMPLE_RATE, sample_rate).numpy()
            for c in clips
        ]
    clip_audio = np.concatenate(clips)  # (A,)
    lengths = np.array([len(c) for c in clips], dtype=np.int64)  # (m,)
    clip_offset = np.full(len(offsets) - 1, -1, dtype=np.int64)  # (M,)
    clip_length = np.full(len(offsets) - 1, -1, dtype=np.int64)  # (M,)
    clip_offset[clip_order] = np.cumsum(lengths) - lengths
    clip_length[clip_order] = lengths
    shared = (image_order, image_start, image_count, clip_order, clip_start, clip_count, clip_audio)
    for array in (*shared, clip_offset, clip_length):
        array.flags.writeable = False  # shared by the datasets of the process
    return _Pool(
        image_order=image_order,
        image_start=image_start,
        image_count=image_count,
        frames=frames,
        clip_order=clip_order,
        clip_start=clip_start,
        clip_count=clip_count,
        clip_audio=clip_audio,
        clip_offset=clip_offset,
        clip_length=clip_length,
        speech_rms=float(np.sqrt(np.mean(np.square(clip_audio, dtype=np.float64)))),
    )


class AVDigitsDataset(Dataset):
    """`num_examples` AV digits question-answering examples of one split.

    Args:
        split: "train", "val" or "test"; the images and clips come from that split's pools only.
        num_examples: the dataset's length; example i is fixed by (config, split, i).
        config: how examples are composed; None = `AVDigitsConfig()`.
        data_dir: folder holding avdigits.npz; None = the repository's data/avdigits.

    A sample (the format of `mmlongnet.data.collate`, plus keys the collate ignores):
        id: "avdigits-{split}-{i}"
        text: the question
        audio: (S,) float32 at config.sample_rate, or None (video-only samples)
        video: (K, C, H, W) float32 in [-1, 1] (ink = 1), or None (audio-only samples)
        label: the answer 0..9
        question: its type (first, last, count, after, most)
        query_digit: the d of count / after questions, else None
        digits: the K digits of the sequence
        mix: "both", "audio" or "video"
        image_indices: K indices into the stored images (None without video)
        clip_indices: K indices into the stored clips (None without audio)

    Raises:
        ValueError: an unknown split, or num_examples not a non-negative int.
        FileNotFoundError: the artifacts were not built.
    """

    num_classes = 10

    def __init__(
        self,
        split: Literal["train", "val", "test"],
        num_examples: int,
        config: AVDigitsConfig | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
            raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
        self.split, self.num_examples = split, num_examples
        self.split_index = SPLITS.index(split)
        self.config = config if config is not None else AVDigitsConfig()
        self.data_dir = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).resolve()
        self.pool = _split_pool(str(self.data_dir), self.split_index, self.config.sample_rate)
        self.speech_rms = self.pool.speech_rms
        cfg = self.config
        mix = [cfg.modality_mix.get(name, 0.0) for name in MIXES]
        self.mix_cdf = np.cumsum(mix) / sum(mix)  # (3,)
        self.question_cdf = None  # uniform
        if cfg.question_mix is not None:
            shares = [cfg.question_mix.get(name, 0.0) for name in cfg.questions]
            self.question_cdf = np.cumsum(shares) / sum(shares)  # (len(questions),)

    def __len__(self) -> int:
        return self.num_examples

    def longest_audio(self) -> int:
        """The most waveform samples an example of this split can have: K of its longest clip and
        K - 1 of the longest gap. Audio padded to it (`LengthBuckets(audio_minimum=...)`) gives
        every batch of this dataset one shape."""
        K, cfg = self.config.num_digits, self.config
        longest_gap = round(cfg.gap_seconds[1] * cfg.sample_rate)
        return K * int(self.pool.clip_length.max()) + (K - 1) * longest_gap

    def likely_longest_audio(self, sigmas: float = 6.0) -> int:
        """A waveform length an example exceeds only with negligible probability: the mean length of
        K clips and K - 1 gaps plus `sigmas` standard deviations, every clip taken as if from the
        digit whose clips are longest on average (and from the most spread), at most
        `longest_audio()`. Padding audio to it (`LengthBuckets(audio_minimum=...)`) gives nearly
        every batch one shape, with far less padding than `longest_audio()` once K is more than a
        few (0.81x it at K = 16, 0.65x at K = 256); a longer batch pads to its own bucket."""
        K, cfg, pool = self.config.num_digits, self.config, self.pool
        per_digit = [
            pool.clip_length[pool.clip_order[start : start + count]].astype(np.float64)
            for start, count in zip(pool.clip_start.tolist(), pool.clip_count.tolist(), strict=True)
        ]  # 10 x (clips of the digit,)
        clip_mean, clip_var = max(x.mean() for x in per_digit), max(x.var() for x in per_digit)
        low, high = (seconds * cfg.sample_rate for seconds in cfg.gap_seconds)  # gaps: uniform
        mean = K * clip_mean + (K - 1) * (low + high) / 2
        std = math.sqrt(K * clip_var + (K - 1) * (high - low) ** 2 / 12)
        return min(self.longest_audio(), math.ceil(mean + sigmas * std))

    def one_shape_buckets(self) -> LengthBuckets:
        """Length buckets that give nearly every batch of this dataset one shape, so that a compiled
        model records one graph for it: audio padded to at least `likely_longest_audio()`, video to
        K frames, text to its default bucket; 16 buckets per doubling above those minimums, so a
        rare longer batch pads only a little further (and gets a graph of its own)."""
        K = self.config.num_digits
        return LengthBuckets(audio_minimum=self.likely_longest_audio(), video_minimum=K, steps_per_octave=16)

    def __getitem__(self, index: int) -> dict:
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        index %= self.num_examples
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.split_index, index])
        # fixed draw order: mix, question, sequence, phrasing, images, clips, gaps, noise
        mix = MIXES[_draw(self.mix_cdf, rng)]
        if self.question_cdf is None:
            question = cfg.questions[int(rng.integers(len(cfg.questions)))]
        else:
            question = cfg.questions[_draw(self.question_cdf, rng)]
        digits, query, label = _compose(question, cfg.num_digits, rng)  # (K,) int64
        template = TEMPLATES[question][int(rng.integers(len(TEMPLATES[question])))]
        words = {} if query is None else {"d": query, "word": WORDS[query], "plural": PLURALS[query]}
        text = template.format(**words)

        pool = self.pool
        image_indices = pool.image_order[pool.image_start[digits] + _below(rng, pool.image_count[digits])]
        clip_indices = pool.clip_order[pool.clip_start[digits] + _below(rng, pool.clip_count[digits])]  # (K,)
        video = self._video(image_indices) if mix != "audio" else None
        audio = self._audio(clip_indices, rng) if mix != "video" else None
        return {
            "id": f"avdigits-{self.split}-{index}",
            "text": text,
            "audio": audio,
            "video": video,
            "label": label,
            "question": question,
            "query_digit": query,
            "digits": digits.tolist(),
            "mix": mix,
            "image_indices": image_indices.tolist() if video is not None else None,
            "clip_indices": clip_indices.tolist() if audio is not None else None,
        }

    def _video(self, image_indices: np.ndarray) -> torch.Tensor:
        """(K,) stored image indices -> (K, C, H, W) frames."""
        cfg = self.config
        frames = self.pool.frames[torch.from_numpy(image_indices)].unsqueeze(1)  # (K, 1, 8, 8), a copy
        if cfg.frame_size != STORED_FRAME_SIZE:
            antialias = cfg.frame_resize == "bilinear" and cfg.frame_size < STORED_FRAME_SIZE
            frames = F.interpolate(
                frames,
                size=(cfg.frame_size, cfg.frame_size),
                mode=cfg.frame_resize,
                **(
                    {"align_corners": False, "antialias": antialias} if cfg.frame_resize == "bilinear" else {}
                ),
            )  # (K, 1, H, W)
        if cfg.channels == 3:
            frames = frames.expand(-1, 3, -1, -1).contiguous()  # (K, 3, H, W)
        return frames

    def _audio(self, clip_indices: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """(K,) stored clip indices -> (S,) waveform: the clips with random gaps between, plus noise."""
        cfg, pool = self.config, self.pool
        lengths = pool.clip_length[clip_indices]  # (K,)
        low, high = cfg.gap_seconds
        gaps = rng.uniform(low, high, len(clip_indices) - 1) * cfg.sample_rate  # (K-1,)
        gaps = np.rint(gaps).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths[:-1] + gaps)])  # (K,)
        total = int(starts[-1] + lengths[-1])
        if cfg.noise > 0:  # iid uniform in [-a, a], std a / sqrt(3) = noise * speech RMS
            wave = rng.random(total, dtype=np.float32)  # (S,) in [0, 1)
            wave -= np.float32(0.5)
            wave *= np.float32(2 * math.sqrt(3) * cfg.noise * pool.speech_rms)
        else:
            wave = np.zeros(total, dtype=np.float32)
        sources = pool.clip_offset[clip_indices]
        for start, source, length in zip(starts.tolist(), sources.tolist(), lengths.tolist(), strict=True):
            wave[start : start + length] += pool.clip_audio[source : source + length]
        return torch.from_numpy(wave)


def _below(rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """(K,) uniform draws in [0, counts[k]) for every k."""
    return np.minimum((rng.random(len(counts)) * counts).astype(np.int64), counts - 1)


def _draw(cdf: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with the probabilities whose cumulative sums are `cdf` (n,)."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def _check_mix(name: str, mix: object, allowed: Sequence[str]) -> None:
    """ValueError unless `mix` is a dict of probabilities over keys among `allowed`, summing to 1."""
    if not isinstance(mix, dict):
        raise ValueError(f"{name} must be a dict over {list(allowed)}, got {mix!r}")
    unknown = sorted(set(mix) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed: {list(allowed)}")
    for key, value in mix.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}[{key!r}] must be a probability in [0, 1], got {value!r}")
    total = sum(mix.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} values must sum to 1, got {mix} (sum {total})")


def _compose(question: str, K: int, rng: np.random.Generator) -> tuple[np.ndarray, int | None, int]:
    """A digit sequence for `question`, with its queried digit and its answer.

    Each type draws its answer (and queried digit) first and builds the sequence around it, so the
    answers are uniform over their range.

    Returns:
        digits (K,) int64 in 0..9; the queried digit d (count, after) or None; the answer 0..9.
    """
    if question in ("first", "last"):
        digits = rng.integers(0, 10, K)  # (K,), uniform: so is the answer
        return digits, None, int(digits[0] if question == "first" else digits[-1])
    if question == "count":
        d = int(rng.integers(10))
        answer = int(rng.integers(min(9, K) + 1))
        digits = (d + rng.integers(1, 10, K)) % 10  # (K,), uniform over the digits other than d
        digits[rng.choice(K, size=answer, replace=False)] = d
        return digits, d, answer
    if question == "after":
        d, answer = (int(x) for x in rng.integers(10, size=2))
        first = int(rng.integers(K - 1))  # position of the first d, 0..K-2
        digits = rng.integers(0, 10, K)  # (K,)
        digits[:first] = (d + rng.integers(1, 10, first)) % 10  # no d before `first`
        digits[first], digits[first + 1] = d, answer
        return digits, d, answer
    if question == "most":
        answer = int(rng.integers(10))
        digits = rng.integers(0, 10, K)  # (K,)
        counts = np.bincount(digits, minlength=10)  # (10,)
        tied = np.flatnonzero(counts == counts.max())
        mode = int(rng.choice(tied))
        if len(tied) > 1:  # turn one occurrence of another tied digit into the mode: now unique
            other = int(rng.choice(tied[tied != mode]))
            digits[rng.choice(np.flatnonzero(digits == other))] = mode
        # swap the names of the mode and the answer (keeps the sequence's distribution)
        digits = np.where(digits == mode, answer, np.where(digits == answer, mode, digits))
        return digits, None, answer
    raise ValueError(f"unknown question type {question!r}; allowed: {list(QUESTION_TYPES)}")
