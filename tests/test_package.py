"""Package wiring: the public API, the CI entry point and the README's quick start."""

import os
import re
from pathlib import Path

import mmlongnet

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE)
    assert match is not None
    assert mmlongnet.__version__ == match.group(1) == "0.1.0"


def test_public_api():
    assert {"DilatedAttention", "dilated_attention"} <= set(mmlongnet.__all__)
    for name in mmlongnet.__all__:
        assert hasattr(mmlongnet, name), name
    from mmlongnet.attention import DilatedAttention, dilated_attention

    assert mmlongnet.dilated_attention is dilated_attention
    assert mmlongnet.DilatedAttention is DilatedAttention
    assert callable(mmlongnet.dilated_attention)
    assert isinstance(mmlongnet.DilatedAttention, type)


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    lines = [line.strip() for line in ci.read_text().splitlines()]
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert lines[-1] == "make test"


def test_readme_quickstart_shows_make_demo_and_make_test():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.DOTALL)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_makefile_targets():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, flags=re.MULTILINE))
    assert {"demo", "test", "bench", "lint", "clean"} <= targets


def test_readme_longnet_example_runs_and_shows_true_shapes():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## LongNet layers and models", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].shape == (2, 3000, 512)
    assert namespace["weights"] is None
    assert namespace["logits"].shape == (2, 100, 256)
    assert namespace["text"].shape == (2, 150)
    assert namespace["y"].shape == (2, 3000, 512)


def test_readme_multimodal_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The multimodal model", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 32
    assert out.modality_present["text"].tolist() == [True, False, True]
    assert (tmp_path / "mm-tiny" / "model.safetensors").is_file()
    assert (tmp_path / "video-encoder" / "config.json").is_file()
