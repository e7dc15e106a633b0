"""The field constraints of the gRPC contract: read from the descriptors, checked on requests.

Theory of operation.  The rules live in the .proto files as custom options
(``proto/passivisor/v1/constraints.proto`` states their meaning for every
language).  This module is their Python reading: ``rules_for`` compiles the
options of one message type once (patterns compiled, enum numbers collected)
and caches the result by full name (a memo: the rules never change, and two
threads compiling the same type at once store equal values), so checking a
request costs attribute reads and comparisons, never descriptor walks.
``validate`` applies the rules and returns every broken one as a
:class:`FieldViolation`; an empty list means the request may proceed.  The
controller's gRPC service is to call it before any work is done (claim C2) and
to answer a non-empty list with INVALID_ARGUMENT and these field violations.
``schema_problems`` checks the contract itself; a test holds every request
type of the service to it.

Pure: protobuf only, no grpc, no I/O.

Invariants:

- ``validate`` is total for every message type that ``schema_problems``
  passes: any value of it yields a list, never an exception.  A contract with
  a pattern that does not compile raises ``re.error`` at first use, so it can
  never accept silently.
- Absent fields are valid unless ``required``; rules apply to present values
  only (constraints.proto, "Semantics").
- Unknown fields are refused at every depth.  python-protobuf (upb) keeps
  them and stores them per message, so each nested message is asked in turn;
  ``Message.UnknownFields()`` raises NotImplementedError under upb, so this
  module uses ``google.protobuf.unknown_fields.UnknownFieldSet``.
- Proto3 enums are open: an undeclared number parses into the field itself
  (not into the unknown fields), so ``defined_only`` is checked explicitly.
- The parser silently truncates an over-long varint into a 32-bit field
  (2**32 + 4 arrives as 4) and lets a repeated scalar field overwrite the
  earlier one.  Neither is visible in the parsed message; both change the
  encoded size, so ``validate(..., encoded_size=len(raw))`` refuses a request
  whose encoding is not the canonical size of its content.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from .gen.passivisor.v1 import constraints_pb2

FieldConstraint = constraints_pb2.FieldConstraint
MessageConstraint = constraints_pb2.MessageConstraint

_INTEGER_TYPES = frozenset({
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
})


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One broken rule: where (a field path) and what (a rule name and a sentence).

    ``field`` is a dotted path of proto field names from the request
    (``physical_function.device``), with ``[i]`` for a repeated element and
    ``#N`` for an unknown field number N; it is empty for the request as a
    whole.  ``rule`` names the broken rule: a FieldConstraint field name, or
    ``unknown_field``, ``conditional_range`` or ``encoding``.
    """

    field: str
    rule: str
    description: str


@dataclass(frozen=True, slots=True)
class _FieldRule:
    name: str
    descriptor: FieldDescriptor
    constraint: Any  # FieldConstraint | None
    pattern: re.Pattern[str] | None
    enum_numbers: frozenset[int]
    is_map: bool


@dataclass(frozen=True, slots=True)
class _Conditional:
    when_field: str
    equals: int
    equals_name: str
    field: str
    min: int
    max: int


@dataclass(frozen=True, slots=True)
class MessageRules:
    """The compiled rules of one message type."""

    full_name: str
    fields: tuple[_FieldRule, ...]
    conditionals: tuple[_Conditional, ...]


_RULES: dict[str, MessageRules] = {}


def constraint_of(field: FieldDescriptor) -> Any:
    """The field's FieldConstraint option, or None when it carries none."""
    options = field.GetOptions()
    if not options.HasExtension(constraints_pb2.constraint):
        return None
    return options.Extensions[constraints_pb2.constraint]


def message_constraint_of(descriptor: Descriptor) -> Any:
    """The message's MessageConstraint option, or None when it carries none."""
    options = descriptor.GetOptions()
    if not options.HasExtension(constraints_pb2.message_constraint):
        return None
    return options.Extensions[constraints_pb2.message_constraint]


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def rules_for(descriptor: Descriptor) -> MessageRules:
    """Compile (once) and return the rules of a message type."""
    rules = _RULES.get(descriptor.full_name)
    if rules is not None:
        return rules
    fields = []
    for field in descriptor.fields:
        constraint = constraint_of(field)
        pattern = re.compile(constraint.pattern) if constraint is not None and constraint.pattern else None
        numbers = frozenset(v.number for v in field.enum_type.values) if field.enum_type is not None else frozenset()
        fields.append(_FieldRule(field.name, field, constraint, pattern, numbers, _is_map(field)))
    conditionals = []
    message_constraint = message_constraint_of(descriptor)
    for rule in message_constraint.conditional_ranges if message_constraint is not None else ():
        when = descriptor.fields_by_name.get(rule.when_field)
        value = when.enum_type.values_by_number.get(rule.equals) if when is not None and when.enum_type else None
        name = value.name if value is not None else str(rule.equals)
        conditionals.append(_Conditional(rule.when_field, rule.equals, name, rule.field, rule.min, rule.max))
    rules = MessageRules(descriptor.full_name, tuple(fields), tuple(conditionals))
    _RULES[descriptor.full_name] = rules
    return rules


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_absent(message: Message, rule: _FieldRule, value: Any) -> bool:
    field = rule.descriptor
    if field.is_repeated:
        return len(value) == 0
    if field.has_presence:
        return not message.HasField(rule.name)
    return not value  # implicit presence: the zero value is absence


def _check_value(rule: _FieldRule, value: Any, path: str, out: list[FieldViolation]) -> None:
    """Check one present singular value (a field, or one element of a repeated field)."""
    constraint = rule.constraint
    field = rule.descriptor
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        _validate(value, path, out)
        return
    if constraint is None:
        return
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        is_text = field.type == FieldDescriptor.TYPE_STRING
        # Length of a string is its UTF-8 encoding's, as in constraints.proto.
        size = len(value.encode("utf-8")) if is_text else len(value)
        unit = "UTF-8 bytes" if is_text else "bytes"
        if constraint.HasField("min_len") and size < constraint.min_len:
            out.append(FieldViolation(path, "min_len", f"must be at least {constraint.min_len} {unit}, got {size}"))
            return
        if constraint.HasField("max_len") and size > constraint.max_len:
            out.append(FieldViolation(path, "max_len", f"must be at most {constraint.max_len} {unit}, got {size}"))
            return  # a pattern never runs on an over-long value
        if rule.pattern is not None and rule.pattern.fullmatch(value) is None:
            out.append(FieldViolation(path, "pattern", f"must match {constraint.pattern}"))
    elif field.cpp_type in _INTEGER_TYPES:
        if constraint.HasField("min") and value < constraint.min:
            out.append(FieldViolation(path, "min", f"must be at least {constraint.min}, got {value}"))
        elif constraint.HasField("max") and value > constraint.max:
            out.append(FieldViolation(path, "max", f"must be at most {constraint.max}, got {value}"))
    elif field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        if constraint.defined_only and value not in rule.enum_numbers:
            out.append(FieldViolation(path, "defined_only", f"{value} is not a declared {field.enum_type.name} value"))


def _validate(message: Message, prefix: str, out: list[FieldViolation]) -> None:
    for unknown in UnknownFieldSet(message):
        out.append(FieldViolation(
            _join(prefix, f"#{unknown.field_number}"), "unknown_field",
            f"unknown field number {unknown.field_number} (wire type {unknown.wire_type})",
        ))
    rules = rules_for(message.DESCRIPTOR)
    broken: set[str] = set()
    for rule in rules.fields:
        value = getattr(message, rule.name)
        path = _join(prefix, rule.name)
        before = len(out)
        if _is_absent(message, rule, value):
            if rule.constraint is not None and rule.constraint.required:
                out.append(FieldViolation(path, "required", "is required"))
        elif rule.is_map:
            _check_items(rule, len(value), path, out)
            if rule.descriptor.message_type.fields_by_name["value"].cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for key in sorted(value):
                    _validate(value[key], f"{path}[{key!r}]", out)
        elif rule.descriptor.is_repeated:
            _check_items(rule, len(value), path, out)
            for index, item in enumerate(value):
                _check_value(rule, item, f"{path}[{index}]", out)
        else:
            _check_value(rule, value, path, out)
        if len(out) != before:
            broken.add(rule.name)
    for conditional in rules.conditionals:
        if conditional.field in broken or conditional.when_field in broken:
            continue  # already reported; one violation per field is enough
        if getattr(message, conditional.when_field) != conditional.equals:
            continue
        value = getattr(message, conditional.field)
        if not conditional.min <= value <= conditional.max:
            out.append(FieldViolation(
                _join(prefix, conditional.field), "conditional_range",
                f"must be in {conditional.min}..{conditional.max} when {conditional.when_field} is "
                f"{conditional.equals_name}, got {value}",
            ))


def _check_items(rule: _FieldRule, count: int, path: str, out: list[FieldViolation]) -> None:
    if rule.constraint is not None and rule.constraint.HasField("max_items") and count > rule.constraint.max_items:
        out.append(FieldViolation(path, "max_items", f"must have at most {rule.constraint.max_items} entries"))


def validate(message: Message, *, encoded_size: int | None = None) -> list[FieldViolation]:
    """Every rule ``message`` breaks, in field order; empty when it is valid.

    Pass ``encoded_size`` (the length of the bytes the message was parsed
    from) to also refuse a non-canonical encoding: over-long varints that
    were truncated into a 32-bit field, a field sent twice, padded varints,
    zero values written out.  Encoders of the official protobuf libraries
    never produce these.
    """
    out: list[FieldViolation] = []
    if encoded_size is not None and encoded_size != message.ByteSize():
        out.append(FieldViolation(
            "", "encoding",
            f"the request is {encoded_size} bytes but its content encodes canonically "
            f"in {message.ByteSize()}: a value was truncated, repeated or padded",
        ))
    _validate(message, "", out)
    return out


def sensitive(field: FieldDescriptor) -> bool:
    """Whether the field holds key material or another secret (never logged or audited)."""
    constraint = constraint_of(field)
    return constraint is not None and bool(constraint.sensitive)


def sensitive_fields(descriptor: Descriptor) -> frozenset[str]:
    """Dotted paths of the ``sensitive`` fields of a message type and the message types it contains.

    The audit log's redaction takes these (``controller.audit.redact(...,
    sensitive=...)``), so a field marked in the .proto never reaches a record
    (claims C7, C8).
    """
    return frozenset(_sensitive_paths(descriptor, "", frozenset()))


def _sensitive_paths(descriptor: Descriptor, prefix: str, seen: frozenset[str]) -> Iterator[str]:
    if descriptor.full_name in seen:
        return  # a recursive type: its paths were listed one level up
    for field in descriptor.fields:
        path = _join(prefix, field.name)
        if sensitive(field):
            yield path
        elif field.message_type is not None and not _is_map(field):
            yield from _sensitive_paths(field.message_type, path, seen | {descriptor.full_name})


def schema_problems(descriptor: Descriptor) -> list[str]:
    """Defects of the contract itself in a request type and the types it contains.

    Every field must carry a constraint whose rules fit its type; strings,
    bytes and repeated fields must be bounded (claim C4: bounded resources);
    enums must be closed with ``defined_only``; patterns must compile and be
    anchored; conditional ranges must name integer or enum fields that exist.
    """
    problems: list[str] = []
    _schema(descriptor, problems, set())
    return problems


def _schema(descriptor: Descriptor, problems: list[str], seen: set[str]) -> None:
    if descriptor.full_name in seen:
        return
    seen.add(descriptor.full_name)
    for field in descriptor.fields:
        name = field.full_name
        constraint = constraint_of(field)
        if constraint is None:
            problems.append(f"{name}: no (passivisor.v1.constraint) option")
            continue
        cpp = field.cpp_type
        is_text = field.type == FieldDescriptor.TYPE_STRING
        is_bytes = field.type == FieldDescriptor.TYPE_BYTES
        if constraint.pattern:
            if not is_text:
                problems.append(f"{name}: pattern on a non-string field")
            elif not (constraint.pattern.startswith("^") and constraint.pattern.endswith("$")):
                problems.append(f"{name}: pattern is not anchored with ^ and $")
            else:
                try:
                    re.compile(constraint.pattern)
                except re.error as error:
                    problems.append(f"{name}: pattern does not compile: {error}")
        if (constraint.HasField("min_len") or constraint.HasField("max_len")) and not (is_text or is_bytes):
            problems.append(f"{name}: min_len/max_len on a field that is neither string nor bytes")
        if (is_text or is_bytes) and not constraint.HasField("max_len"):
            problems.append(f"{name}: unbounded string or bytes (set max_len)")
        if (constraint.HasField("min") or constraint.HasField("max")) and cpp not in _INTEGER_TYPES:
            problems.append(f"{name}: min/max on a non-integer field")
        if constraint.HasField("min") and constraint.HasField("max") and constraint.min > constraint.max:
            problems.append(f"{name}: min > max")
        has_lengths = constraint.HasField("min_len") and constraint.HasField("max_len")
        if has_lengths and constraint.min_len > constraint.max_len:
            problems.append(f"{name}: min_len > max_len")
        if constraint.defined_only != (cpp == FieldDescriptor.CPPTYPE_ENUM):
            problems.append(f"{name}: defined_only must be set on enum fields and only there")
        if field.is_repeated != constraint.HasField("max_items"):
            problems.append(f"{name}: max_items must be set on repeated and map fields and only there")
        if constraint.required and cpp == FieldDescriptor.CPPTYPE_BOOL:
            problems.append(f"{name}: a required bool could never be false")
        if _is_map(field):
            # Map entries are synthesized and cannot carry options; their values can.
            value = field.message_type.fields_by_name["value"]
            if value.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                _schema(value.message_type, problems, seen)
        elif cpp == FieldDescriptor.CPPTYPE_MESSAGE:
            _schema(field.message_type, problems, seen)
    message_constraint = message_constraint_of(descriptor)
    for rule in message_constraint.conditional_ranges if message_constraint is not None else ():
        when = descriptor.fields_by_name.get(rule.when_field)
        target = descriptor.fields_by_name.get(rule.field)
        where = f"{descriptor.full_name}: conditional range on {rule.field!r}"
        if when is None or when.is_repeated or when.cpp_type not in _INTEGER_TYPES | {FieldDescriptor.CPPTYPE_ENUM}:
            problems.append(f"{where}: when_field {rule.when_field!r} is not a singular integer or enum field")
        elif when.enum_type is not None and when.enum_type.values_by_number.get(rule.equals) is None:
            problems.append(f"{where}: {rule.equals} is not a {when.enum_type.name} value")
        if target is None or target.is_repeated or target.cpp_type not in _INTEGER_TYPES:
            problems.append(f"{where}: not a singular integer field")
        if rule.min > rule.max:
            problems.append(f"{where}: min > max")
