"""Configuration dataclasses built from mappings (CLI flags, JSON files, notebooks)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cxrembed.errors import ConfigError

T = TypeVar("T")


def from_mapping(config_cls: type[T], values: dict[str, Any], what: str) -> T:
    """``config_cls(**values)``, refusing unknown keys by name and listing the valid ones
    (a typo must not silently fall back to a default)."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(names)}")
    return config_cls(**values)
