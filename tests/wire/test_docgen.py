"""docs/wire-format.md is generated from the schema and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent import wire
from hostagent.wire import docgen

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def test_committed_document_matches_the_schema() -> None:
    assert DOC.read_text() == docgen.render(), "docs/wire-format.md is stale: run `make docs`"


def test_document_names_every_message_kind_and_limit() -> None:
    text = docgen.render()
    for message_type in wire.MessageType:
        assert f"### {message_type.name} ({int(message_type):#04x})" in text
    for kind in wire.FrameErrorKind:
        assert f"| `{kind.value}` |" in text
    assert f"| `MAX_FRAME` | {wire.MAX_FRAME} |" in text
    assert "Rule: GRACEFUL needs timeout_s 1..600, FORCE needs timeout_s 0." in text


def test_module_entry_point_prints_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    docgen.main()
    assert capsys.readouterr().out == docgen.render()
