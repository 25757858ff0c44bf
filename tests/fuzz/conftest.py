"""Hypothesis profiles for the fuzz suite (property tests of every parser of outside input).

``ci`` (the default): few examples per property, derandomised (the same examples on every
run, so CI is not flaky), no example database written into the checkout. ``long``: set
``CXREMBED_FUZZ_EXAMPLES=N`` (``benchmarks/fuzz.py`` does) for N random examples per
property. Either way an example slower than the deadline (20 s, for a loaded shared CPU)
fails, so a hang is a failure, and pytest-timeout stops a property that runs away.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

LONG = int(os.environ.get("CXREMBED_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "cxrembed-ci", max_examples=12, derandomize=True, database=None,
    deadline=timedelta(seconds=20), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile(
    "cxrembed-long", max_examples=max(LONG, 1), derandomize=False, database=None,
    deadline=timedelta(seconds=20), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.load_profile("cxrembed-long" if LONG else "cxrembed-ci")
