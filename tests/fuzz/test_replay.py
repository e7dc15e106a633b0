"""The fuzz campaign inside pytest: corpus replay, target hygiene and the runner's contract.

Every file in fuzz/corpus/<target>/ and fuzz/regressions/<target>/ goes
through that target's TestOneInput, which raises on any invariant violation
(each target's docstring states its invariant), so a regression found by a
campaign stays fixed.  The stream corpus is also fed literally one byte at a
time, which the fuzzer itself skips for speed (see fuzz/fuzz_stream.py).
Importing a target starts nothing: atheris only runs under ``python -m``.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the fuzz/ directory is a package of the checkout, not an installed one

FUZZ = ROOT / "fuzz"
TARGETS = sorted(path.stem for path in FUZZ.glob("fuzz_*.py"))


def _target(name: str) -> ModuleType:
    return importlib.import_module(f"fuzz.{name}")


def _inputs() -> list[tuple[str, Path]]:
    """(target, file) for every seed and every regression reproducer."""
    return [(target, path) for kind in ("corpus", "regressions") for target in TARGETS
            for path in sorted((FUZZ / kind / target).glob("*")) if path.is_file()]


def _id(case: tuple[str, Path]) -> str:
    return f"{case[1].parent.parent.name}/{case[0]}/{case[1].name[:16]}"


def test_there_are_targets() -> None:
    assert {"fuzz_to_agent", "fuzz_to_controller", "fuzz_stream"} <= set(TARGETS)


@pytest.mark.parametrize("case", _inputs(), ids=_id)
def test_replay(case: tuple[str, Path]) -> None:
    target, path = case
    _target(target).TestOneInput(path.read_bytes())


@pytest.mark.parametrize("path", sorted((FUZZ / "corpus" / "fuzz_stream").glob("*")), ids=lambda p: p.name[:16])
def test_stream_corpus_byte_by_byte(path: Path) -> None:
    stream_target = _target("fuzz_stream")
    direction, sizes, max_buffer, stream = stream_target.parse_input(path.read_bytes())
    stream_target.check(stream, sizes, direction, max_buffer, bytewise=True)


@pytest.mark.parametrize("target", TARGETS)
def test_target_has_seeds_dictionary_and_options(target: str) -> None:
    seeds = [path for path in (FUZZ / "corpus" / target).glob("*") if path.is_file()]
    assert seeds, f"fuzz/corpus/{target}/ has no seeds (run python -m fuzz.seed)"
    entries = [line for line in (FUZZ / f"{target}.dict").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries and all(re.fullmatch(r'\w+="([^"\\]|\\x[0-9a-f]{2})*"', line) for line in entries)
    assert re.search(r"^max_len = \d+$", (FUZZ / f"{target}.options").read_text(), re.MULTILINE)
    module = _target(target)
    assert callable(module.TestOneInput) and callable(module.main)
    assert (module.__doc__ or "").count("Invariant") >= 1, "the header must state the invariant"


def test_seeds_and_dictionaries_are_up_to_date() -> None:
    """The committed corpora and dictionaries are what ``python -m fuzz.seed`` generates."""
    seed = importlib.import_module("fuzz.seed")
    for target, inputs in seed.seeds().items():
        expected = {hashlib.sha1(data, usedforsecurity=False).hexdigest() for data in inputs}
        present = {path.name for path in (FUZZ / "corpus" / target).iterdir()}
        assert present == expected, f"fuzz/corpus/{target} is stale: run python -m fuzz.seed"
        assert (FUZZ / f"{target}.dict").read_text() == seed.dictionary(target), f"fuzz/{target}.dict is stale"


def test_stream_memo_restores_the_decoder() -> None:
    """The stream target memoizes decode for one input only, and puts the real functions back."""
    from hostagent.wire import stream

    stream_target = _target("fuzz_stream")
    real = (stream.decode, stream.decode_header)
    with pytest.raises(stream_target.Violation), stream_target.Memo(None):
        assert stream.decode is not real[0]
        raise stream_target.Violation("leave the context by an exception")
    assert (stream.decode, stream.decode_header) == real


def test_stream_target_catches_a_late_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that holds back a complete frame once must be reported: the target can fail."""
    from hostagent import wire
    from hostagent.wire import stream

    stream_target = _target("fuzz_stream")
    seed = importlib.import_module("fuzz.seed")
    data = wire.encode(seed.frames()[0])
    real_next_frame = stream.FrameDecoder.next_frame

    def late(self: wire.FrameDecoder) -> wire.Frame | None:
        if self.bytes_needed() == 0 and not getattr(self, "held_back", False):
            self.held_back = True  # type: ignore[attr-defined]
            return None
        return real_next_frame(self)

    stream_target.check(data + data[:1], [1], None, 2 * wire.messages.MAX_FRAME)
    monkeypatch.setattr(stream.FrameDecoder, "next_frame", late)
    with pytest.raises(stream_target.Violation):
        stream_target.check(data + data[:1], [1], None, 2 * wire.messages.MAX_FRAME)


@pytest.mark.parametrize("target", ["fuzz_to_agent", "fuzz_to_controller"])
def test_frame_targets_catch_a_non_canonical_codec(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that disagrees with the bytes decoded must be reported: the targets can fail."""
    from hostagent import wire

    seed = importlib.import_module("fuzz.seed")
    module = _target(target)
    frame = next(f for f in seed.frames() if f.spec.direction is module.DIRECTION)
    data = wire.encode(frame)
    module.TestOneInput(data)
    real_encode = wire.encode
    monkeypatch.setattr(wire, "encode", lambda f: real_encode(f)[:-1] + bytes([real_encode(f)[-1] ^ 1]))
    with pytest.raises(AssertionError, match="not canonical"):
        module.TestOneInput(data)


def test_stream_seeds_reach_the_overflow_path() -> None:
    """Invariant 2's one exception (feed refusing a chunk) is exercised by the seeds, not only allowed."""
    stream_target = _target("fuzz_stream")
    overflowed = 0
    for path in sorted((FUZZ / "corpus" / "fuzz_stream").glob("*")):
        direction, sizes, max_buffer, stream = stream_target.parse_input(path.read_bytes())
        with stream_target.Memo(direction) as memo:
            reference = stream_target.model(stream, direction, memo)
            ends = stream_target._chunk_ends(reference.length, sizes)
            run = stream_target.feed(stream[: reference.length], ends, direction, max_buffer, reference, True)
        overflowed += run.overflow_at is not None
    assert overflowed >= 1


def test_importing_targets_starts_nothing() -> None:
    """Import under an active instrumentation hook, with Setup and Fuzz booby-trapped."""
    code = "\n".join([
        "import atheris, pathlib, sys",
        "def boom(*args, **kwargs): raise SystemExit('atheris started on import')",
        "atheris.Setup = atheris.Fuzz = boom",
        "with atheris.instrument_imports(include=['hostagent']):",
        *[f"    import fuzz.{name}" for name in TARGETS],
        *[f"fuzz.{name}.TestOneInput(next(pathlib.Path('fuzz/corpus/{name}').iterdir()).read_bytes())"
          for name in TARGETS],
        "print('ok')",
    ])
    completed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().endswith("ok")


def test_runner_contract(tmp_path: Path) -> None:
    """``python -m fuzz`` runs a target briefly and ends with the documented summary line."""
    completed = subprocess.run(
        [sys.executable, "-m", "fuzz", "--seconds", "2", "--target", "fuzz_to_agent", "--artifacts", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert re.fullmatch(r"fuzz: targets=1 execs=[1-9]\d* crashes=0", lines[-1])
    assert re.match(r"fuzz_to_agent: execs=\d+ exec/s=\d+ cov=", lines[0])
    assert (tmp_path / "fuzz_to_agent" / "corpus").is_dir()


def test_runner_counts_a_crash(tmp_path: Path) -> None:
    """A finding makes the summary count it and the exit status non-zero (the runner can fail)."""
    runner = importlib.import_module("fuzz.__main__")
    result = runner.Result("fuzz_x", returncode=1, findings=[tmp_path / "crash-0"])
    assert result.crashes == 1
    assert runner.Result("fuzz_x", returncode=-9).crashes == 1
    assert runner.Result("fuzz_x").crashes == 0
    output = "#2\tINITED cov: 10 ft: 20 corp: 3/30b exec/s: 0 rss: 40Mb\n" \
             "#99\tDONE   cov: 12 ft: 25 corp: 4/40b lim: 4 exec/s: 99 rss: 40Mb\n" \
             "stat::number_of_executed_units: 99\nstat::average_exec_per_sec:     99\n" \
             "stat::new_units_added:          1\n"
    parsed = runner.Result("fuzz_x")
    runner.parse(parsed, output)
    assert (parsed.execs, parsed.exec_per_sec, parsed.cov, parsed.ft, parsed.corpus, parsed.new_units) == \
        (99, 99, (10, 12), (20, 25), (3, 4), 1)
