"""``wait_until``: poll a condition in a test, failing the test with a readable message on timeout.

A module of its own (not a conftest) so that test files in any directory import it by the same name:
``from conftest import ...`` resolves to whichever conftest pytest imported first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(probe: Callable[[], T], *, timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
