"""How well the AV digits count questions can be answered from the frames: a reader's ceiling.

A count question ("how many sevens?") over K frames is answered right only if every one of the K
frames is read right as "a seven" or "not a seven": one misread frame among K changes the count.
This script reads every stored image once with a fixed nearest-neighbour reader (the majority of
the `--neighbours` closest training-split images in pixel space; ties to the closest), then answers
the test split's video-only count questions by counting the frames read as the queried digit,
exactly as composed by `AVDigitsDataset`. What it reaches at each K is what a model whose frame
reading is as good as this reader's would reach by counting exactly, so it separates the two
causes of a low count accuracy: frames read wrong (the ceiling is low too) or the counting itself
(the model stays far below the ceiling). It needs no GPU and no training:

    python benchmarks/count_ceiling.py --digits 4 16 64 256 1024

Prints a markdown table (per K: the reader's accuracy per frame and on the count questions);
`--json PATH` also writes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, use_repository, write_json  # noqa: E402

use_repository()
from mmlongnet.data.avdigits import (  # noqa: E402
    ARTIFACT,
    DEFAULT_DATA_DIR,
    SPLITS,
    AVDigitsConfig,
    AVDigitsDataset,
)


def nearest_neighbour_reading(
    images: np.ndarray, labels: np.ndarray, reference: np.ndarray, neighbours: int
) -> np.ndarray:
    """(n, H, W) images -> (n,) digits read by the majority vote of their `neighbours` nearest
    reference images (indices into `images`, labelled by `labels`) in squared pixel distance, ties
    going to the digit of the nearest voter. An image of the reference set is not its own neighbour."""
    pixels = images.reshape(len(images), -1).astype(np.float64)  # (n, H*W)
    distance = ((pixels[:, None, :] - pixels[None, reference, :]) ** 2).sum(-1)  # (n, r)
    distance[reference, np.arange(len(reference))] = np.inf  # leave each reference image out
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :neighbours]  # (n, k), closest first
    votes = labels[reference][nearest]  # (n, k)
    read = np.empty(len(images), dtype=np.int64)
    for i, row in enumerate(votes):
        counts = np.bincount(row, minlength=10)
        tied = np.flatnonzero(counts == counts.max())
        read[i] = next(d for d in row if d in tied)  # the nearest voter among the tied digits
    return read


def count_accuracy(dataset: AVDigitsDataset, read: np.ndarray) -> tuple[float, float]:
    """Over the dataset's count questions: the share answered right by counting the frames read as
    the queried digit (read: (n,) the digit read for every stored image), and the share of frames
    read right."""
    right = frames = frames_right = 0
    for index in range(len(dataset)):
        example = dataset[index]
        if example["question"] != "count" or example["image_indices"] is None:
            raise ValueError("count_accuracy takes count questions with video (a video-only count dataset)")
        seen = read[np.asarray(example["image_indices"])]  # (K,)
        right += int((seen == example["query_digit"]).sum() == example["label"])
        frames += len(seen)
        frames_right += int((seen == np.asarray(example["digits"])).sum())
    return right / len(dataset), frames_right / frames


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits", type=int, nargs="+", default=[4, 16, 64, 256, 1024], help="K")
    parser.add_argument("--examples", type=int, default=1000, help="test count questions per K")
    parser.add_argument("--neighbours", type=int, default=3, help="voters of the nearest-neighbour reader")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if min(args.digits) < 1 or args.examples < 1 or args.neighbours < 1:
        parser.error("--digits, --examples and --neighbours must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stored = np.load(args.data_dir / ARTIFACT)
    labels = stored["image_labels"].astype(np.int64)
    reference = np.flatnonzero(stored["image_split"] == SPLITS.index("train"))
    read = nearest_neighbour_reading(stored["images"], labels, reference, args.neighbours)
    test = stored["image_split"] == SPLITS.index("test")
    rows = []
    for K in args.digits:
        config = AVDigitsConfig(num_digits=K, questions=["count"], modality_mix={"video": 1.0})
        count, frames = count_accuracy(AVDigitsDataset("test", args.examples, config, args.data_dir), read)
        rows.append({"K": K, "count_accuracy": count, "frame_accuracy": frames, "examples": args.examples})
    test_images_right = float((read[test] == labels[test]).mean())
    print(f"reader: {args.neighbours}-nearest neighbours over {len(reference)} training-split images; "
          f"test-split images read right: {test_images_right:.4f}")  # fmt: skip
    table = [(r["K"], f"{r['frame_accuracy']:.4f}", f"{r['count_accuracy']:.3f}") for r in rows]
    print(markdown_table(["K", "frames read right", "count questions right"], table))
    if args.json:
        options = {name: getattr(args, name) for name in ("digits", "examples", "neighbours")}
        meta = {**environment(torch.device("cpu")), "args": options}
        meta["test_images_read_right"] = test_images_right
        write_json(args.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
