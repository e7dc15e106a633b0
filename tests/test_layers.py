"""The layering rules of STYLE.md, enforced on the source (an AST scan of every import).

- Only ``hostagent/wire`` imports construct: one strict codec, nowhere else.
- The pure domain modules import no grpc, sockets, asyncio, subprocesses or construct.
- Nothing under ``hostagent/`` imports grpc or a network client library (claim C1); the
  running agent is checked too (tests/integration/test_agent_passivity.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = ["hostagent/state.py", "hostagent/inventory/cpu.py", "hostagent/inventory/allocator.py",
          "controller/audit/chain.py", "controller/policy.py", "controller/ratelimit.py"]
IO_MODULES = {"grpc", "socket", "asyncio", "subprocess", "construct", "selectors", "ssl"}
NETWORK_CLIENTS = {"grpc", "http", "urllib", "requests", "httpx", "aiohttp", "urllib3", "socketserver", "xmlrpc",
                   "ftplib", "smtplib", "poplib", "imaplib", "telnetlib"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_levels(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_the_scan_sees_imports() -> None:
    """Guard against a scan that finds nothing and so can never fail."""
    assert "construct" in top_levels(ROOT / "hostagent/wire/fields.py")
    assert "asyncio" in top_levels(ROOT / "hostagent/server.py")


@pytest.mark.parametrize("path", python_files("hostagent", "controller"), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_codec_imports_construct(path: Path) -> None:
    if path.is_relative_to(ROOT / "hostagent/wire"):
        return
    assert "construct" not in top_levels(path)


@pytest.mark.parametrize("relative", DOMAIN)
def test_domain_modules_do_no_io(relative: str) -> None:
    assert top_levels(ROOT / relative) & IO_MODULES == set()


@pytest.mark.parametrize("path", python_files("hostagent"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_agent_imports_no_network_library(path: Path) -> None:
    assert top_levels(path) & NETWORK_CLIENTS == set()
