"""Regenerate the example manifest and its tiny media (about 60 KB in all), deterministically.

    python data/example_manifest/make_example.py

Classes: CLASSES below (red, green, blue); load with
`ManifestDataset("data/example_manifest/manifest.jsonl", classes=["red", "green", "blue"])`.

Writes, next to this script:
- media/tone_220hz.wav: 0.5 s of a 220 Hz sine, 8 kHz, 2 channels, 16-bit PCM (the dataset
  averages it to mono and resamples it);
- media/green_square/frame_000.png ... frame_007.png: 8 frames, 32 x 32 RGB, a green square
  moving right on black;
- media/blue_square.mp4: 16 frames at 8 fps (2 s), 64 x 64, a blue square moving right
  (libx264, or mpeg4 where the PyAV build has no libx264);
- media/blue_square.flac: 2 s of an 880 Hz sine, 16 kHz mono (the audio of the clip);
- manifest.jsonl: one line per form (text only; wav + text; a frame folder with "target";
  mp4 + flac with a class name and "meta"; text without id and label).
The content is computed, not random, so every run gives the same pixels and samples (the mp4's
bytes may differ between FFmpeg versions).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

HERE = Path(__file__).resolve().parent
MEDIA = HERE / "media"
CLASSES = ("red", "green", "blue")


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """(n,) float32 sine wave, n = seconds * rate."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def square_frames(count: int, size: int, side: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """(count, size, size, 3) uint8: a side x side square of colour rgb moving right on black."""
    frames = np.zeros((count, size, size, 3), dtype=np.uint8)
    top = (size - side) // 2
    for i in range(count):
        left = i * (size - side) // max(count - 1, 1)
        frames[i, top : top + side, left : left + side] = rgb
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> str:
    """Encode (T, H, W, 3) uint8 frames as an mp4; returns the codec used."""
    for codec in ("libx264", "mpeg4"):
        if codec not in av.codecs_available:
            continue
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"threads": "1"}
            for index, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return codec
    raise RuntimeError("this PyAV build has neither libx264 nor mpeg4; install the PyAV wheel from PyPI")


def main() -> None:
    MEDIA.mkdir(exist_ok=True)
    left = sine(220.0, 0.5, 8000)
    soundfile.write(MEDIA / "tone_220hz.wav", np.stack([left, 0.5 * left], axis=1), 8000, subtype="PCM_16")

    folder = MEDIA / "green_square"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    for index, pixels in enumerate(square_frames(8, 32, 12, (0, 200, 0))):
        Image.fromarray(pixels).save(folder / f"frame_{index:03d}.png")

    codec = write_mp4(MEDIA / "blue_square.mp4", square_frames(16, 64, 24, (0, 0, 220)), fps=8)
    soundfile.write(MEDIA / "blue_square.flac", sine(880.0, 2.0, 16000), 16000, subtype="PCM_16")

    lines = [
        {"id": "text-only", "text": "a red square on a black background", "label": "red"},
        {"id": "tone-and-text", "text": "a low 220 Hz tone", "audio": "media/tone_220hz.wav", "label": 0},
        {"id": "frame-folder", "video": "media/green_square", "target": "green"},
        {
            "id": "mp4-and-flac",
            "video": "media/blue_square.mp4",
            "audio": "media/blue_square.flac",
            "label": "blue",
            "meta": {"note": "free-form, ignored", "codec": codec},
        },
        {"text": "no id (it becomes line-5) and no label (-1)"},
    ]
    with (HERE / "manifest.jsonl").open("w", encoding="utf-8") as handle:
        for record in lines:
            handle.write(json.dumps(record) + "\n")
    print(f"wrote {HERE / 'manifest.jsonl'} and {MEDIA} (mp4 codec: {codec})")


if __name__ == "__main__":
    main()
