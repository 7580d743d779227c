"""The main job: a multimodal long-context model learns on the CPU, then answers a mixed batch.

`make demo` runs `python -m mmlongnet.demo`, which, from `configs/demo.yaml`:

1. fits the model on the bundled AV digits task (a progress bar per epoch) and saves a checkpoint;
2. tests that checkpoint on the held-out test split;
3. predicts on a batch whose samples carry different modalities (text with audio and video,
   audio only or video only) and prints a few answers beside the truth;
4. ends with one line: `demo: test_acc=<x> (chance <c>) ...`.

Options after `--` go to the CLI, e.g. `python -m mmlongnet.demo -- --trainer.max_epochs 1`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmlongnet.training import CLI

REPO_ROOT = Path(__file__).resolve().parents[1]
SHOWN_PREDICTIONS = 8


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"), help="the YAML to run")
    return parser.parse_args(argv), overrides


def show_predictions(records: list[dict], dataset) -> None:
    """A few answers beside the question and the truth."""
    samples = {sample["id"]: sample for sample in (dataset[i] for i in range(len(dataset)))}
    print(f"\n{'id':<16} {'modalities':<18} {'question':<50} answer truth    p")
    for record in records[:SHOWN_PREDICTIONS]:
        question = samples[record["id"]].get("text") or ""
        question = question if len(question) <= 50 else question[:47] + "..."
        print(
            f"{record['id']:<16} {'+'.join(record['modalities']):<18} {question:<50} "
            f"{record['prediction']:>6} {record.get('label', '?'):>5} {record['probability']:>5.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    cli = CLI(args=["--config", args.config, *overrides], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    print(f"demo: {sum(p.numel() for p in model.parameters()):,} parameters, config {args.config}")
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - started
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    print(f"demo: checkpoint {checkpoint}")
    (test,) = trainer.test(model, datamodule=data, ckpt_path=checkpoint)
    batches = trainer.predict(model, datamodule=data, ckpt_path=checkpoint)
    records = [record for batch in batches for record in batch]
    show_predictions(records, data.datasets["predict"])
    answered = sum(record["prediction"] == record.get("label") for record in records)
    print(
        f"\ndemo: test_acc={test['test_acc']:.3f} (chance {1 / data.num_classes:.2f}) "
        f"test_loss={test['test_loss']:.3f} predict={answered}/{len(records)} correct "
        f"fit={fit_seconds:.0f}s total={time.perf_counter() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
