"""What every fuzz target shares: instrumentation and the atheris entry point.

What is instrumented.  The ``hostagent`` package (atheris instruments whole
top-level packages), of which the targets import only ``hostagent.wire``.
construct is not instrumented: on the parse path the codec uses nothing of it
but ``stream_read`` and the ``Construct`` base class, so its edges would not
guide the search, and instrumenting it cost about a fifth of the exec/s
(replaying the fuzz_to_controller corpus: 11,600 -> 9,000 exec/s).  A target
may exclude modules further (fuzz_stream does, and says why), or name its own
modules instead (fuzz_envelope instruments ``controller.envelope`` only).

atheris instruments whole top-level packages: given ``controller.envelope`` it
would instrument any ``controller`` module imported under the hook, and most of
``controller`` imports grpc.  So for a dotted name the harness imports the
parent packages first, uninstrumented, and checks afterwards that the named
modules were imported under the hook (a module imported earlier was not
instrumented, and the search would run blind) and that no other module of that
package was: a target that needs more must name it.

When.  Only when a target runs as a program (``python -m fuzz.fuzz_X``).
Importing a target, as tests/fuzz/test_replay.py does to replay the corpus
through ``TestOneInput``, neither instruments anything nor starts atheris, and
works whether or not ``hostagent.wire`` was imported before and whether or not
the importer has an instrumentation hook of its own open.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

INSTRUMENTED = ("hostagent",)


@contextlib.contextmanager
def instrumented(module_name: str, exclude: tuple[str, ...] = (),
                 include: tuple[str, ...] = INSTRUMENTED) -> Iterator[None]:
    """Instrument what is imported in this block, in a fuzzing process only (``module_name == "__main__"``).

    ``include`` names top-level packages (all of each is instrumented) or dotted modules (only those; see
    the module docstring).
    """
    if module_name != "__main__":
        yield
        return
    import atheris

    modules = tuple(name for name in include if "." in name)
    for name in modules:
        importlib.import_module(name.rpartition(".")[0])  # the parents, before the hook, so not instrumented
    before = set(sys.modules)
    with atheris.instrument_imports(include=list(include), exclude=list(exclude)):
        yield
    if modules:
        _check_only(modules, before)


def _check_only(modules: tuple[str, ...], before: set[str]) -> None:
    """Exactly ``modules`` (and their submodules) of their packages were imported under the hook."""
    not_instrumented = [name for name in modules if name in before]
    packages = {name.partition(".")[0] for name in modules}
    extra = sorted(name for name in set(sys.modules) - before
                   if name.partition(".")[0] in packages
                   and not any(name == m or name.startswith(m + ".") for m in modules))
    if not_instrumented or extra:
        raise RuntimeError(f"fuzz: instrumentation is not what the target named: imported before the hook "
                           f"(not instrumented) {not_instrumented}, instrumented without being named {extra}")


def fuzz(test_one_input: Callable[[bytes], Any], argv: list[str] | None = None) -> None:
    """Hand ``test_one_input`` to libFuzzer with the command-line flags; libFuzzer ends the process."""
    import atheris

    atheris.Setup(sys.argv if argv is None else argv, test_one_input)
    atheris.Fuzz()
