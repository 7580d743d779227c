"""The type check shared by the config dataclasses' `__post_init__`.

A config read from YAML, JSON or a command line can hold the string "512" where an int is wanted;
the range checks that follow would then fail with `'<=' not supported between ...`, naming
nothing. `check_field_types` runs first and raises a TypeError naming the field instead.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

_SCALARS = (bool, int, float)


@functools.cache
def _scalar_fields(cls: type) -> tuple[tuple[str, tuple[type, ...], bool], ...]:
    """(name, accepted types, None accepted) of each field of `cls` annotated with bool, int, float
    or a union of them (with None); fields of other types (lists, literals, sub-configs) are left
    to the config's own checks."""
    hints = typing.get_type_hints(cls)
    scalars = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        members = typing.get_args(hint) if union else (hint,)
        kinds = tuple(member for member in members if member is not type(None))
        if kinds and all(kind in _SCALARS for kind in kinds):
            scalars.append((field.name, kinds, len(kinds) < len(members)))
    return tuple(scalars)


def check_field_types(config: object) -> None:
    """TypeError naming the field when a bool, int or float field of the dataclass `config` holds
    a value of another kind: a bool field anything but True / False; a number field a string,
    a list, None (unless its annotation allows None), ... An int field holding a float or a bool
    passes: the config's range checks reject it with a ValueError saying what is allowed."""
    for name, kinds, optional in _scalar_fields(type(config)):
        value = getattr(config, name)
        if value is None and optional:
            continue
        if kinds == (bool,):
            valid, wanted = isinstance(value, bool), "a bool (true or false)"
        else:
            valid = isinstance(value, int | float)
            wanted = "a number" if float in kinds else "an int"
        if not valid:
            allowed = f"{wanted} or None" if optional else wanted
            raise TypeError(
                f"{type(config).__name__}.{name} must be {allowed}, got {value!r} ({type(value).__name__})"
            )
