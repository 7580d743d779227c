"""Saving and loading models as safetensors weights plus a JSON config, nothing pickled.

A module that holds its dataclass config in `self.config` and is built as `cls(config)` gets
`save_pretrained(directory)` and `from_pretrained(directory)` from `Pretrained`. The directory
then holds `config.json` ({"class": ..., "config": {...}}) and `model.safetensors`.
`save_pretrained` writes both into a temporary folder beside the target and renames it into
place, so a failed or killed write leaves an earlier export whole.
`from_pretrained` takes a local folder or a Hugging Face Hub id ("owner/name", downloaded with
`huggingface_hub`, installed by the `hub` extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

T = TypeVar("T", bound="Pretrained")


def config_to_dict(config: Any) -> dict:
    """A (nested) dataclass config -> a JSON-serialisable dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _resolve(directory: str | Path) -> Path:
    """A local folder as it is; an "owner/name" Hub id that is no local folder, downloaded."""
    path = Path(directory)
    if path.exists() or str(directory).count("/") != 1 or str(directory).startswith((".", "/")):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FileNotFoundError(
            f"{directory} is no local folder; to load it from the Hugging Face Hub install huggingface_hub "
            "(pip install 'mmlongnet[hub]')"
        ) from error
    return Path(snapshot_download(str(directory), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))


def read_config(directory: str | Path) -> dict:
    """`config.json` of an export -> {"class": ..., "config": {...}}, or a ValueError naming the file."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); was it written by save_pretrained?") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(
            f'{path} must hold a JSON object with a "class" and a "config" object, got '
            f"{type(meta).__name__ if not isinstance(meta, dict) else sorted(meta)}; was it written by "
            "save_pretrained?"
        )
    return meta


def _aliases(module: torch.nn.Module) -> set[str]:
    """Names of the state dict that repeat an earlier entry's tensor (tied weights): not saved, and
    restored by the tie itself when loading."""
    seen, aliases = set(), set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


class Pretrained:
    """Mixin for an `nn.Module` built as `cls(config)` from a dataclass `config_class`."""

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `directory`, atomically: into a temporary
        folder beside it first, which then replaces `directory` (its parents are created)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "config": config_to_dict(self.config)}
        aliases = _aliases(self)
        state = {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in self.state_dict().items()
            if name not in aliases
        }
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            save_file(state, staging / WEIGHTS_FILE, metadata={"class": type(self).__name__})
            (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if directory.exists():  # the old export moves aside, then goes once the new one is in place
                old = Path(
                    tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent)
                )
                os.replace(directory, old / directory.name)
                os.replace(staging, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(
        cls: type[T],
        directory: str | Path,
        *,
        device: torch.device | str | None = None,
        parallelize: Callable[[T], object] | None = None,
    ) -> T:
        """Rebuild the module from `directory` (see `save_pretrained`), a local folder or a Hub id,
        and load its weights. `parallelize` is applied to the built module before its weights are
        loaded, for an export of one rank's shard (e.g. `lambda m: parallelize_vocabulary(m, group)`)."""
        directory = _resolve(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: was it written by save_pretrained?")
        meta = read_config(directory)
        if meta.get("class") != cls.__name__:
            raise ValueError(
                f"{directory} holds a {meta.get('class')!r}, not a {cls.__name__!r}; load it with "
                f"{meta.get('class')}.from_pretrained"
            )
        try:
            config = cls.config_class(**meta["config"])
        except TypeError as error:
            raise ValueError(
                f"{directory / CONFIG_FILE}: its config does not fit {cls.__name__}: {error}"
            ) from error
        module = cls(config)
        if parallelize is not None:
            parallelize(module)
        try:
            state = load_file(directory / WEIGHTS_FILE)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{directory / WEIGHTS_FILE} is not a readable safetensors file ({error}); it may be "
                "truncated: export it again"
            ) from error
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = set(missing) - _aliases(module)
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_FILE} does not match {cls.__name__}: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return module.to(device) if device is not None else module
