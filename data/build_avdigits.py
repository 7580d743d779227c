"""Rebuild the bundled "AV digits" artifacts in data/avdigits/ (see data/README.md).

Needs scikit-learn (the handwritten digits) and Debian's espeak-ng (the speech):

    apt-get install -y espeak-ng
    pip install -e ".[data-build]"          # scikit-learn
    python data/build_avdigits.py            # writes data/avdigits/avdigits.npz + manifest.json

Everything follows from --seed (default 0): the image splits, the speakers (accent, voice
variant, rate, pitch) and their splits. espeak-ng is deterministic, so the same seed and the
same espeak-ng / scikit-learn versions give byte-identical files (the npz is written with fixed
zip timestamps; manifest.json records the versions and SHA-256 checksums).

Legend: n images, m clips, S total stored audio samples.

Artifacts (avdigits.npz, arrays without pickled objects):
    images        (n, 8, 8) uint8   grey levels 0..16 (scikit-learn's load_digits)
    image_labels  (n,) uint8        digit 0..9
    image_split   (n,) uint8        0 train, 1 val, 2 test (70/15/15, stratified by digit)
    audio         (S,) int16        all clips back to back, 16 kHz, silence trimmed, RMS <= -20 dBFS
    clip_offsets  (m + 1,) int64    clip j is audio[clip_offsets[j]:clip_offsets[j + 1]]
    clip_labels   (m,) uint8        the spoken digit 0..9
    clip_split    (m,) uint8        0 train, 1 val, 2 test (by speaker: no speaker in two splits)
    clip_speaker  (m,) int16        speaker index into the speaker_* arrays
    speaker_voice (p,) str          espeak-ng voice, e.g. "en-us+f3"
    speaker_rate  (p,) int16        words per minute (espeak-ng -s)
    speaker_pitch (p,) int16        pitch 0..99 (espeak-ng -p)
    speaker_split (p,) uint8        0 train, 1 val, 2 test
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import tempfile
import time
import wave
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchaudio

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")
SAMPLE_RATE = 16000
TARGET_RMS = 0.1
"""Every clip is scaled to this RMS (-20 dBFS) over its trimmed extent, or less where its peak
would pass PEAK_LIMIT."""
PEAK_LIMIT = 0.99
"""Largest absolute sample value after scaling."""
TRIM_THRESHOLD = 0.01
"""Leading / trailing samples below this fraction (-40 dB) of the clip's peak are silence."""
TRIM_MARGIN = 160
"""Samples (10 ms at 16 kHz) of the trimmed silence kept on each side."""
ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
"""espeak-ng English voices (accents)."""
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5")
"""espeak-ng voice variants (formant sets); "" is the accent's own voice."""
RATES = (130, 145, 160, 175, 190, 205)
"""Speaking rates in words per minute (espeak-ng -s; its default is 175)."""
PITCHES = (25, 35, 45, 55, 65, 75)
"""Base pitches 0..99 (espeak-ng -p; its default is 50)."""
SPEAKERS_PER_SPLIT = {"train": 5, "val": 1, "test": 1}
"""Speakers per accent in each split: 8 accents x 7 = 56 speakers, 560 clips."""
IMAGE_FRACTIONS = {"val": 0.15, "test": 0.15}
"""Fractions of each digit's images held out for val and test; the rest is train."""


def split_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n,) uint8 split codes, stratified by digit: per digit round(15%) val, round(15%) test."""
    split = np.zeros(len(labels), dtype=np.uint8)
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(IMAGE_FRACTIONS["val"] * len(idx))
        n_test = round(IMAGE_FRACTIONS["test"] * len(idx))
        split[idx[:n_val]] = 1
        split[idx[n_val : n_val + n_test]] = 2
    return split


def choose_speakers(rng: np.random.Generator) -> list[dict]:
    """Per accent, distinct voice variants split by SPEAKERS_PER_SPLIT; rates and pitches spread evenly.

    Within each split the speakers' rates cycle through a shuffled RATES (likewise pitches), so
    every split covers the whole range: val and test (8 speakers each) hold every rate and pitch.

    Returns a list of {"voice", "rate", "pitch", "split"} (split as 0/1/2), accents in ACCENTS order."""
    per_accent = sum(SPEAKERS_PER_SPLIT.values())
    speakers = []
    for accent in ACCENTS:
        variants = rng.choice(len(VARIANTS), size=per_accent, replace=False)
        splits = rng.permutation(np.repeat(np.arange(3), [SPEAKERS_PER_SPLIT[s] for s in SPLITS]))
        for variant, split in zip(variants, splits, strict=True):
            speakers.append({"voice": accent + VARIANTS[variant], "split": int(split)})
    for code in range(3):
        members = [s for s in speakers if s["split"] == code]
        rates = rng.permutation(np.resize(rng.permutation(RATES), len(members)))
        pitches = rng.permutation(np.resize(rng.permutation(PITCHES), len(members)))
        for speaker, rate, pitch in zip(members, rates, pitches, strict=True):
            speaker["rate"], speaker["pitch"] = int(rate), int(pitch)
    return [{key: s[key] for key in ("voice", "rate", "pitch", "split")} for s in speakers]


def synthesise(word: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech of `word` -> (s,) float32 at SAMPLE_RATE, silence trimmed, RMS TARGET_RMS
    (peak limited)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "word.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(path), word],
            check=True,
            capture_output=True,
        )
        with wave.open(str(path)) as wav:
            if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
                raise RuntimeError(
                    f"espeak-ng wrote {wav.getnchannels()} channels of {wav.getsampwidth()} bytes"
                )
            rate_in = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    wave_in = torch.from_numpy(pcm.astype(np.float32) / 32768.0)  # (s_in,)
    samples = torchaudio.functional.resample(wave_in, rate_in, SAMPLE_RATE).numpy()  # (s,)
    loud = np.flatnonzero(np.abs(samples) > TRIM_THRESHOLD * np.abs(samples).max())
    start = max(int(loud[0]) - TRIM_MARGIN, 0)
    stop = min(int(loud[-1]) + 1 + TRIM_MARGIN, len(samples))
    samples = samples[start:stop]
    rms = np.sqrt(np.mean(samples.astype(np.float64) ** 2))
    return (samples * min(TARGET_RMS / rms, PEAK_LIMIT / np.abs(samples).max())).astype(np.float32)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format with fixed zip timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def espeak_version() -> str:
    """e.g. "eSpeak NG text-to-speech: 1.51" (without the machine's data path)."""
    out = subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout
    return out.split("Data at:")[0].strip()


def build(out_dir: Path, seed: int, workers: int) -> dict:
    """Build the artifacts into `out_dir` and return the manifest written beside them."""
    import sklearn
    from sklearn.datasets import load_digits

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found; install it with `apt-get install -y espeak-ng`")
    image_rng, speaker_rng = (np.random.default_rng([seed, stream]) for stream in range(2))

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (n, 8, 8), 0..16
    image_labels = digits.target.astype(np.uint8)  # (n,)
    if not np.array_equal(images, digits.images):
        raise RuntimeError("load_digits returned non-integer grey levels")
    image_split = split_images(image_labels, image_rng)

    speakers = choose_speakers(speaker_rng)
    jobs = [(s, d) for s in range(len(speakers)) for d in range(10)]
    with ThreadPoolExecutor(workers) as pool:
        clips = list(
            pool.map(
                lambda job: synthesise(
                    WORDS[job[1]],
                    speakers[job[0]]["voice"],
                    speakers[job[0]]["rate"],
                    speakers[job[0]]["pitch"],
                ),
                jobs,
            )
        )
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    clip_offsets = np.concatenate([[0], np.cumsum(lengths)])  # (m + 1,)
    audio = np.round(np.concatenate(clips) * 32768.0).astype(np.int16)  # (S,)
    clip_speaker = np.array([s for s, _ in jobs], dtype=np.int16)
    arrays = {
        "images": images,
        "image_labels": image_labels,
        "image_split": image_split,
        "audio": audio,
        "clip_offsets": clip_offsets,
        "clip_labels": np.array([d for _, d in jobs], dtype=np.uint8),
        "clip_split": np.array([speakers[s]["split"] for s, _ in jobs], dtype=np.uint8),
        "clip_speaker": clip_speaker,
        "speaker_voice": np.array([s["voice"] for s in speakers]),
        "speaker_rate": np.array([s["rate"] for s in speakers], dtype=np.int16),
        "speaker_pitch": np.array([s["pitch"] for s in speakers], dtype=np.int16),
        "speaker_split": np.array([s["split"] for s in speakers], dtype=np.uint8),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    npz_path = out_dir / "avdigits.npz"
    write_npz(npz_path, arrays)

    seconds = lengths / SAMPLE_RATE
    manifest = {
        "name": "avdigits",
        "description": "UCI handwritten digits (8x8, from scikit-learn) and synthesised spoken digits "
        "(espeak-ng); see data/README.md",
        "build": {
            "command": f"python data/build_avdigits.py --seed {seed}",
            "seed": seed,
            "espeak_ng": espeak_version(),
            "scikit_learn": sklearn.__version__,
            "sample_rate": SAMPLE_RATE,
            "target_rms": TARGET_RMS,
            "peak_limit": PEAK_LIMIT,
            "trim_threshold": TRIM_THRESHOLD,
            "trim_margin_samples": TRIM_MARGIN,
            "accents": list(ACCENTS),
            "variants": [v or "(none)" for v in VARIANTS],
            "rates_wpm": list(RATES),
            "pitches": list(PITCHES),
            "speakers_per_accent": SPEAKERS_PER_SPLIT,
            "image_fractions": IMAGE_FRACTIONS,
        },
        "counts": {
            "images": {name: int((image_split == code).sum()) for code, name in enumerate(SPLITS)},
            "clips": {name: int((arrays["clip_split"] == code).sum()) for code, name in enumerate(SPLITS)},
            "speakers": {
                name: int((arrays["speaker_split"] == code).sum()) for code, name in enumerate(SPLITS)
            },
        },
        "clip_seconds": {
            "mean": round(float(seconds.mean()), 4),
            "min": round(float(seconds.min()), 4),
            "max": round(float(seconds.max()), 4),
            "per_digit_mean": [
                round(float(seconds[arrays["clip_labels"] == d].mean()), 4) for d in range(10)
            ],
        },
        "speakers": [{**s, "split": SPLITS[s["split"]]} for s in speakers],
        "files": {
            "avdigits.npz": {
                "bytes": npz_path.stat().st_size,
                "sha256": hashlib.sha256(npz_path.read_bytes()).hexdigest(),
            }
        },
        "arrays": {
            name: {
                "dtype": str(a.dtype),
                "shape": list(a.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
            }
            for name, a in arrays.items()
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the speakers (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "avdigits",
        help="output folder (default: data/avdigits beside this script)",
    )
    parser.add_argument("--workers", type=int, default=8, help="espeak-ng processes run at once")
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = build(args.out, args.seed, args.workers)
    info = manifest["files"]["avdigits.npz"]
    print(f"wrote {args.out}/avdigits.npz ({info['bytes'] / 1e6:.2f} MB) and manifest.json")
    print(f"images {manifest['counts']['images']}, clips {manifest['counts']['clips']}")
    print(f"clip seconds {manifest['clip_seconds']}; built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
