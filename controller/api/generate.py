"""Regenerate the committed Python stubs of the gRPC contract.

    python -m controller.api.generate           # rewrite controller/api/gen/
    python -m controller.api.generate --check   # exit 1 if the committed stubs are stale

Theory of operation.  ``render`` runs protoc (the one bundled in grpcio-tools,
pinned exactly in pyproject.toml, so that its output is reproducible) on the
files in ``PROTOS`` into a scratch directory and returns the whole output tree
as ``{relative path: content}``; nothing in the checkout is touched.  ``write``
then makes ``controller/api/gen/`` equal to that tree: it rewrites changed
files and deletes generated files that no longer have a source.
tests/controller/test_proto.py compares the committed tree with ``render()``,
so a .proto edited without regenerating fails the test suite.

protoc names imports after the proto package (``from passivisor.v1 import
constraints_pb2``), which would need a top-level ``passivisor`` package on
``sys.path``.  Rather than add one, the stubs live below ``controller.api.gen``
and ``_relocate`` rewrites those imports to the absolute
``controller.api.gen.passivisor.v1``, so they work from an installed wheel
too.  The descriptors keep their proto file names (``passivisor/v1/...``),
which is what the protobuf descriptor pool and other languages see.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
GEN_DIR = Path(__file__).resolve().parent / "gen"
GEN_PACKAGE = "controller.api.gen"

# The proto files to compile, relative to PROTO_ROOT, and which of them define
# services (only those get a *_pb2_grpc.py).
PROTOS = ("passivisor/v1/constraints.proto", "passivisor/v1/controller.proto")
SERVICE_PROTOS = ("passivisor/v1/controller.proto",)

# Only files with these suffixes below GEN_DIR are ours to rewrite or delete.
GENERATED_SUFFIXES = (".py", ".pyi")

_PROTO_IMPORT = re.compile(r"^(from|import) passivisor([. ])", re.MULTILINE)

_INIT = '"""Generated from proto/ by `python -m controller.api.generate`; do not edit."""\n'


class GenerationError(Exception):
    """protoc failed, or its output did not have the expected shape."""


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # a build-time tool: imported only here

    include = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    argv = ["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--proto_path={include}", *args]
    status = protoc.main(argv)
    if status != 0:
        raise GenerationError(f"protoc exited with {status}: {' '.join(argv)}")


def _relocate(text: str) -> str:
    """Point imports of sibling stubs at their place below ``GEN_PACKAGE``."""
    return _PROTO_IMPORT.sub(lambda m: f"{m.group(1)} {GEN_PACKAGE}.passivisor{m.group(2)}", text)


def render() -> dict[str, str]:
    """Compile ``PROTOS`` and return the stub tree, keyed by POSIX path relative to GEN_DIR."""
    with tempfile.TemporaryDirectory(prefix="passivisor-protoc-") as scratch:
        _protoc([f"--python_out={scratch}", f"--pyi_out={scratch}", *PROTOS])
        _protoc([f"--grpc_python_out={scratch}", *SERVICE_PROTOS])
        out = Path(scratch)
        tree = {
            path.relative_to(out).as_posix(): _relocate(path.read_text(encoding="utf-8"))
            for path in sorted(out.rglob("*"))
            if path.is_file()
        }
    expected = {name.removesuffix(".proto") + suffix for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi")}
    expected |= {name.removesuffix(".proto") + "_pb2_grpc.py" for name in SERVICE_PROTOS}
    if set(tree) != expected:
        raise GenerationError(f"protoc wrote {sorted(tree)}, expected {sorted(expected)}")
    for name, text in tree.items():
        if _PROTO_IMPORT.search(text):
            raise GenerationError(f"{name}: an import of the proto package was left unrelocated")
    # Package markers for every directory of the tree, GEN_DIR itself included.
    for name in list(tree):
        parent = Path(name).parent
        while True:
            tree.setdefault((parent / "__init__.py").as_posix(), _INIT)
            if parent == Path("."):
                break
            parent = parent.parent
    return dict(sorted(tree.items()))


def committed(gen_dir: Path | None = None) -> dict[str, str]:
    """The generated files currently below ``gen_dir`` (default GEN_DIR)."""
    gen_dir = GEN_DIR if gen_dir is None else gen_dir
    if not gen_dir.is_dir():
        return {}
    return {
        path.relative_to(gen_dir).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(gen_dir.rglob("*"))
        if path.is_file() and path.suffix in GENERATED_SUFFIXES and "__pycache__" not in path.parts
    }


def stale(tree: Mapping[str, str], gen_dir: Path | None = None) -> list[str]:
    """Paths that differ between ``tree`` and ``gen_dir`` (default GEN_DIR): changed, missing or left over."""
    current = committed(gen_dir)
    return sorted(name for name in set(tree) | set(current) if tree.get(name) != current.get(name))


def write(tree: Mapping[str, str], gen_dir: Path | None = None) -> list[str]:
    """Make ``gen_dir`` (default GEN_DIR) hold exactly ``tree``; returns the paths it changed."""
    gen_dir = GEN_DIR if gen_dir is None else gen_dir
    changed = stale(tree, gen_dir)
    for name in changed:
        path = gen_dir / name
        if name in tree:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tree[name], encoding="utf-8")
        else:
            path.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.api.generate",
                                     description="Regenerate the committed Python stubs of the gRPC contract.")
    parser.add_argument("--check", action="store_true", help="only report stale stubs; exit 1 if there are any")
    args = parser.parse_args(argv)
    tree = render()
    if args.check:
        differences = stale(tree)
        for name in differences:
            print(f"stale: controller/api/gen/{name}", file=sys.stderr)
        return 1 if differences else 0
    for name in write(tree):
        print(f"wrote: controller/api/gen/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
