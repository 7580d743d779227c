"""Tests of Triton kernels that run on a GPU and, on the CPU, in Triton's interpreter.

A kernel test is marked `cuda` (a GPU run selects it with `-m cuda`) and runs where its module's
kernels run: a GPU, or a process started with TRITON_INTERPRET=1, which `run_interpreted` starts
from the default CPU run.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


def kernel_test(module: ModuleType):
    """The marks of a test of `module`'s kernels (a module with `triton` and `INTERPRETED`)."""
    runs = pytest.mark.skipif(
        module.triton is None or not (module.INTERPRETED or torch.cuda.is_available()),
        reason="needs Triton and a CUDA GPU (or Triton's interpreter)",
    )
    return lambda test: pytest.mark.cuda(runs(test))


def kernel_device(module: ModuleType) -> str:
    """Where `module`'s kernels run in this process."""
    return "cpu" if module.INTERPRETED else "cuda"


def run_interpreted(module: ModuleType, test_file: str, selection: str) -> None:
    """Run the tests of `test_file` that `-k selection` picks in a subprocess with Triton's
    interpreter; fail unless they all pass (none skipped)."""
    if module.triton is None:
        pytest.skip("Triton is not installed")
    if module.INTERPRETED:
        pytest.skip("already the interpreted run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", test_file,
         "-k", selection, "-x"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
