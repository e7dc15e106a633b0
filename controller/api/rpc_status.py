"""google.rpc.Status with BadRequest and RetryInfo details, shared by the controller and pvctl.

Wire-compatible copies of the three standard messages live in a private
descriptor pool, so neither side depends on googleapis-common-protos or
grpcio-status (and nothing clashes with them in the default pool when they
are installed).  The server puts an encoded Status in the standard
``grpc-status-details-bin`` trailing metadata; any gRPC client that reads
rich error details understands it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

STATUS_DETAILS_KEY = "grpc-status-details-bin"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


def _rpc_message_classes() -> dict[str, type[Message]]:
    file = descriptor_pb2.FileDescriptorProto(name="passivisor/api/google_rpc_copy.proto",
                                              package="passivisor.api.rpc", syntax="proto3")
    label_optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    label_repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    kinds = {
        "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
        "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    }

    def add(container: Any, name: str, *fields: tuple[str, int, str, bool]) -> Any:
        message = container.add(name=name)
        for field_name, number, kind, repeated in fields:
            entry = message.field.add(name=field_name, number=number,
                                      label=label_repeated if repeated else label_optional)
            if kind in kinds:
                entry.type = kinds[kind]
            else:
                entry.type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
                entry.type_name = f".passivisor.api.rpc.{kind}"
        return message

    add(file.message_type, "Any", ("type_url", 1, "string", False), ("value", 2, "bytes", False))
    add(file.message_type, "Status", ("code", 1, "int32", False), ("message", 2, "string", False),
        ("details", 3, "Any", True))
    bad_request = add(file.message_type, "BadRequest", ("field_violations", 1, "BadRequest.FieldViolation", True))
    add(bad_request.nested_type, "FieldViolation", ("field", 1, "string", False), ("description", 2, "string", False))
    add(file.message_type, "Duration", ("seconds", 1, "int64", False), ("nanos", 2, "int32", False))
    add(file.message_type, "RetryInfo", ("retry_delay", 1, "Duration", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"passivisor.api.rpc.{name}"))
            for name in ("Status", "BadRequest", "RetryInfo")}


RPC = _rpc_message_classes()




def encode_status(code: int, message: str, violations: Sequence[tuple[str, str]] = (),
                  retry_after_ms: int | None = None) -> bytes:
    """A google.rpc.Status for ``grpc-status-details-bin``: ``code`` must be the call's status code number."""
    status = RPC["Status"](code=code, message=message)
    if violations:
        bad = RPC["BadRequest"]()
        for field, description in violations:
            bad.field_violations.add(field=field, description=description)
        status.details.add(type_url=BAD_REQUEST_TYPE, value=bad.SerializeToString())
    if retry_after_ms is not None:
        retry = RPC["RetryInfo"]()
        retry.retry_delay.seconds, millis = divmod(retry_after_ms, 1000)
        retry.retry_delay.nanos = millis * 1_000_000
        status.details.add(type_url=RETRY_INFO_TYPE, value=retry.SerializeToString())
    return bytes(status.SerializeToString())


def decode_status(raw: bytes, code: int) -> tuple[list[tuple[str, str]], float | None]:
    """Field violations and retry delay (seconds) from an encoded Status; details of another code are ignored."""
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    try:
        status = RPC["Status"].FromString(raw)
        if status.code != code:  # as grpcio-status's from_call: a disagreeing status is not trusted
            return [], None
        for detail in status.details:
            if detail.type_url == BAD_REQUEST_TYPE:
                bad = RPC["BadRequest"].FromString(detail.value)
                violations += [(str(v.field), str(v.description)) for v in bad.field_violations]
            elif detail.type_url == RETRY_INFO_TYPE:
                delay = RPC["RetryInfo"].FromString(detail.value).retry_delay
                seconds = delay.seconds + delay.nanos / 1e9
                retry_after = seconds if seconds >= 0 else None
    except DecodeError:
        return [], None
    return violations, retry_after
