"""Saving and loading models as safetensors weights plus a JSON config, nothing pickled.

A module that holds its dataclass config in `self.config` and is built as `cls(config)` gets
`save_pretrained(directory)` and `from_pretrained(directory)` from `Pretrained`. The directory
then holds `config.json` ({"class": ..., "config": {...}}) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

T = TypeVar("T", bound="Pretrained")


def config_to_dict(config: Any) -> dict:
    """A (nested) dataclass config -> a JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


class Pretrained:
    """Mixin for an `nn.Module` built as `cls(config)` from a dataclass `config_class`."""

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "config": config_to_dict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE, metadata={"class": type(self).__name__})
        return directory

    @classmethod
    def from_pretrained(
        cls: type[T], directory: str | Path, *, device: torch.device | str | None = None
    ) -> T:
        """Rebuild the module from `directory` (see `save_pretrained`) and load its weights."""
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: was it written by save_pretrained?")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta.get("class") != cls.__name__:
            raise ValueError(
                f"{directory} holds a {meta.get('class')!r}, not a {cls.__name__!r}; load it with "
                f"{meta.get('class')}.from_pretrained"
            )
        module = cls(cls.config_class(**meta["config"]))
        state = load_file(directory / WEIGHTS_FILE)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_FILE} does not match {cls.__name__}: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return module.to(device) if device is not None else module
