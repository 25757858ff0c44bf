"""Data commands: synth, info, cache."""

from __future__ import annotations

from cxrembed.cli.common import app, console, print_json  # noqa: F401
