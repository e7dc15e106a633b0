"""What every fuzz target shares: instrumentation and the atheris entry point.

What is instrumented.  The ``hostagent`` package (atheris instruments whole
top-level packages), of which the targets import only ``hostagent.wire``.
construct is not instrumented: on the parse path the codec uses nothing of it
but ``stream_read`` and the ``Construct`` base class, so its edges would not
guide the search, and instrumenting it cost about a fifth of the exec/s
(replaying the fuzz_to_controller corpus: 11,600 -> 9,000 exec/s).  A target
may exclude modules further (fuzz_stream does, and says why).

When.  Only when a target runs as a program (``python -m fuzz.fuzz_X``).
Importing a target, as tests/fuzz/test_replay.py does to replay the corpus
through ``TestOneInput``, neither instruments anything nor starts atheris, and
works whether or not ``hostagent.wire`` was imported before and whether or not
the importer has an instrumentation hook of its own open.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

INSTRUMENTED = ("hostagent",)


@contextlib.contextmanager
def instrumented(module_name: str, exclude: tuple[str, ...] = ()) -> Iterator[None]:
    """Instrument what is imported in this block, in a fuzzing process only (``module_name == "__main__"``)."""
    if module_name != "__main__":
        yield
        return
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED), exclude=list(exclude)):
        yield


def fuzz(test_one_input: Callable[[bytes], Any], argv: list[str] | None = None) -> None:
    """Hand ``test_one_input`` to libFuzzer with the command-line flags; libFuzzer ends the process."""
    import atheris

    atheris.Setup(sys.argv if argv is None else argv, test_one_input)
    atheris.Fuzz()
