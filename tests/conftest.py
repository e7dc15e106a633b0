"""Shared test configuration.

Import scheme: ``tests/`` has no ``__init__.py``.  This file puts the
``tests`` directory itself on ``sys.path``, so helper modules are imported by
their path below it, e.g. ``from wire.strategies import frames``.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE``; default ``ci``):

- ``ci``: enough examples to find shallow bugs on every run, fast enough for
  ``make test``;
- ``long``: ten times the examples (and more), for a nightly or pre-release run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

CI_EXAMPLES = 50

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=20 * CI_EXAMPLES,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _remove_agent_runtime_dirs() -> Iterator[None]:
    """Remove, at the end of the session, the runtime directories ``agenthost.prepare`` made.

    They live below the temp dir (``/tmp/pv-<hash>``, short socket paths), outside the test's
    ``tmp_path``, so nothing else removes them.  One still used by a VM process is left alone.
    """
    from controller.devhost import agenthost

    made: set[Path] = set()
    prepare = agenthost.prepare

    def recording(*args: Any, **kwargs: Any) -> agenthost.AgentHost:
        host = prepare(*args, **kwargs)
        made.add(host.runtime_dir)
        return host

    agenthost.prepare = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        agenthost.prepare = prepare  # type: ignore[assignment]
        for path in made:
            agenthost.remove_runtime_dir(path)
