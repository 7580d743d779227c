"""The command line: `LightningCLI` with the model and data chosen by `class_path` in the config."""

from __future__ import annotations

import os
import re
import sys

import lightning.pytorch as pl
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mmlongnet.training.checkpoint import RunCheckpoint

__all__ = ["CLI"]

# A line of a jsonargparse error that names the offending key, most specific first.
_KEY_LINE = re.compile(
    r"(does not accept option|Option '[^']*' is not accepted|Key '[^']*' is not expected|"
    r"unrecognized arguments|is required|required but not included|Not a valid|Expected a)"
)


def _error_summary(message: str) -> str:
    """The one line of a jsonargparse error that names the key, prefixed with the parser key."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    head = re.match(r'Parser key "([^"]+)"', lines[0])
    for pattern in _KEY_LINE.pattern.strip("()").split("|"):
        for line in lines:
            if re.search(pattern, line):
                line = line.lstrip("- ")
                return f'"{head.group(1)}": {line}' if head else line
    return lines[-1]


class _Parser(LightningArgumentParser):
    """Lightning's parser that reports an error without the usage text: the details first, then
    the one line that names the key, so that the last line of the output is the one to read."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # inside a parse that handles its own errors (e.g. a Union)
            return super().error(message, ex)
        details = message.strip()
        summary = _error_summary(details)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: the configuration is not valid (`{prog} --help` lists the options)\n")
        if details != summary:
            sys.stderr.write(details + "\n")
        sys.stderr.write(f"error: {summary}\n")
        self.exit(2)


def _raised_by_parser(error: BaseException) -> bool:
    """Whether `error` was raised in jsonargparse's code (a wrapper), not in the class it built."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "jsonargparse" in frame.tb_frame.f_code.co_filename


def _run_root(default_root_dir: str | None) -> str:
    return os.fspath(default_root_dir) if default_root_dir else os.getcwd()


class CLI(LightningCLI):
    """`LightningCLI(LightningModule, LightningDataModule)` in subclass mode.

    `python train.py {fit,validate,test,predict} --config configs/X.yaml`; every option can be
    overridden on the command line (`--trainer.max_steps 10`); `--print_config` shows them all and
    `--help` explains them (a config dataclass's field docstrings are their help). Options are
    never abbreviated, and an invalid key ends the error with the one line that names it.

    The logger's `save_dir` follows `trainer.default_root_dir` (the run's folder), where
    `RunCheckpoint` and `JSONLPredictionWriter` write too.
    """

    def __init__(self, *args, **kwargs) -> None:
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", _Parser)
        super().__init__(pl.LightningModule, pl.LightningDataModule, *args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", _run_root)

    def before_instantiate_classes(self) -> None:
        """A config that asks for a GPU on a machine without one ends with what to change, instead
        of Lightning's traceback ("No supported gpu backend found!")."""
        trainer = self._get(self.config, "trainer")
        accelerator = trainer.get("accelerator") if trainer is not None else None
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            sys.exit(
                f"{self.subcommand}: the config asks for a GPU (trainer.accelerator: {accelerator}) and "
                "torch finds no CUDA device here. Run it on a machine with one, or on the CPU with "
                "--trainer.accelerator cpu --trainer.precision 32-true (much slower; bf16 on a CPU "
                "slower still; configs/demo.yaml is the CPU-sized job)"
            )

    def instantiate_classes(self) -> None:
        """A class whose arguments it refuses (a ValueError or TypeError of its own, e.g. `compile`
        and `graphed` both on) ends with that class and its message as the last line, instead of
        jsonargparse's traceback and a dump of the whole config."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            cause = error  # the parser wraps the class's own error, maybe more than once
            while _raised_by_parser(cause) and cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error:  # not raised while building a class of the config
                raise
            built = re.search(r"class_path='([^']+)'", str(error))
            what = f" ({built.group(1)})" if built else ""
            sys.stderr.write(f"{self.subcommand}: the configuration does not build{what}\n")
            sys.stderr.write(f"error: {cause}\n")
            sys.exit(2)

    def _find_best_checkpoint(self) -> None:
        """`--ckpt_path best` in a process that did not fit: the run folder's best checkpoint
        (`RunCheckpoint.find_best`), or an error that says what to pass instead."""
        if self.config_init[self.subcommand].get("ckpt_path") != "best":
            return
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, RunCheckpoint):
            try:
                callback.find_best(self.trainer)
            except ValueError as error:
                sys.exit(f"{self.subcommand}: {error}")

    before_validate = before_test = before_predict = _find_best_checkpoint
