"""The count-question ceiling of a frame reader: the reading, the counting, and the script's rows."""

import json

import numpy as np
import pytest
from benchmark_loader import load_benchmark

from mmlongnet.data import AVDigitsConfig, AVDigitsDataset

bench = load_benchmark("count_ceiling")
VIDEO_COUNTS = AVDigitsConfig(num_digits=16, questions=["count"], modality_mix={"video": 1.0})


def test_the_nearest_neighbour_reader_votes_and_leaves_each_reference_image_out():
    images = np.array([[[0]], [[1]], [[10]], [[11]], [[12]], [[2]]], dtype=np.uint8)  # (6, 1, 1)
    labels = np.array([0, 0, 1, 1, 1, 7])
    reference = np.array([0, 1, 2, 3, 4])
    read = bench.nearest_neighbour_reading(images, labels, reference, neighbours=3)
    # image 0's voters are images 1, 2, 3 (itself left out): digits 0, 1, 1 -> 1; image 1's are 0, 2,
    # 3 -> 1; image 5 (not a reference image) has 1, 0, 2 -> 0
    assert read.tolist() == [1, 1, 1, 1, 1, 0]
    nearest = bench.nearest_neighbour_reading(images, labels, reference, neighbours=1)
    assert nearest.tolist() == [0, 0, 1, 1, 1, 0]
    # a tie between two voters of different digits goes to the nearer one
    far = np.array([[[0]], [[30]], [[3]]], dtype=np.uint8)
    assert bench.nearest_neighbour_reading(far, np.array([4, 9, 0]), np.array([0, 1]), 2)[2] == 4


def test_counting_frames_read_right_answers_every_count_question():
    dataset = AVDigitsDataset("test", 40, VIDEO_COUNTS)
    labels = np.load(bench.DEFAULT_DATA_DIR / bench.ARTIFACT)["image_labels"].astype(np.int64)
    assert bench.count_accuracy(dataset, labels) == (1.0, 1.0)


def test_one_misread_frame_changes_exactly_the_counts_it_enters():
    dataset = AVDigitsDataset("test", 40, VIDEO_COUNTS)
    labels = np.load(bench.DEFAULT_DATA_DIR / bench.ARTIFACT)["image_labels"].astype(np.int64)
    misread = labels.copy()
    image = dataset[0]["image_indices"][0]  # read every use of this image as another digit
    misread[image] = (labels[image] + 1) % 10
    wrong = [
        i for i in range(len(dataset))
        if image in dataset[i]["image_indices"]
        and dataset[i]["query_digit"] in (labels[image], misread[image])
    ]  # fmt: skip
    frames = sum(len(dataset[i]["digits"]) for i in range(len(dataset)))
    uses = sum(dataset[i]["image_indices"].count(image) for i in range(len(dataset)))
    count, frame = bench.count_accuracy(dataset, misread)
    assert count == pytest.approx(1 - len(wrong) / len(dataset))
    assert frame == pytest.approx(1 - uses / frames)
    with pytest.raises(ValueError, match="video-only count"):
        firsts = AVDigitsDataset("test", 4, AVDigitsConfig(num_digits=4, questions=["first"]))
        bench.count_accuracy(firsts, labels)


def test_the_script_writes_one_row_per_k(tmp_path):
    out = tmp_path / "ceiling.json"
    assert bench.main(["--digits", "2", "8", "--examples", "20", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [row["K"] for row in data["rows"]] == [2, 8]
    for row in data["rows"]:
        assert 0.5 < row["frame_accuracy"] <= 1.0 and 0.0 <= row["count_accuracy"] <= 1.0
    assert 0.9 < data["meta"]["test_images_read_right"] <= 1.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--neighbours", "0"])
