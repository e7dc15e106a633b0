"""Least-privilege authorization of control-plane calls (claim C3).

Pure domain code: no grpc, no sockets, no asyncio.  The gRPC adapter extracts
the caller's principal (the URI SAN of its verified client certificate) and
the full method path, and asks this module.

Theory of operation.  A :class:`Policy` is reviewed data, read strictly from
TOML (``controller/default_policy.toml`` is the shipped one).  It maps each
principal, by exact string match, to the set of :class:`Method` s it may call
and to optional limits.  Everything else is denied:

- a principal that is not in the policy (or is not a well-formed SPIFFE ID)
  is denied with ``UNKNOWN_PRINCIPAL``;
- a method that is not granted to the principal, and any method path this
  module does not know (one added to the .proto later, a typo, the health
  service's ``Watch``), is denied with ``METHOD_NOT_ALLOWED``;
- a request that breaks one of the principal's limits is denied with
  ``LIMIT_EXCEEDED`` and names the :class:`Limit`.  A limit whose fact the
  request does not carry (a wiring bug) denies too: limits fail closed.

The one exception is the standard health check
(``/grpc.health.v1.Health/Check``, :data:`HEALTH_CHECK`): the issue makes it
available to every *authenticated* caller, so it is a constant of this module
rather than policy data, and it is granted to any well-formed principal, also
one that has no entry in the policy.  Authentication (a client certificate
from the control-plane CA) is the gate for it; the answer reveals only
SERVING or NOT_SERVING.  A policy file may not list it.

Authorization is two-phase so that nothing is parsed for a caller that may
not call the method at all: the handler wrapper calls
:meth:`Policy.authorize_method` before the request is decoded, the handler
calls :meth:`Policy.authorize` with the :class:`RequestFacts` of the validated
request.  ``authorize`` repeats the method check, so it alone is sufficient.

Invariants:
- ``authorize`` and ``authorize_method`` are total: any strings in, a
  :class:`Decision` out, never an exception;
- parsing either returns a complete policy or raises :class:`PolicyError`
  naming the offending key; nothing is guessed or normalised (principals are
  compared byte for byte, as the certificate carries them).
"""

from __future__ import annotations

import enum
import re
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

# The gRPC service of proto/passivisor/v1/controller.proto; method paths are "/<SERVICE>/<Method>".
SERVICE = "passivisor.v1.HostController"
# The standard health check (grpc/health/v1/health.proto), granted to every authenticated principal.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

POLICY_VERSION = 1
MAX_POLICY_BYTES = 1 << 20  # a policy is a few KiB; refuse to read more than this before parsing
MAX_PRINCIPALS = 1024
MAX_PREFIXES = 64
MAX_PRINCIPAL_LENGTH = 2048  # SPIFFE ID length limit (SPIFFE-ID spec, section 2.3)

# The bounds of hostagent/wire/messages.py (MIN_VCPUS..MAX_VCPUS, MIN_MEMORY_MIB..MAX_MEMORY_MIB): a limit
# outside them could never bind.  tests/controller/test_policy.py checks that the two stay equal.
VCPUS_RANGE = (1, 128)
MEMORY_MIB_RANGE = (64, 1 << 20)


class Method(enum.Enum):
    """The methods of the HostController service; the value is the name in the .proto and the policy."""

    START_INSTANCE = "StartInstance"
    STOP_INSTANCE = "StopInstance"
    ATTACH_VOLUME = "AttachVolume"
    DETACH_VOLUME = "DetachVolume"
    ASSIGN_VIRTUAL_FUNCTION = "AssignVirtualFunction"
    RELEASE_VIRTUAL_FUNCTION = "ReleaseVirtualFunction"
    DESCRIBE_INSTANCE = "DescribeInstance"
    LIST_INSTANCES = "ListInstances"
    GET_HOST_IDENTITY = "GetHostIdentity"
    READ_AUDIT_LOG = "ReadAuditLog"
    GET_METRICS = "GetMetrics"
    POLL_EVENTS = "PollEvents"

    @property
    def path(self) -> str:
        """The full method path, as gRPC gives it in ``HandlerCallDetails.method``."""
        return f"/{SERVICE}/{self.value}"

    @classmethod
    def from_path(cls, path: str) -> Method | None:
        return _BY_PATH.get(path)


_BY_PATH: Mapping[str, Method] = MappingProxyType({m.path: m for m in Method})
_BY_NAME: Mapping[str, Method] = MappingProxyType({m.value: m for m in Method})


class Fact(enum.Enum):
    """A request parameter that a limit can be checked against."""

    INSTANCE_ID = "instance_id"
    VCPUS = "vcpus"
    MEMORY_MIB = "memory_mib"


@dataclass(frozen=True)
class MethodInfo:
    """What the controller must know about a method: whether it changes the host (and so needs a
    client token, a durable audit record before it runs, and the per-instance rate limit) and which
    limit-relevant facts its request carries."""

    mutating: bool
    facts: frozenset[Fact]


_ID = frozenset({Fact.INSTANCE_ID})
_NONE: frozenset[Fact] = frozenset()

# The method table (a table, not an if chain).  tests/controller/test_policy.py checks every Method has a row.
METHODS: Mapping[Method, MethodInfo] = MappingProxyType({
    Method.START_INSTANCE: MethodInfo(True, frozenset({Fact.INSTANCE_ID, Fact.VCPUS, Fact.MEMORY_MIB})),
    Method.STOP_INSTANCE: MethodInfo(True, _ID),
    Method.ATTACH_VOLUME: MethodInfo(True, _ID),
    Method.DETACH_VOLUME: MethodInfo(True, _ID),
    Method.ASSIGN_VIRTUAL_FUNCTION: MethodInfo(True, _ID),
    Method.RELEASE_VIRTUAL_FUNCTION: MethodInfo(True, _ID),
    Method.DESCRIBE_INSTANCE: MethodInfo(False, _ID),
    # ListInstances carries no instance id: a principal limited to id prefixes is shown only the
    # instances in its scope (the service filters with Policy.instance_in_scope).
    Method.LIST_INSTANCES: MethodInfo(False, _NONE),
    Method.GET_HOST_IDENTITY: MethodInfo(False, _NONE),
    Method.READ_AUDIT_LOG: MethodInfo(False, _NONE),
    Method.GET_METRICS: MethodInfo(False, _NONE),
    Method.POLL_EVENTS: MethodInfo(False, _NONE),
})


class Limit(enum.Enum):
    """A per-principal limit; the value is its key in the policy file."""

    MAX_VCPUS = "max_vcpus"
    MAX_MEMORY_MIB = "max_memory_mib"
    INSTANCE_ID_PREFIXES = "instance_id_prefixes"


# Which fact each limit is checked against, and which methods it can affect (used to refuse, when
# parsing, a limit that no granted method could ever trigger: such a limit is a mistake, not a control).
_LIMIT_FACT: Mapping[Limit, Fact] = MappingProxyType({
    Limit.MAX_VCPUS: Fact.VCPUS,
    Limit.MAX_MEMORY_MIB: Fact.MEMORY_MIB,
    Limit.INSTANCE_ID_PREFIXES: Fact.INSTANCE_ID,
})


def _limit_applies_to(limit: Limit, method: Method) -> bool:
    if limit is Limit.INSTANCE_ID_PREFIXES and method is Method.LIST_INSTANCES:
        return True  # enforced by filtering the answer
    return _LIMIT_FACT[limit] in METHODS[method].facts


class DenyReason(enum.Enum):
    UNKNOWN_PRINCIPAL = "unknown_principal"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    LIMIT_EXCEEDED = "limit_exceeded"


@dataclass(frozen=True)
class Decision:
    """The answer to one authorization question.  ``reason`` is None exactly when allowed; ``limit``
    is set exactly when the reason is LIMIT_EXCEEDED.  ``detail`` is for the audit log."""

    allowed: bool
    reason: DenyReason | None = None
    limit: Limit | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.allowed != (self.reason is None):
            raise ValueError("a decision is allowed exactly when it has no deny reason")
        if (self.limit is not None) != (self.reason is DenyReason.LIMIT_EXCEEDED):
            raise ValueError("a limit is named exactly when the reason is LIMIT_EXCEEDED")


ALLOW = Decision(allowed=True)


def _deny(reason: DenyReason, detail: str, limit: Limit | None = None) -> Decision:
    return Decision(allowed=False, reason=reason, limit=limit, detail=detail)


class PermissionDenied(Exception):
    """Raised by :meth:`Policy.require`; carries the denying decision."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"{decision.reason.value if decision.reason else '?'}: {decision.detail}")
        self.decision = decision


@dataclass(frozen=True)
class RequestFacts:
    """The limit-relevant parameters of a validated request (None where the request has none)."""

    instance_id: uuid.UUID | None = None
    vcpus: int | None = None
    memory_mib: int | None = None


NO_FACTS = RequestFacts()


@dataclass(frozen=True)
class Grant:
    """One principal's entry in the policy."""

    principal: str
    methods: frozenset[Method]
    reason: str
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    instance_id_prefixes: tuple[str, ...] | None = None

    def instance_in_scope(self, instance_id: uuid.UUID) -> bool:
        if self.instance_id_prefixes is None:
            return True
        canonical = str(instance_id)  # lowercase, hyphenated: the form the prefixes are written in
        return any(canonical.startswith(prefix) for prefix in self.instance_id_prefixes)


class PolicyError(Exception):
    """The policy file is invalid.  ``key`` names the offending key (a dotted path)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Policy:
    """A parsed policy.  Build it with :func:`parse`, :func:`load` or :func:`load_default`."""

    grants: Mapping[str, Grant] = field(default_factory=lambda: MappingProxyType({}))

    def grant(self, principal: str) -> Grant | None:
        return self.grants.get(principal)

    def authorize_method(self, principal: str, method: str | Method) -> Decision:
        """May ``principal`` call ``method`` at all?  Limits are not checked (see :meth:`authorize`).

        ``method`` is a :class:`Method` or a full method path (``/passivisor.v1.HostController/X``).
        """
        decision, _ = self._method_decision(principal, method)
        return decision

    def authorize(self, principal: str, method: str | Method, facts: RequestFacts) -> Decision:
        """The full decision for one validated request, limits included."""
        decision, grant = self._method_decision(principal, method)
        if not decision.allowed or grant is None:
            return decision
        resolved = method if isinstance(method, Method) else Method.from_path(method)
        assert resolved is not None  # _method_decision denied every unknown path
        return _check_limits(grant, resolved, facts)

    def require(self, principal: str, method: str | Method, facts: RequestFacts) -> None:
        """:meth:`authorize`, raising :class:`PermissionDenied` instead of returning a denial."""
        decision = self.authorize(principal, method, facts)
        if not decision.allowed:
            raise PermissionDenied(decision)

    def instance_in_scope(self, principal: str, instance_id: uuid.UUID) -> bool:
        """Whether ``principal`` may see ``instance_id`` (for filtering ListInstances)."""
        grant = self.grants.get(principal)
        return grant is not None and grant.instance_in_scope(instance_id)

    def _method_decision(self, principal: str, method: str | Method) -> tuple[Decision, Grant | None]:
        if not isinstance(principal, str) or not is_principal(principal):
            return _deny(DenyReason.UNKNOWN_PRINCIPAL, "not a well-formed SPIFFE ID"), None
        if method == HEALTH_CHECK:
            return ALLOW, None
        grant = self.grants.get(principal)
        if grant is None:
            return _deny(DenyReason.UNKNOWN_PRINCIPAL, f"{principal} is not in the policy"), None
        resolved = method if isinstance(method, Method) else Method.from_path(method)
        if resolved is None:
            return _deny(DenyReason.METHOD_NOT_ALLOWED, f"unknown method {method!r:.200}"), None
        if resolved not in grant.methods:
            return _deny(DenyReason.METHOD_NOT_ALLOWED, f"{resolved.value} is not granted to {principal}"), None
        return ALLOW, grant


def _check_limits(grant: Grant, method: Method, facts: RequestFacts) -> Decision:
    carried = METHODS[method].facts
    if Fact.VCPUS in carried and grant.max_vcpus is not None:
        if facts.vcpus is None:
            return _deny(DenyReason.LIMIT_EXCEEDED, "the request carries no vcpus to check", Limit.MAX_VCPUS)
        if facts.vcpus > grant.max_vcpus:
            return _deny(DenyReason.LIMIT_EXCEEDED, f"{facts.vcpus} vCPUs > {grant.max_vcpus}", Limit.MAX_VCPUS)
    if Fact.MEMORY_MIB in carried and grant.max_memory_mib is not None:
        if facts.memory_mib is None:
            return _deny(DenyReason.LIMIT_EXCEEDED, "the request carries no memory_mib to check",
                         Limit.MAX_MEMORY_MIB)
        if facts.memory_mib > grant.max_memory_mib:
            return _deny(DenyReason.LIMIT_EXCEEDED, f"{facts.memory_mib} MiB > {grant.max_memory_mib} MiB",
                         Limit.MAX_MEMORY_MIB)
    if Fact.INSTANCE_ID in carried and grant.instance_id_prefixes is not None:
        if facts.instance_id is None:
            return _deny(DenyReason.LIMIT_EXCEEDED, "the request carries no instance id to check",
                         Limit.INSTANCE_ID_PREFIXES)
        if not grant.instance_in_scope(facts.instance_id):
            return _deny(DenyReason.LIMIT_EXCEEDED, f"instance {facts.instance_id} is outside the allowed prefixes",
                         Limit.INSTANCE_ID_PREFIXES)
    return ALLOW


# ---------------------------------------------------------------------------------------------------------
# Principals.  A SPIFFE ID (SPIFFE-ID spec, section 2): scheme "spiffe", a lowercase trust domain of
# [a-z0-9._-], then a path of one or more segments of [A-Za-z0-9._-], none "." or "..", no trailing slash,
# no query, fragment, port or user info.  A path is required: the principal is a workload, not a domain.
# ---------------------------------------------------------------------------------------------------------

_PRINCIPAL = re.compile(r"spiffe://[a-z0-9._-]{1,255}(?:/[A-Za-z0-9._-]+)+")


def is_principal(text: str) -> bool:
    if len(text) > MAX_PRINCIPAL_LENGTH or _PRINCIPAL.fullmatch(text) is None:
        return False
    return all(segment not in (".", "..") for segment in text[len("spiffe://"):].split("/")[1:])


# Instance-id prefixes are written against the canonical UUID text (RFC 9562 section 4: lowercase hex,
# hyphens after the 8th, 12th, 16th and 20th digit).  A prefix must be a prefix of some such string.
_CANONICAL_UUID_SHAPE = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX = frozenset("0123456789abcdef")


def _is_uuid_prefix(text: str) -> bool:
    if not 1 <= len(text) <= len(_CANONICAL_UUID_SHAPE):
        return False
    return all((c == "-") if s == "-" else (c in _HEX) for c, s in zip(text, _CANONICAL_UUID_SHAPE, strict=False))


# ---------------------------------------------------------------------------------------------------------
# Parsing.  Format (every key of an entry shown; the limits are optional):
#
#   version = 1
#
#   [[principal]]
#   uri = "spiffe://controlplane/instance-manager"     # exact match against the certificate's URI SAN
#   methods = ["StartInstance", "StopInstance"]        # names from Method; never the health check
#   reason = "why this role needs exactly these methods"
#   max_vcpus = 8                                      # StartInstance only
#   max_memory_mib = 16384                             # StartInstance only
#   instance_id_prefixes = ["6f1c", "0a2b3c4d-5e"]     # methods with an instance id, and ListInstances
# ---------------------------------------------------------------------------------------------------------

_TOP_KEYS = ("version", "principal")
_ENTRY_KEYS = ("uri", "methods", "reason", *(limit.value for limit in Limit))


def _entry_grant(index: int, entry: Any, seen: dict[str, int]) -> Grant:
    where = f"principal[{index}]"
    if not isinstance(entry, dict):
        raise PolicyError(where, "must be a table")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(_ENTRY_KEYS)})")
    for required in ("uri", "methods", "reason"):
        if required not in entry:
            raise PolicyError(f"{where}.{required}", "is required")

    uri = entry["uri"]
    if not isinstance(uri, str) or not is_principal(uri):
        raise PolicyError(f"{where}.uri", "must be a SPIFFE ID such as spiffe://controlplane/instance-manager")
    if uri in seen:
        raise PolicyError(f"{where}.uri", f"duplicate principal {uri} (also principal[{seen[uri]}])")
    seen[uri] = index
    where = f"principal[{index}] ({uri})"

    names = entry["methods"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise PolicyError(f"{where}.methods", "must be a non-empty list of method names")
    methods: set[Method] = set()
    for name in names:
        if name in (HEALTH_CHECK, HEALTH_CHECK.lstrip("/"), "Check"):
            raise PolicyError(f"{where}.methods", "the health check is granted to every authenticated principal; "
                                                  "do not list it")
        method = _BY_NAME.get(name)
        if method is None:
            raise PolicyError(f"{where}.methods", f"unknown method {name!r:.100} (known: "
                                                  f"{', '.join(m.value for m in Method)})")
        if method in methods:
            raise PolicyError(f"{where}.methods", f"{name} is listed twice")
        methods.add(method)

    reason = entry["reason"]
    if not isinstance(reason, str) or not reason.strip():
        raise PolicyError(f"{where}.reason", "must be a non-empty string saying why the role needs these methods")

    max_vcpus = _bounded_int(entry, Limit.MAX_VCPUS, VCPUS_RANGE, where)
    max_memory_mib = _bounded_int(entry, Limit.MAX_MEMORY_MIB, MEMORY_MIB_RANGE, where)
    prefixes = _prefixes(entry, where)
    for limit in Limit:
        if limit.value in entry and not any(_limit_applies_to(limit, m) for m in methods):
            raise PolicyError(f"{where}.{limit.value}", "has no effect: no method granted here carries it")
    return Grant(uri, frozenset(methods), reason, max_vcpus, max_memory_mib, prefixes)


def _bounded_int(entry: dict[str, Any], limit: Limit, bounds: tuple[int, int], where: str) -> int | None:
    if limit.value not in entry:
        return None
    value = entry[limit.value]
    lo, hi = bounds
    if type(value) is not int or not lo <= value <= hi:
        raise PolicyError(f"{where}.{limit.value}", f"must be an integer in [{lo}, {hi}]")
    return value


def _prefixes(entry: dict[str, Any], where: str) -> tuple[str, ...] | None:
    key = Limit.INSTANCE_ID_PREFIXES.value
    if key not in entry:
        return None
    value = entry[key]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PREFIXES:
        raise PolicyError(f"{where}.{key}", f"must be a list of 1 to {MAX_PREFIXES} prefixes "
                                            "(omit the key for no restriction)")
    for prefix in value:
        if not isinstance(prefix, str) or not _is_uuid_prefix(prefix):
            raise PolicyError(f"{where}.{key}", f"{prefix!r:.60} is not a prefix of a canonical (lowercase, "
                                                "hyphenated) UUID")
    if len(set(value)) != len(value):
        raise PolicyError(f"{where}.{key}", "lists a prefix twice")
    return tuple(value)


def parse(text: str) -> Policy:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("<document>", f"not valid TOML: {exc}") from None
    unknown = sorted(set(document) - set(_TOP_KEYS))
    if unknown:
        raise PolicyError(unknown[0], f"unknown key (known: {', '.join(_TOP_KEYS)})")
    version = document.get("version")
    if type(version) is not int or version != POLICY_VERSION:
        raise PolicyError("version", f"must be {POLICY_VERSION}")
    entries = document.get("principal", [])
    if not isinstance(entries, list):
        raise PolicyError("principal", "must be an array of tables ([[principal]])")
    if len(entries) > MAX_PRINCIPALS:
        raise PolicyError("principal", f"more than {MAX_PRINCIPALS} entries")
    seen: dict[str, int] = {}
    grants = [_entry_grant(i, entry, seen) for i, entry in enumerate(entries)]
    return Policy(MappingProxyType({g.principal: g for g in grants}))


def load(path: Path) -> Policy:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError("<file>", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError("<file>", f"{path} is larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("<file>", f"{path} is not UTF-8") from None
    return parse(text)


DEFAULT_POLICY_RESOURCE = "default_policy.toml"


def load_default() -> Policy:
    """The shipped policy (``controller/default_policy.toml``)."""
    return parse(resources.files(__package__ or "controller").joinpath(DEFAULT_POLICY_RESOURCE).read_text("utf-8"))


def matrix(policy: Policy, principals: Iterable[str]) -> dict[str, frozenset[Method]]:
    """Which methods each of ``principals`` may call, as decided by ``authorize_method`` (for review)."""
    return {p: frozenset(m for m in Method if policy.authorize_method(p, m).allowed) for p in principals}
