"""The gRPC contract (proto/passivisor/v1/*.proto), its stubs and its field constraints.

- The committed stubs are what ``python -m controller.api.generate`` writes now,
  and they import from an installed package without a top-level ``passivisor``.
- ``buf lint`` passes (the binary from the npm package @bufbuild/buf).
- The service is the one issue 4 names; every mutating request carries a client
  token; every request field carries a constraint that fits its type; the bounds
  mirror the agent channel (claim C2: both sides check the same rules).
- ``controller.api.constraints.validate`` accepts valid requests and names the
  field of every broken rule: missing, malformed, out of range, wrong length,
  undeclared enum number, cross-field rule, unknown field, non-canonical encoding.
- The protobuf runtime behaves as the validator assumes (characterization tests).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import given
from hypothesis import strategies as st

from controller.api import constraints, generate
from controller.api.constraints import FieldViolation, validate
from controller.api.gen.passivisor.v1 import constraints_pb2
from controller.api.gen.passivisor.v1 import controller_pb2 as pb
from hostagent import wire
from hostagent.wire import messages as m

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
SERVICE = pb.DESCRIPTOR.services_by_name["HostController"]
UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"

RPCS = [
    "StartInstance", "StopInstance", "AttachVolume", "DetachVolume", "AssignVirtualFunction",
    "ReleaseVirtualFunction", "DescribeInstance", "ListInstances", "GetHostIdentity", "ReadAuditLog",
    "GetMetrics", "PollEvents",
]
MUTATING = ["StartInstance", "StopInstance", "AttachVolume", "DetachVolume", "AssignVirtualFunction",
            "ReleaseVirtualFunction"]

TOKEN = "9b2f4c1e-7a3d-4e5f-8a6b-0c1d2e3f4a5b"
INSTANCE = "3f8e2d1c-5b4a-4c3d-9e2f-1a0b9c8d7e6f"
VOLUME = "c0ffee00-1234-4abc-a123-456789abcdef"

# One valid request per RPC; every field that can be set is set.
VALID: dict[str, Message] = {
    "StartInstance": pb.StartInstanceRequest(
        client_token=TOKEN, instance_id=INSTANCE, vcpus=2, memory_mib=512,
        image_digest=bytes(range(32)), image_signature=bytes(range(64)),
    ),
    "StopInstance": pb.StopInstanceRequest(
        client_token=TOKEN, instance_id=INSTANCE, mode=pb.STOP_MODE_GRACEFUL, timeout_seconds=30,
    ),
    "AttachVolume": pb.AttachVolumeRequest(
        client_token=TOKEN, instance_id=INSTANCE, volume_id=VOLUME, read_only=True, envelope=b"\x01" * 120,
    ),
    "DetachVolume": pb.DetachVolumeRequest(client_token=TOKEN, instance_id=INSTANCE, volume_id=VOLUME),
    "AssignVirtualFunction": pb.AssignVirtualFunctionRequest(
        client_token=TOKEN, instance_id=INSTANCE,
        physical_function=pb.PciAddress(domain=0x10, bus=0x3B, device=0x1F, function=7),
        mac=bytes.fromhex("020000abcdef"), vlan=4095,
    ),
    "ReleaseVirtualFunction": pb.ReleaseVirtualFunctionRequest(
        client_token=TOKEN, instance_id=INSTANCE,
        virtual_function=pb.PciAddress(domain=0, bus=0x3B, device=2, function=1),
    ),
    "DescribeInstance": pb.DescribeInstanceRequest(instance_id=INSTANCE),
    "ListInstances": pb.ListInstancesRequest(),
    "GetHostIdentity": pb.GetHostIdentityRequest(),
    "ReadAuditLog": pb.ReadAuditLogRequest(from_sequence=17, max_records=1000),
    "GetMetrics": pb.GetMetricsRequest(),
    "PollEvents": pb.PollEventsRequest(after_cursor=2**64 - 1, max_events=64),
}


def request(rpc: str, **changes: Any) -> Message:
    """A copy of the valid request for ``rpc`` with fields changed (None clears a field)."""
    message = type(VALID[rpc])()
    message.CopyFrom(VALID[rpc])
    for name, value in changes.items():
        if value is None:
            message.ClearField(name)
        elif isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def one(violations: list[FieldViolation]) -> tuple[str, str]:
    assert len(violations) == 1, violations
    return violations[0].field, violations[0].rule


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def request_fields(descriptor: Any) -> list[tuple[str, Any]]:
    """(path, field) for every field of a request type and of the message types it contains."""
    found = []
    for field in descriptor.fields:
        found.append((f"{descriptor.full_name}.{field.name}", field))
        if field.message_type is not None:
            found.extend(request_fields(field.message_type))
    return found


def add_to_default_pool(file: Any, message_name: str) -> Any:
    """Add a made-up proto file (once per process) and return one of its message types."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindMessageTypeByName(message_name)
    except KeyError:
        pool.Add(file)
        return pool.FindMessageTypeByName(message_name)


# --- stubs -------------------------------------------------------------------


def test_the_committed_stubs_are_what_the_generator_writes() -> None:
    stale = generate.stale(generate.render())
    assert stale == [], f"stale stubs {stale}: run `python -m controller.api.generate` and commit the result"


def test_the_generator_is_deterministic() -> None:
    assert generate.render() == generate.render()


def test_the_staleness_check_sees_edits_leftovers_and_gaps(tmp_path: Path) -> None:
    tree = generate.render()
    assert generate.write(tree, tmp_path) == sorted(tree)
    assert generate.stale(tree, tmp_path) == []
    edited = "passivisor/v1/controller_pb2.py"
    (tmp_path / edited).write_text(tree[edited] + "# edited\n", encoding="utf-8")
    (tmp_path / "passivisor/v1/orphan_pb2.py").write_text("", encoding="utf-8")
    (tmp_path / "passivisor/v1/controller_pb2_grpc.py").unlink()
    expected = sorted([edited, "passivisor/v1/orphan_pb2.py", "passivisor/v1/controller_pb2_grpc.py"])
    assert generate.stale(tree, tmp_path) == expected
    assert generate.write(tree, tmp_path) == expected
    assert generate.stale(tree, tmp_path) == []
    assert not (tmp_path / "passivisor/v1/orphan_pb2.py").exists()


def test_the_check_mode_fails_on_stale_stubs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(generate, "GEN_DIR", tmp_path)
    assert generate.main(["--check"]) == 1
    assert "stale: controller/api/gen/passivisor/v1/controller_pb2.py" in capsys.readouterr().err
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0


def test_stub_imports_are_relocated_below_the_controller_package() -> None:
    for name, text in generate.render().items():  # .py and .pyi alike
        tree = ast.parse(text)
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not any(module.split(".")[0] == "passivisor" for module in modules), name
    assert pb.__name__ == "controller.api.gen.passivisor.v1.controller_pb2"
    assert pb.DESCRIPTOR.name == "passivisor/v1/controller.proto"  # what other languages see


def test_the_stubs_import_from_an_installed_copy_without_the_checkout(tmp_path: Path) -> None:
    """Copy the package alone (as a wheel would install it) and import the gRPC stub from there."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "controller" / "api", site / "controller" / "api",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "controller" / "__init__.py", site / "controller" / "__init__.py")
    probe = (
        "import sys\n"
        "from controller.api.gen.passivisor.v1 import controller_pb2_grpc as g\n"
        "from controller.api import constraints\n"
        "print(g.__file__)\n"
        "print(constraints.__file__)\n"
        "print('passivisor' in sys.modules)\n"
        "print(hasattr(g, 'HostControllerStub') and hasattr(g, 'add_HostControllerServicer_to_server'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    stub_file, constraints_file, top_level, has_api = result.stdout.split()
    assert Path(stub_file).is_relative_to(site)
    assert Path(constraints_file).is_relative_to(site)
    assert top_level == "False"
    assert has_api == "True"


def test_the_validator_needs_protobuf_only_never_grpc() -> None:
    """constraints.py is pure: the controller calls it before any I/O, and clients may reuse it."""
    tree = ast.parse((ROOT / "controller" / "api" / "constraints.py").read_text())
    absolute = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    absolute |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0}
    assert absolute == {"__future__", "re", "collections", "dataclasses", "typing", "google"}
    assert relative == {"gen.passivisor.v1"}
    probe = "import sys, controller.api.constraints; print(sorted(k for k in sys.modules if k.split('.')[0] == 'grpc'))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                            timeout=60)
    assert result.stdout.strip() == "[]"


# --- buf lint ------------------------------------------------------------------


def run_buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.skip("node_modules/.bin/buf is absent: `make test` installs @bufbuild/buf from package-lock.json")
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120)


def test_buf_lint_passes() -> None:
    result = run_buf("lint", "proto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_buf_lint_applies_this_configuration(tmp_path: Path) -> None:
    """Guard against a lint that cannot fail: an undocumented field and a bad enum zero value are caught."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    path = tmp_path / "proto/passivisor/v1/controller.proto"
    text = path.read_text()
    text = text.replace("  // Attach read-only.\n", "").replace("STOP_MODE_UNSPECIFIED = 0", "STOP_MODE_NONE = 0")
    path.write_text(text)
    result = run_buf("lint", "proto", cwd=tmp_path)
    assert result.returncode != 0
    assert '"read_only" should have a non-empty comment' in result.stdout
    assert '"STOP_MODE_NONE" should be suffixed with "_UNSPECIFIED"' in result.stdout


# --- the service -----------------------------------------------------------------


def test_the_service_has_the_methods_issue_4_names() -> None:
    assert [method.name for method in SERVICE.methods] == RPCS
    for method in SERVICE.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
        assert not method.client_streaming and not method.server_streaming


@pytest.mark.parametrize("rpc", RPCS)
def test_client_token_exactly_on_mutating_requests(rpc: str) -> None:
    fields = SERVICE.methods_by_name[rpc].input_type.fields_by_name
    if rpc not in MUTATING:
        assert "client_token" not in fields
        return
    token = fields["client_token"]
    assert token.number == 1 and token.type == token.TYPE_STRING
    rule = constraints.constraint_of(token)
    assert rule.required and rule.pattern == UUID_PATTERN and rule.max_len == 36


@pytest.mark.parametrize("rpc", RPCS)
def test_every_request_field_carries_a_fitting_constraint(rpc: str) -> None:
    descriptor = SERVICE.methods_by_name[rpc].input_type
    assert constraints.schema_problems(descriptor) == []
    for path, field in request_fields(descriptor):
        assert constraints.constraint_of(field) is not None, path


def test_identifiers_share_the_canonical_uuid_rule() -> None:
    seen = 0
    for method in SERVICE.methods:
        for path, field in request_fields(method.input_type):
            if field.name.endswith("_id") or field.name == "client_token":
                rule = constraints.constraint_of(field)
                assert (rule.required, rule.pattern, rule.max_len) == (True, UUID_PATTERN, 36), path
                seen += 1
    assert seen == 6 * 2 + 2 + 1  # tokens and instance ids of the mutating six, two volume ids, Describe


def test_the_schema_check_finds_defects() -> None:
    """schema_problems can fail: a made-up request type with one defect per field."""
    field_type = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="passivisor_test/defects.proto", package="passivisor_test", syntax="proto3",
        dependency=["passivisor/v1/constraints.proto"],
    )
    bad = file.message_type.add(name="DefectiveRequest")

    def add(name: str, kind: int, repeated: bool = False, **rule: Any) -> None:
        label = field_type.LABEL_REPEATED if repeated else field_type.LABEL_OPTIONAL
        field = bad.field.add(name=name, number=len(bad.field) + 1, type=kind, label=label)
        if rule.pop("annotated", True):
            field.options.Extensions[constraints_pb2.constraint].CopyFrom(constraints_pb2.FieldConstraint(**rule))

    add("bare", field_type.TYPE_UINT32, annotated=False)
    add("unanchored", field_type.TYPE_STRING, pattern="[a-z]+", max_len=8)
    add("broken", field_type.TYPE_STRING, pattern="^([a-z]$", max_len=8)
    add("unbounded", field_type.TYPE_BYTES)
    add("pattern_on_int", field_type.TYPE_UINT32, pattern="^1$")
    add("inverted", field_type.TYPE_UINT32, min=5, max=4)
    add("short_long", field_type.TYPE_BYTES, min_len=9, max_len=8)
    add("listed", field_type.TYPE_UINT32, repeated=True)
    add("flag", field_type.TYPE_BOOL, required=True)
    cond = bad.options.Extensions[constraints_pb2.message_constraint].conditional_ranges.add()
    cond.when_field, cond.field, cond.min, cond.max = "nowhere", "flag", 1, 0
    descriptor = add_to_default_pool(file, "passivisor_test.DefectiveRequest")
    problems = "\n".join(constraints.schema_problems(descriptor))
    for expected in [
        "bare: no (passivisor.v1.constraint) option",
        "unanchored: pattern is not anchored",
        "broken: pattern does not compile",
        "unbounded: unbounded string or bytes",
        "pattern_on_int: pattern on a non-string field",
        "inverted: min > max",
        "short_long: min_len > max_len",
        "listed: max_items must be set",
        "flag: a required bool could never be false",
        "when_field 'nowhere' is not a singular integer or enum field",
        "conditional range on 'flag': not a singular integer field",
        "conditional range on 'flag': min > max",
    ]:
        assert expected in problems
    # A contract with a broken pattern fails loudly when first used, never accepts silently.
    with pytest.raises(re.error):
        validate(message_factory.GetMessageClass(descriptor)(unanchored="toolongvalue"))


def test_bounds_mirror_the_agent_channel() -> None:
    def rule(message: Any, name: str) -> Any:
        return constraints.constraint_of(message.DESCRIPTOR.fields_by_name[name])

    start = pb.StartInstanceRequest
    assert (rule(start, "vcpus").min, rule(start, "vcpus").max) == (m.MIN_VCPUS, m.MAX_VCPUS)
    assert (rule(start, "memory_mib").min, rule(start, "memory_mib").max) == (m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB)
    assert rule(start, "image_digest").min_len == rule(start, "image_digest").max_len == m.DIGEST_SIZE
    assert rule(start, "image_signature").min_len == rule(start, "image_signature").max_len == m.SIGNATURE_SIZE
    assert rule(pb.StopInstanceRequest, "timeout_seconds").max == m.MAX_STOP_TIMEOUT_S
    assert rule(pb.AssignVirtualFunctionRequest, "vlan").max == m.MAX_VLAN
    assert rule(pb.AssignVirtualFunctionRequest, "mac").max_len == 6
    assert rule(pb.PollEventsRequest, "max_events").max == m.MAX_EVENTS_PER_PULL
    assert [(rule(pb.PciAddress, n).min, rule(pb.PciAddress, n).max) for n in ("domain", "bus", "device", "function")] \
        == [(0, 0xFFFF), (0, 0xFF), (0, 31), (0, 7)]


@pytest.mark.parametrize(("proto_enum", "agent_enum", "prefix"), [
    (pb.InstanceState, m.InstanceState, "INSTANCE_STATE_"),
    (pb.StopMode, m.StopMode, "STOP_MODE_"),
    (pb.VolumeState, m.VolumeState, "VOLUME_STATE_"),
    (pb.VirtualFunctionState, m.VfState, "VIRTUAL_FUNCTION_STATE_"),
    (pb.EventKind, m.EventKind, "EVENT_KIND_"),
    (pb.EventReason, m.EventReason, "EVENT_REASON_"),
])
def test_enums_mirror_the_agent_channel(proto_enum: Any, agent_enum: Any, prefix: str) -> None:
    renamed = {"VF_ASSIGNED": "VIRTUAL_FUNCTION_ASSIGNED", "VF_RELEASED": "VIRTUAL_FUNCTION_RELEASED",
               "NONE": "UNSPECIFIED"}
    expected = {prefix + renamed.get(member.name, member.name): int(member) for member in agent_enum}
    expected.setdefault(prefix + "UNSPECIFIED", 0)
    assert dict(proto_enum.items()) == expected


# --- the validator: valid requests -------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS)
def test_a_valid_request_has_no_violations(rpc: str) -> None:
    raw = VALID[rpc].SerializeToString()
    parsed = type(VALID[rpc]).FromString(raw)
    assert validate(parsed, encoded_size=len(raw)) == []


@pytest.mark.parametrize(("rpc", "changes"), [
    ("StopInstance", {"mode": pb.STOP_MODE_FORCE, "timeout_seconds": 0}),
    ("StopInstance", {"mode": pb.STOP_MODE_GRACEFUL, "timeout_seconds": 1}),
    ("StopInstance", {"mode": pb.STOP_MODE_GRACEFUL, "timeout_seconds": 600}),
    ("StartInstance", {"vcpus": 1, "memory_mib": 64}),
    ("StartInstance", {"vcpus": 128, "memory_mib": 1 << 20}),
    ("AttachVolume", {"envelope": None, "read_only": False}),  # not encrypted (issue 5)
    ("AttachVolume", {"envelope": b"\xff" * 1024}),
    ("AssignVirtualFunction", {"vlan": 0, "physical_function": pb.PciAddress()}),  # 0000:00:00.0, untagged
    ("ReadAuditLog", {"from_sequence": 0, "max_records": 1}),
    ("PollEvents", {"after_cursor": 0, "max_events": 1}),
])
def test_the_edges_of_each_range_are_valid(rpc: str, changes: dict[str, Any]) -> None:
    assert validate(request(rpc, **changes)) == []


# --- the validator: each kind of violation -------------------------------------------


REQUIRED = [
    (rpc, path.rsplit(".", 1)[1])
    for rpc in RPCS
    for path, field in request_fields(SERVICE.methods_by_name[rpc].input_type)
    if field.containing_type is SERVICE.methods_by_name[rpc].input_type and constraints.constraint_of(field).required
]


def test_the_required_fields_are_the_expected_ones() -> None:
    # Per request, in RPCS order: Start .. PollEvents.
    assert len(REQUIRED) == 6 + 3 + 3 + 3 + 4 + 3 + 1 + 0 + 0 + 1 + 0 + 1


@pytest.mark.parametrize(("rpc", "name"), REQUIRED)
def test_a_missing_required_field_is_named(rpc: str, name: str) -> None:
    assert one(validate(request(rpc, **{name: None}))) == (name, "required")


@pytest.mark.parametrize(("bad", "rule"), [
    (TOKEN.upper(), "pattern"),
    (TOKEN[:9] + "7A3D" + TOKEN[13:], "pattern"),  # one uppercase group
    (TOKEN.replace("-", ""), "pattern"),
    (TOKEN.replace("-", "_"), "pattern"),
    (TOKEN[:-1], "pattern"),
    ("00000000-0000-0000-0000-000000000000", "pattern"),  # nil
    ("9b2f4c1e-7a3d-4e5f-ca6b-0c1d2e3f4a5b", "pattern"),  # variant 110 (Microsoft), not RFC 9562
    ("9b2f4c1e-7a3d-4e5f-7a6b-0c1d2e3f4a5b", "pattern"),  # variant 0 (NCS)
    ("9b2f4c1e-7a3d-4e5f-8a6b-0c1d2e3f4a5\u00e9", "max_len"),  # 37 UTF-8 bytes
    ("9b2f4c1e-7a3d-4e5f-8a6b-0c1d2e3f4a\u0661", "pattern"),  # ARABIC-INDIC DIGIT ONE is not [0-9a-f]
    ("{" + TOKEN + "}", "max_len"),
    ("urn:uuid:" + TOKEN, "max_len"),
    (TOKEN + "\n", "max_len"),
    (TOKEN[:-1] + "\n", "pattern"),  # $ must not match before a final newline
    (" " + TOKEN[1:], "pattern"),
])
@pytest.mark.parametrize("name", ["client_token", "instance_id", "volume_id"])
def test_a_malformed_uuid_is_named(bad: str, rule: str, name: str) -> None:
    assert one(validate(request("AttachVolume", **{name: bad}))) == (name, rule)


def test_an_over_long_identifier_is_refused_before_its_pattern_runs() -> None:
    assert one(validate(request("DescribeInstance", instance_id=INSTANCE + "0" * 10_000))) == ("instance_id", "max_len")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"vcpus": 0}, ("vcpus", "required")),
    ({"vcpus": 129}, ("vcpus", "max")),
    ({"vcpus": 2**32 - 1}, ("vcpus", "max")),
    ({"memory_mib": 63}, ("memory_mib", "min")),
    ({"memory_mib": (1 << 20) + 1}, ("memory_mib", "max")),
    ({"image_digest": bytes(31)}, ("image_digest", "min_len")),
    ({"image_digest": bytes(33)}, ("image_digest", "max_len")),
    ({"image_signature": bytes(63)}, ("image_signature", "min_len")),
    ({"image_signature": bytes(65)}, ("image_signature", "max_len")),
])
def test_start_instance_violations(changes: dict[str, Any], expected: tuple[str, str]) -> None:
    assert one(validate(request("StartInstance", **changes))) == expected


@pytest.mark.parametrize(("changes", "expected"), [
    ({"mode": pb.STOP_MODE_UNSPECIFIED}, ("mode", "required")),
    ({"mode": 3}, ("mode", "defined_only")),
    ({"mode": -1}, ("mode", "defined_only")),
    ({"timeout_seconds": 601}, ("timeout_seconds", "max")),
    ({"mode": pb.STOP_MODE_GRACEFUL, "timeout_seconds": 0}, ("timeout_seconds", "conditional_range")),
    ({"mode": pb.STOP_MODE_FORCE, "timeout_seconds": 1}, ("timeout_seconds", "conditional_range")),
    ({"mode": pb.STOP_MODE_FORCE, "timeout_seconds": 601}, ("timeout_seconds", "max")),  # reported once
])
def test_stop_instance_violations(changes: dict[str, Any], expected: tuple[str, str]) -> None:
    assert one(validate(request("StopInstance", **changes))) == expected


def test_a_cross_field_violation_names_the_enum_value() -> None:
    (violation,) = validate(request("StopInstance", mode=pb.STOP_MODE_FORCE, timeout_seconds=5))
    assert violation.description == "must be in 0..0 when mode is STOP_MODE_FORCE, got 5"


@pytest.mark.parametrize(("rpc", "changes", "expected"), [
    ("AttachVolume", {"envelope": bytes(1025)}, ("envelope", "max_len")),
    ("AssignVirtualFunction", {"mac": bytes(5)}, ("mac", "min_len")),
    ("AssignVirtualFunction", {"mac": bytes(7)}, ("mac", "max_len")),
    ("AssignVirtualFunction", {"vlan": 4096}, ("vlan", "max")),
    ("AssignVirtualFunction", {"physical_function": pb.PciAddress(domain=65536)}, ("physical_function.domain", "max")),
    ("AssignVirtualFunction", {"physical_function": pb.PciAddress(bus=256)}, ("physical_function.bus", "max")),
    ("AssignVirtualFunction", {"physical_function": pb.PciAddress(device=32)}, ("physical_function.device", "max")),
    ("ReleaseVirtualFunction", {"virtual_function": pb.PciAddress(function=8)}, ("virtual_function.function", "max")),
    ("ReadAuditLog", {"max_records": 1001}, ("max_records", "max")),
    ("PollEvents", {"max_events": 65}, ("max_events", "max")),
])
def test_range_and_length_violations(rpc: str, changes: dict[str, Any], expected: tuple[str, str]) -> None:
    assert one(validate(request(rpc, **changes))) == expected


def test_every_violation_is_reported_not_only_the_first() -> None:
    bad = pb.StartInstanceRequest(instance_id=INSTANCE.upper(), vcpus=500, memory_mib=1, image_digest=b"x")
    assert [(v.field, v.rule) for v in validate(bad)] == [
        ("client_token", "required"), ("instance_id", "pattern"), ("vcpus", "max"), ("memory_mib", "min"),
        ("image_digest", "min_len"), ("image_signature", "required"),
    ]


def test_validation_leaves_the_request_unchanged() -> None:
    bad = request("AssignVirtualFunction", vlan=9999)
    before = bad.SerializeToString(deterministic=True)
    assert validate(bad)
    assert bad.SerializeToString(deterministic=True) == before


# --- the validator: unknown fields and encodings -----------------------------------------


@pytest.mark.parametrize("extra", [
    tag(99, 0) + varint(1),  # varint
    tag(99, 1) + bytes(8),  # fixed64
    tag(99, 2) + varint(3) + b"abc",  # length-delimited
    tag(99, 5) + bytes(4),  # fixed32
    tag(99, 3) + tag(99, 4),  # an (empty) group
])
def test_an_unknown_field_is_refused(extra: bytes) -> None:
    raw = VALID["DescribeInstance"].SerializeToString() + extra
    parsed = pb.DescribeInstanceRequest.FromString(raw)
    assert one(validate(parsed)) == ("#99", "unknown_field")
    assert one(validate(pb.ListInstancesRequest.FromString(extra))) == ("#99", "unknown_field")


def test_a_known_field_with_the_wrong_wire_type_is_unknown() -> None:
    # vcpus (field 3, a varint) sent as fixed32: protobuf keeps it as an unknown field.
    raw = request("StartInstance", vcpus=None).SerializeToString() + tag(3, 5) + (2).to_bytes(4, "little")
    parsed = pb.StartInstanceRequest.FromString(raw)
    assert parsed.vcpus == 0
    assert [(v.field, v.rule) for v in validate(parsed)] == [("#3", "unknown_field"), ("vcpus", "required")]


def test_an_unknown_field_inside_a_nested_message_is_refused_with_its_path() -> None:
    pci = pb.PciAddress(bus=3).SerializeToString() + tag(15, 0) + varint(1)
    raw = request("AssignVirtualFunction", physical_function=None).SerializeToString() + tag(3, 2) + varint(
        len(pci)) + pci
    parsed = pb.AssignVirtualFunctionRequest.FromString(raw)
    assert parsed.physical_function.bus == 3
    assert one(validate(parsed)) == ("physical_function.#15", "unknown_field")


def test_an_undeclared_enum_number_on_the_wire_is_refused() -> None:
    raw = request("StopInstance", mode=None).SerializeToString() + tag(3, 0) + varint(9)
    parsed = pb.StopInstanceRequest.FromString(raw)
    assert one(validate(parsed)) == ("mode", "defined_only")


@pytest.mark.parametrize(("name", "extra", "why"), [
    ("truncated varint", tag(3, 0) + varint(2**32 + 4), "vcpus 2**32 + 4 parses as 4"),
    ("repeated field", tag(3, 0) + varint(64) + tag(3, 0) + varint(4), "the last vcpus wins"),
    ("padded varint", tag(3, 0) + b"\x84\x80\x00", "4 in three bytes"),
])
def test_a_non_canonical_encoding_is_refused(name: str, extra: str, why: str) -> None:
    raw = request("StartInstance", vcpus=None).SerializeToString() + extra
    parsed = pb.StartInstanceRequest.FromString(raw)
    assert parsed.vcpus == 4, why
    assert validate(parsed) == []  # invisible in the parsed message ...
    assert one(validate(parsed, encoded_size=len(raw))) == ("", "encoding")  # ... but not in its size


def test_an_explicit_zero_value_is_a_non_canonical_encoding() -> None:
    raw = VALID["ReadAuditLog"].SerializeToString() + tag(1, 0) + varint(0)  # from_sequence = 0, written out
    parsed = pb.ReadAuditLogRequest.FromString(raw)
    assert one(validate(parsed, encoded_size=len(raw))) == ("", "encoding")


# --- properties ---------------------------------------------------------------------------

RFC_UUIDS = st.binary(min_size=16, max_size=16).map(
    lambda b: uuid.UUID(bytes=b[:8] + bytes([b[8] & 0x3F | 0x80]) + b[9:])
)


@given(rpc=st.sampled_from(RPCS), data=st.binary(max_size=300))
def test_validate_is_total_on_any_parsable_bytes(rpc: str, data: bytes) -> None:
    cls = type(VALID[rpc])
    try:
        parsed = cls.FromString(data)
    except DecodeError:
        return
    violations = validate(parsed, encoded_size=len(data))
    assert all(isinstance(v, FieldViolation) for v in violations)


@given(rpc=st.sampled_from(RPCS), data=st.binary(max_size=64), position=st.integers(min_value=0))
def test_a_mutated_valid_request_is_valid_or_named(rpc: str, data: bytes, position: int) -> None:
    """Splice junk into a valid encoding: whatever parses either passes every rule or names a field."""
    raw = VALID[rpc].SerializeToString()
    cut = position % (len(raw) + 1)
    try:
        parsed = type(VALID[rpc]).FromString(raw[:cut] + data + raw[cut:])
    except DecodeError:
        return
    for violation in validate(parsed):
        assert violation.field and violation.rule and violation.description


@given(instance=RFC_UUIDS, token=RFC_UUIDS, vcpus=st.integers(1, 128), memory=st.integers(64, 1 << 20),
       digest=st.binary(min_size=32, max_size=32), signature=st.binary(min_size=64, max_size=64))
def test_a_valid_start_request_is_a_valid_agent_command(instance: uuid.UUID, token: uuid.UUID, vcpus: int,
                                                        memory: int, digest: bytes, signature: bytes) -> None:
    """Claim C2: what the controller accepts, the agent's codec accepts too (for its shape)."""
    message = pb.StartInstanceRequest(client_token=str(token), instance_id=str(instance), vcpus=vcpus,
                                      memory_mib=memory, image_digest=digest, image_signature=signature)
    raw = message.SerializeToString()
    assert validate(pb.StartInstanceRequest.FromString(raw), encoded_size=len(raw)) == []
    command = m.StartInstance(uuid.UUID(message.instance_id), vcpus, memory, digest, signature)
    wire.encode(wire.Frame(seq=1, message=command, mac=bytes(m.MAC_SIZE)))


@given(mode=st.sampled_from([pb.STOP_MODE_GRACEFUL, pb.STOP_MODE_FORCE, 0, 3]), timeout=st.integers(0, 700))
def test_stop_rules_agree_with_the_agent_codec(mode: int, timeout: int) -> None:
    message = request("StopInstance", mode=mode, timeout_seconds=timeout)
    accepted = validate(message) == []
    try:
        command = m.StopInstance(uuid.UUID(INSTANCE), m.StopMode(mode), timeout)
        wire.encode(wire.Frame(seq=1, message=command, mac=bytes(m.MAC_SIZE)))
        agent_accepts = True
    except (ValueError, wire.FrameError):
        agent_accepts = False
    assert accepted == agent_accepts


@given(domain=st.integers(0, 0x1FFFF), bus=st.integers(0, 0x1FF), device=st.integers(0, 63),
       function=st.integers(0, 15))
def test_pci_rules_agree_with_the_agent_codec(domain: int, bus: int, device: int, function: int) -> None:
    message = request("ReleaseVirtualFunction",
                      virtual_function=pb.PciAddress(domain=domain, bus=bus, device=device, function=function))
    accepted = validate(message) == []
    command = m.ReleaseVf(uuid.UUID(INSTANCE), m.PciAddress(domain, bus, device, function))
    try:
        wire.encode(wire.Frame(seq=1, message=command, mac=bytes(m.MAC_SIZE)))
        agent_accepts = True
    except wire.FrameError:
        agent_accepts = False
    assert accepted == agent_accepts


# --- sensitive fields ------------------------------------------------------------------------------


def test_only_the_envelope_is_sensitive() -> None:
    found = {method.name: constraints.sensitive_fields(method.input_type) for method in SERVICE.methods}
    assert found == {rpc: frozenset({"envelope"} if rpc == "AttachVolume" else ()) for rpc in RPCS}


def test_sensitive_paths_reach_into_nested_messages() -> None:
    file = descriptor_pb2.FileDescriptorProto(
        name="passivisor_test/nested_secret.proto", package="passivisor_test", syntax="proto3",
        dependency=["passivisor/v1/constraints.proto"],
    )
    inner = file.message_type.add(name="Inner")
    key = inner.field.add(name="key", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                          label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    key.options.Extensions[constraints_pb2.constraint].sensitive = True
    outer = file.message_type.add(name="OuterRequest")
    outer.field.add(name="inner", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                    type_name=".passivisor_test.Inner", label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    descriptor = add_to_default_pool(file, "passivisor_test.OuterRequest")
    assert constraints.sensitive_fields(descriptor) == frozenset({"inner.key"})


# --- what the validator assumes of the protobuf runtime -----------------------------------------


def test_runtime_keeps_unknown_fields_per_message_and_hides_them_from_the_old_accessor() -> None:
    pci = pb.PciAddress().SerializeToString() + tag(15, 0) + varint(1)
    raw = tag(3, 2) + varint(len(pci)) + pci
    parsed = pb.AssignVirtualFunctionRequest.FromString(raw)
    assert len(UnknownFieldSet(parsed)) == 0  # not visible at the top ...
    assert len(UnknownFieldSet(parsed.physical_function)) == 1  # ... only where it was sent
    try:
        parsed.UnknownFields()
    except NotImplementedError:
        pass  # upb: the accessor is gone; constraints.py uses UnknownFieldSet instead


def test_runtime_keeps_undeclared_enum_numbers_in_the_field() -> None:
    parsed = pb.StopInstanceRequest.FromString(tag(3, 0) + varint(9))
    assert parsed.mode == 9
    assert len(UnknownFieldSet(parsed)) == 0


def test_runtime_rejects_invalid_utf8_in_strings() -> None:
    with pytest.raises(DecodeError):
        pb.DescribeInstanceRequest.FromString(tag(1, 2) + varint(2) + b"\xff\xfe")
