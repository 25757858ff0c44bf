"""Hypothesis profiles for the fuzz suite (property tests of every parser of outside input).

``ci`` (the default): few examples per property, derandomised (the same examples on every
run, so CI is not flaky), no example database written into the checkout. ``long``: set
``CXREMBED_FUZZ_EXAMPLES=N`` (``benchmarks/fuzz.py`` does) for N random examples per
property. The ``ci`` profile has no per-example deadline: on a loaded CI machine a
deadline fails examples that are merely slow, and a hang is caught by pytest-timeout (each
fuzz module's ``timeout`` mark). The ``long`` profile keeps a 20 s deadline, so a slow
parser shows up in a campaign.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

LONG = int(os.environ.get("CXREMBED_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "cxrembed-ci", max_examples=12, derandomize=True, database=None,
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.register_profile(
    "cxrembed-long", max_examples=max(LONG, 1), derandomize=False, database=None,
    deadline=timedelta(seconds=20), print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large])
settings.load_profile("cxrembed-long" if LONG else "cxrembed-ci")
