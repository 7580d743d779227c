"""Byte windows over text files: deterministic file splits and windows."""

import pytest
import torch

from mmlongnet.data.text_files import ByteWindows, split_text_files, stdlib_directory
from mmlongnet.modalities import ByteTokenizer


def test_files_split_deterministically_and_disjointly(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n")
    splits = split_text_files(tmp_path, "*.txt")
    assert splits == split_text_files(tmp_path, "*.txt")
    names = [set(map(str, paths)) for paths in splits.values()]
    assert sum(map(len, names)) == 60 and len(set.union(*names)) == 60
    assert len(splits["train"]) > len(splits["val"])
    with pytest.raises(FileNotFoundError, match="no file matching"):
        split_text_files(tmp_path, "*.md")


def test_windows_are_slices_of_the_byte_stream(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 20)
    (tmp_path / "b.txt").write_text("second file")
    dataset = ByteWindows([tmp_path / "a.txt", tmp_path / "b.txt"], window=16, num_windows=50, seed=3)
    tokenizer = ByteTokenizer()
    stream = tokenizer.encode("hello world, " * 20) + [tokenizer.eos_id] + tokenizer.encode("second file")
    stream = torch.tensor(stream + [tokenizer.eos_id])
    assert torch.equal(dataset.ids.long(), stream)
    for i in range(len(dataset)):
        window = dataset[i]
        assert window.shape == (17,) and window.dtype == torch.long
        assert any(torch.equal(stream[s : s + 17], window) for s in range(stream.numel() - 16))
        assert torch.equal(window, ByteWindows([tmp_path / "a.txt", tmp_path / "b.txt"], 16, 50, seed=3)[i])
    with pytest.raises(ValueError, match="fewer than one window"):
        ByteWindows([tmp_path / "b.txt"], window=64, num_windows=1)


def test_the_default_corpus_is_the_standard_library():
    assert (stdlib_directory() / "os.py").is_file()
