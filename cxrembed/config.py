"""Configuration dataclasses built from mappings (CLI flags, JSON files, notebooks)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, TypeVar

from cxrembed.errors import ConfigError

T = TypeVar("T")

#: Scalar field types checked by :func:`from_mapping` (others are left to ``validate``).
_SCALARS: dict[str, tuple[str, Any]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("a whole number", lambda v: isinstance(v, numbers.Integral)
            and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def _check_type(field: dataclasses.Field, value: Any, what: str) -> None:
    """ConfigError when a scalar option's value has the wrong type (``"3"`` for an int,
    a list for a float): a JSON file or notebook must not reach a comparison with it."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    optional = kind.endswith("| None")
    kind = kind.removesuffix("| None").strip()
    if kind not in _SCALARS or (optional and value is None):
        return
    expected, ok = _SCALARS[kind]
    if not ok(value):
        raise ConfigError(f"{what} option {field.name}={value!r} is not {expected}"
                          f"{' (or null)' if optional else ''}")


def from_mapping(config_cls: type[T], values: dict[str, Any], what: str) -> T:
    """``config_cls(**values)``, refusing unknown keys by name and listing the valid ones
    (a typo must not silently fall back to a default), and scalar values of the wrong type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{what} options must be a mapping of option values, got "
                          f"{type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(map(str, unknown))}; valid: "
                          f"{', '.join(fields)}")
    for name, value in values.items():
        _check_type(fields[name], value, what)
    return config_cls(**values)
