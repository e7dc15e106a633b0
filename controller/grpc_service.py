"""The gRPC adapter of the controller: mTLS in, audited, authorized commands out (claims C2, C3, C5, C11, C16).

Theory of operation.  One generic handler serves every method of
``passivisor.v1.HostController`` (plus the standard health check).  It
receives the *raw* request bytes, so nothing reaches protobuf before the
caller is known, and every attempt, whatever its fate, is audited.  The
order of checks for each call, denying by default at every step:

1. authentication: exactly one URI SAN on a TLS 1.3 client certificate
   (``controller.pki.principal_of``), else UNAUTHENTICATED;
2. authorization of the method (``controller.policy``), else PERMISSION_DENIED;
   a method without a policy entry is denied because the policy has no entry;
3. parsing and validation against the constraints declared in the .proto
   (``controller.api.constraints``), then conversion into a typed agent
   command (this module, ``_command``): INVALID_ARGUMENT with field violations;
4. authorization of the limits (vCPUs, memory, instance-id prefixes);
5. rate limits per principal and per instance: RESOURCE_EXHAUSTED with a retry hint;
6. idempotency of mutating calls by client token (replay, refusal of reuse);
7. audit: a mutating call's intent is durable before it runs and its
   outcome is recorded after; a read-only call or a refusal is recorded once,
   and every answer waits until its records are durable (group commit);
8. execution through the one agent connection, with the caller's deadline;
   an encrypted volume's envelope is admitted in step 3 and opened in step 8
   (``controller/encrypted_attach.py``).

Domain errors become gRPC status codes here and only here (``_abort``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from hostagent.wire import messages as m

from . import policy as pol
from .api.constraints import validate
from .api.gen.passivisor.v1 import controller_pb2 as pb
from .api.rpc_status import STATUS_DETAILS_KEY, encode_status
from .app import AgentConnection, Code, ControllerError, Violation
from .audit import AuditLog, CallRecord, Decision, Outcome, audit_method, audit_principal, redact
from .encrypted_attach import EncryptedAttach
from .envelope import Envelope
from .idempotency import IdempotencyStore, InProgress, New, Replay, TokenReused, request_fingerprint
from .pki import principal_of
from .ratelimit import RateLimited, RateLimiter
from .telemetry import Telemetry

log = logging.getLogger("passivisor.controller")

SERVICE = "passivisor.v1.HostController"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}
DEFAULT_PAGE_SIZE = 64  # ListInstancesRequest.page_size when absent: one agent page
MAX_VIOLATIONS_SHOWN = 20  # field violations sent back with INVALID_ARGUMENT; the rest are counted

REQUESTS: dict[pol.Method, type[Any]] = {
    pol.Method.START_INSTANCE: pb.StartInstanceRequest,
    pol.Method.STOP_INSTANCE: pb.StopInstanceRequest,
    pol.Method.ATTACH_VOLUME: pb.AttachVolumeRequest,
    pol.Method.DETACH_VOLUME: pb.DetachVolumeRequest,
    pol.Method.ASSIGN_VIRTUAL_FUNCTION: pb.AssignVirtualFunctionRequest,
    pol.Method.RELEASE_VIRTUAL_FUNCTION: pb.ReleaseVirtualFunctionRequest,
    pol.Method.DESCRIBE_INSTANCE: pb.DescribeInstanceRequest,
    pol.Method.LIST_INSTANCES: pb.ListInstancesRequest,
    pol.Method.GET_HOST_IDENTITY: pb.GetHostIdentityRequest,
    pol.Method.READ_AUDIT_LOG: pb.ReadAuditLogRequest,
    pol.Method.GET_METRICS: pb.GetMetricsRequest,
    pol.Method.POLL_EVENTS: pb.PollEventsRequest,
}

_DECISION_OF = {
    Code.UNAUTHENTICATED: Decision.DENIED,
    Code.PERMISSION_DENIED: Decision.DENIED,
    Code.INVALID_ARGUMENT: Decision.INVALID,
    Code.RESOURCE_EXHAUSTED: Decision.RATE_LIMITED,
}


@dataclass(frozen=True)
class HostKeys:
    """What GetHostIdentity publishes: public keys only."""

    public_key: bytes  # X25519, for wrapping volume keys
    fingerprint: bytes  # SHA-256 of public_key
    signing_public_key: bytes  # Ed25519, for audit checkpoints


def _uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)  # the pattern constraint already made it canonical


def _pci(address: Any) -> m.PciAddress:
    return m.PciAddress(address.domain, address.bus, address.device, address.function)


def _pb_pci(address: m.PciAddress) -> Any:
    return pb.PciAddress(domain=address.domain, bus=address.bus, device=address.device, function=address.function)


def _instance(info: m.InstanceInfo) -> Any:
    return pb.InstanceInfo(instance_id=str(info.instance_id), state=int(info.state),  # type: ignore[arg-type]  # same numbers as the agent
                           vcpus=info.vcpus,
                           memory_mib=info.memory_mib, image_digest=info.image_digest,
                           host_cpus=list(info.host_cpus), volume_ids=[str(v) for v in info.volumes],
                           virtual_functions=[_pb_pci(vf) for vf in info.vfs])


def _command(method: pol.Method, request: Any) -> tuple[m.Message | None, pol.RequestFacts, dict[str, Any]]:
    """The one place a validated request becomes a typed agent command, its policy facts and its parameters.

    Checks the proto cannot express are made here (unicast MAC), with the
    same rules as the agent's codec, so an invalid command never leaves the
    controller.  Returns (command or None for controller-local methods, facts,
    canonical parameters for idempotency and audit).
    """
    M = pol.Method
    cmd: m.Message | None
    if method is M.START_INSTANCE:
        iid = _uuid(request.instance_id)
        cmd = m.StartInstance(iid, request.vcpus, request.memory_mib, request.image_digest,
                                         request.image_signature)
        facts = pol.RequestFacts(instance_id=iid, vcpus=request.vcpus, memory_mib=request.memory_mib)
        params = {"instance_id": iid, "vcpus": request.vcpus, "memory_mib": request.memory_mib,
                  "image_digest": request.image_digest, "image_signature": request.image_signature}
    elif method is M.STOP_INSTANCE:
        iid = _uuid(request.instance_id)
        cmd = m.StopInstance(iid, m.StopMode(request.mode), request.timeout_seconds)
        facts = pol.RequestFacts(instance_id=iid)
        params = {"instance_id": iid, "mode": request.mode, "timeout_seconds": request.timeout_seconds}
    elif method is M.ATTACH_VOLUME:
        iid, vid = _uuid(request.instance_id), _uuid(request.volume_id)
        # An envelope makes the volume an encrypted one, served by the controller over an NBD socket
        # (controller/encrypted_attach.py); its binding is checked by the handler, which holds the host key.
        source = m.VolumeSource.NBD_SOCKET if request.envelope else m.VolumeSource.FILE
        cmd = m.AttachVolume(iid, vid, source, request.read_only)
        facts = pol.RequestFacts(instance_id=iid)
        params = {"instance_id": iid, "volume_id": vid, "read_only": request.read_only,
                  "envelope": request.envelope}
    elif method is M.DETACH_VOLUME:
        iid, vid = _uuid(request.instance_id), _uuid(request.volume_id)
        cmd = m.DetachVolume(iid, vid)
        facts = pol.RequestFacts(instance_id=iid)
        params = {"instance_id": iid, "volume_id": vid}
    elif method is M.ASSIGN_VIRTUAL_FUNCTION:
        iid = _uuid(request.instance_id)
        mac = bytes(request.mac)
        if mac == bytes(6) or mac[0] & 1:
            raise ControllerError(Code.INVALID_ARGUMENT, "invalid MAC address",
                                  (Violation("mac", "must be unicast and not all zero"),))
        pf = _pci(request.physical_function)
        cmd = m.AssignVf(iid, pf, mac, request.vlan)
        facts = pol.RequestFacts(instance_id=iid)
        params = {"instance_id": iid, "pf": str(pf), "mac": mac.hex(), "vlan": request.vlan}
    elif method is M.RELEASE_VIRTUAL_FUNCTION:
        iid = _uuid(request.instance_id)
        vf = _pci(request.virtual_function)
        cmd = m.ReleaseVf(iid, vf)
        facts = pol.RequestFacts(instance_id=iid)
        params = {"instance_id": iid, "vf": str(vf)}
    elif method is M.DESCRIBE_INSTANCE:
        iid = _uuid(request.instance_id)
        cmd, facts, params = m.DescribeInstance(iid), pol.RequestFacts(instance_id=iid), {"instance_id": iid}
    elif method is M.LIST_INSTANCES:
        # The page token is the canonical id of the last instance of the previous page (its pattern
        # constraint made it canonical and not nil); the agent lists from after it (LIST_INSTANCES).
        after = _uuid(request.page_token) if request.page_token else None
        cmd, facts = m.ListInstances(after), pol.NO_FACTS
        params = {"page_size": request.page_size or DEFAULT_PAGE_SIZE, "page_token": request.page_token}
    elif method is M.POLL_EVENTS:
        cmd = m.GetEvents(request.after_cursor, request.max_events)
        facts, params = pol.NO_FACTS, {"after_cursor": request.after_cursor, "max_events": request.max_events}
    elif method is M.READ_AUDIT_LOG:
        cmd, facts = None, pol.NO_FACTS
        params = {"from_sequence": request.from_sequence, "max_records": request.max_records}
    else:  # GetHostIdentity, GetMetrics: answered by the controller itself
        cmd, facts, params = None, pol.NO_FACTS, {}
    return cmd, facts, params


class CallContext(Protocol):
    """What the pipeline uses of a call's context (a subset of ``grpc.ServicerContext``)."""

    def auth_context(self) -> Mapping[str, Sequence[bytes]]: ...
    def time_remaining(self) -> float | None: ...
    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None: ...
    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn: ...


class _Aborted(Exception):
    """Raised by :meth:`_PoolContext.abort` in a worker; the call is ended with this status on the event loop."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _PoolContext:
    """A call's context as the synchronous pipeline sees it, in a worker thread of the server's pool.

    Reading the auth context and the deadline and setting trailing metadata are
    plain reads and writes of the call's state; ending the call (``abort``) is
    left to the event loop, which owns the call.
    """

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._context.auth_context()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()  # type: ignore[no-any-return]

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._context.set_trailing_metadata(metadata)

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


def unary_on_pool(path: str, pipeline: Callable[[bytes, CallContext], bytes]) -> grpc.RpcMethodHandler:
    """A unary method whose request is received on the event loop and handled by ``pipeline`` in the pool.

    The method is registered as client-streaming so that this coroutine, not
    grpc, reads the request: grpc.aio's own unary path drops a call whose
    client half-closes without a message and leaves the client waiting for an
    answer that never comes; here it gets UNIMPLEMENTED, as from the
    synchronous server.  On the wire a unary call and a client-streaming call
    are the same; like grpc's unary path this reads exactly one message.
    While the request has not fully arrived, the call holds no thread (D3).
    """
    async def handle(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f'"{path}" requires exactly one request message.')
        try:
            # None: the loop's default executor, which Server makes its worker pool.
            return await asyncio.get_running_loop().run_in_executor(None, pipeline, raw, _PoolContext(context))
        except _Aborted as aborted:
            await context.abort(aborted.code, aborted.details)
            raise AssertionError("grpc's abort returned") from None  # it raises; this line is never reached

    return grpc.stream_unary_rpc_method_handler(handle)


class HostControllerHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, *, agent: AgentConnection, policy: pol.Policy, limiter: RateLimiter,
                 tokens: IdempotencyStore, audit: AuditLog, keys: HostKeys, telemetry: Telemetry,
                 encrypted: EncryptedAttach | None = None, default_timeout_s: float = 60.0) -> None:
        self.agent = agent
        self.encrypted = encrypted  # None: this controller serves no encrypted volumes
        self.policy = policy
        self.limiter = limiter
        self.tokens = tokens
        self.audit = audit
        self.keys = keys
        self.telemetry = telemetry
        self.default_timeout_s = default_timeout_s

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        if path == HEALTH_CHECK:
            return unary_on_pool(path, self._health)
        method = pol.Method.from_path(path)
        if method is None:
            return None  # UNIMPLEMENTED: not a method of this service
        return unary_on_pool(path, functools.partial(self._call, method))

    # --- the pipeline ----------------------------------------------------------------

    def _health(self, raw: bytes, context: CallContext) -> bytes:
        if principal_of(context.auth_context()) is None:
            self._record(None, "Health/Check", {}, Decision.DENIED, Outcome.UNAUTHENTICATED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate with one URI SAN is required")
        return _SERVING

    def _call(self, method: pol.Method, raw: bytes, context: CallContext) -> bytes:
        started = time.perf_counter()
        principal = principal_of(context.auth_context())
        params: dict[str, Any] = {}
        code: Code | None = None
        try:
            response = self._checked_call(method, raw, context, principal, params)
            return bytes(response.SerializeToString())
        except ControllerError as exc:
            code = exc.code
            self._abort(context, exc)
        finally:
            self.telemetry.observe(method.value, code.value if code else "OK", time.perf_counter() - started)

    def _checked_call(self, method: pol.Method, raw: bytes, context: CallContext,
                      principal: str | None, params: dict[str, Any]) -> Any:
        name = method.value
        if principal is None:
            self._refuse(None, name, {}, ControllerError(Code.UNAUTHENTICATED,
                                                         "a client certificate with one URI SAN over TLS 1.3 "
                                                         "is required"))
        assert principal is not None
        decision = self.policy.authorize_method(principal, method)
        if not decision.allowed:
            self.telemetry.denied(name)
            self._refuse(principal, name, {}, ControllerError(Code.PERMISSION_DENIED, decision.detail))
        try:
            request = REQUESTS[method].FromString(raw)
        except DecodeError:
            self._refuse(principal, name, {"request_bytes": str(len(raw))},
                         ControllerError(Code.INVALID_ARGUMENT, "the request is not a valid protobuf message"))
        violations = validate(request, encoded_size=len(raw))
        if violations:
            self._refuse(principal, name, {"request_bytes": str(len(raw))}, ControllerError(
                Code.INVALID_ARGUMENT, "the request breaks its declared constraints",
                tuple(Violation(v.field or "(request)", v.description) for v in violations)))
        try:
            command, facts, params_ = _command(method, request)
        except ControllerError as exc:
            self._refuse(principal, name, {}, exc)
        params.update(params_)
        summary = redact(params)
        envelope = None
        if isinstance(command, m.AttachVolume) and command.source is m.VolumeSource.NBD_SOCKET:
            try:
                envelope = self._admit_envelope(request.envelope, command)
            except ControllerError as exc:
                self._refuse(principal, name, summary, exc)
        decision = self.policy.authorize(principal, method, facts)
        if not decision.allowed:
            self.telemetry.denied(name)
            self._refuse(principal, name, summary, ControllerError(Code.PERMISSION_DENIED, decision.detail))
        mutating = pol.METHODS[method].mutating
        try:
            self.limiter.check(principal, facts.instance_id if mutating else None)
        except RateLimited as exc:
            self.telemetry.rate_limited(name)
            self._refuse(principal, name, summary, ControllerError(
                Code.RESOURCE_EXHAUSTED, f"rate limit of the {exc.bucket.name.lower()} reached",
                retry_after_ms=exc.retry_after_ms))
        timeout = context.time_remaining()
        timeout = self.default_timeout_s if timeout is None else timeout
        if timeout <= 0:
            # Authorized and valid, but too late to start: recorded as allowed, with the outcome it got.
            self._record(principal, name, summary, Decision.ALLOWED, Outcome.DEADLINE_EXCEEDED)
            raise ControllerError(Code.DEADLINE_EXCEEDED, "the deadline passed before the call started")
        if not mutating:
            try:
                response = self._execute(principal, method, request, command, timeout, None)
            except ControllerError as exc:
                self._record(principal, name, summary, Decision.ALLOWED, Outcome[exc.code.value])
                raise
            self._record(principal, name, summary, Decision.ALLOWED, Outcome.OK)
            return response
        return self._mutate(principal, method, request, command, params, summary, timeout, envelope)

    def _admit_envelope(self, data: bytes, command: m.AttachVolume) -> Envelope:
        if self.encrypted is None:
            raise ControllerError(Code.FAILED_PRECONDITION, "this controller serves no encrypted volumes",
                                  (Violation("envelope", "not accepted on this host"),))
        return self.encrypted.admit(data, command.instance_id, command.volume_id)

    def _mutate(self, principal: str, method: pol.Method, request: Any, command: m.Message | None,
                params: dict[str, Any], summary: dict[str, str], timeout: float, envelope: Envelope | None) -> Any:
        name = method.value
        token = request.client_token
        summary = {**summary, "client_token": token}
        try:
            outcome = self.tokens.begin(principal, name, token, request_fingerprint(name, params))
        except TokenReused:
            self._refuse(principal, name, summary, ControllerError(
                Code.INVALID_ARGUMENT, "client_token was already used with different parameters",
                (Violation("client_token", "reused with different parameters"),)))
        if isinstance(outcome, Replay):
            # The first execution's result, recorded again as what this retry received.
            if outcome.status_code == 0:
                self._record(principal, name, summary, Decision.ALLOWED, Outcome.OK)
                return RESPONSES[method].FromString(outcome.response)
            code, detail = json.loads(outcome.response)
            self._record(principal, name, summary, Decision.ALLOWED, Outcome[code])
            raise ControllerError(Code[code], f"(replayed) {detail}")
        if isinstance(outcome, InProgress):
            self._refuse(principal, name, summary, ControllerError(
                Code.ABORTED, "the same request is still running; retry later", retry_after_ms=1000))
        assert isinstance(outcome, New)
        intent = self.audit.begin(audit_principal(principal), audit_method(name), summary)
        try:
            response = self._execute(principal, method, request, command, timeout, envelope)
        except ControllerError as exc:
            self.audit.finish(intent, Outcome[exc.code.value])
            if exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                self.tokens.abandon(outcome.key)  # unknown effect: the client retries with the same token
            else:
                self.tokens.complete(outcome.key, _status_number(exc.code),
                                     json.dumps([exc.code.value, exc.detail]).encode())
            raise
        self.audit.finish(intent, Outcome.OK)
        self.tokens.complete(outcome.key, 0, response.SerializeToString())
        return response

    # --- execution ---------------------------------------------------------------------

    def _execute(self, principal: str, method: pol.Method, request: Any, command: m.Message | None, timeout: float,
                 envelope: Envelope | None) -> Any:
        M = pol.Method
        if method is M.GET_HOST_IDENTITY:
            return pb.GetHostIdentityResponse(public_key=self.keys.public_key, fingerprint=self.keys.fingerprint,
                                              signing_public_key=self.keys.signing_public_key)
        if method is M.GET_METRICS:
            agent_metrics = None
            try:
                answer = self.agent.request(m.GetMetrics(), timeout=timeout, mutating=False)
                agent_metrics = answer if isinstance(answer, m.Metrics) else None
            except ControllerError:
                agent_metrics = None  # the link state metric says why
            return pb.GetMetricsResponse(text=self.telemetry.render(self.agent, agent_metrics),
                                         content_type=self.telemetry.content_type)
        if method is M.READ_AUDIT_LOG:
            return self._read_audit(request)
        assert command is not None
        if isinstance(command, m.ListInstances):
            return self._list_instances(principal, command, request.page_size or DEFAULT_PAGE_SIZE, timeout)
        mutating = pol.METHODS[method].mutating
        if envelope is not None:
            assert self.encrypted is not None and isinstance(command, m.AttachVolume)
            answer = self.encrypted.attach(envelope, command, lambda cmd, t, fds: self.agent.request(
                cmd, timeout=t, mutating=True, fds=fds), timeout)
        else:
            try:
                answer = self.agent.request(command, timeout=timeout, mutating=mutating)
            except ControllerError as exc:
                if isinstance(command, m.DetachVolume) and exc.agent_code is m.ErrorCode.VOLUME_NOT_ATTACHED:
                    self._volume_gone(command.instance_id, command.volume_id)
                raise
        if isinstance(command, m.DetachVolume):
            self._volume_gone(command.instance_id, command.volume_id)
        elif isinstance(command, m.StopInstance) and self.encrypted is not None:
            self.encrypted.instance_stopped(command.instance_id)
        if isinstance(answer, m.InstanceInfo):
            response_type = RESPONSES[method]
            return response_type(instance=_instance(answer))
        if isinstance(answer, m.VolumeStatus):
            return RESPONSES[method](instance_id=str(answer.instance_id), volume_id=str(answer.volume_id),
                                     state=int(answer.state))
        if isinstance(answer, m.VfStatus):
            return RESPONSES[method](instance_id=str(answer.instance_id), virtual_function=_pb_pci(answer.vf),
                                     vf_index=answer.vf_index, state=int(answer.state))
        if isinstance(answer, m.Events):
            return pb.PollEventsResponse(next_cursor=answer.next_cursor, events=[_event(e) for e in answer.events])
        raise ControllerError(Code.INTERNAL, f"unexpected answer {type(answer).__name__}")

    def _list_instances(self, principal: str, command: m.ListInstances, page_size: int, timeout: float) -> Any:
        """One ListInstances page of the instances in ``principal``'s scope, within one deadline.

        A principal limited to instance-id prefixes (``instance_id_prefixes`` in the policy) is shown only
        the instances in its scope: the others are skipped here, and ``next_page_token`` is always the id
        of an instance it was shown, so no id outside its scope leaves the controller.  Each agent page
        (LIST_INSTANCES) holds at most MAX_LISTED_INSTANCES instances and continues from the last instance
        the agent listed; the agent link already refused any page that does not start after its cursor,
        so the walk always moves forward, and a page costs at most one round trip per 64 instances on the
        host.  ``next_page_token`` is set when the page is full and more instances in scope were seen, or
        the agent has more to list (the next page may then be empty).
        """
        deadline = time.monotonic() + timeout
        taken: list[m.InstanceSummary] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControllerError(Code.DEADLINE_EXCEEDED, "the deadline passed while reading the instances")
            answer = self.agent.request(command, timeout=remaining, mutating=False)
            if not isinstance(answer, m.InstanceList):
                raise ControllerError(Code.INTERNAL, f"unexpected answer {type(answer).__name__}")
            visible = [i for i in answer.instances if self.policy.instance_in_scope(principal, i.instance_id)]
            room = page_size - len(taken)
            taken.extend(visible[:room])
            if len(taken) == page_size and (len(visible) > room or answer.more):
                next_token = str(taken[-1].instance_id)
                break
            if not answer.more:
                next_token = ""
                break
            command = m.ListInstances(answer.instances[-1].instance_id)
        return pb.ListInstancesResponse(next_page_token=next_token, instances=[
            pb.InstanceSummary(instance_id=str(i.instance_id), state=int(i.state),  # type: ignore[arg-type]
                               vcpus=i.vcpus, memory_mib=i.memory_mib) for i in taken])

    def _volume_gone(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> None:
        """The agent says the volume is not attached (any more): end its encryption server, if any."""
        if self.encrypted is not None:
            self.encrypted.detached(instance_id, volume_id)

    def _read_audit(self, request: Any) -> Any:
        records = self.audit.read(request.from_sequence, request.max_records)
        out = []
        for record in records:
            encoded = record.encode()
            stamp = Timestamp()
            stamp.FromMilliseconds(record.time_ms)
            item = pb.AuditRecord(sequence=record.sequence, time=stamp, prev_hash=record.prev_hash,
                                  record_hash=record.hash, encoded=encoded)
            if isinstance(record, CallRecord):
                item.kind = pb.AuditRecordKind.Value(f"AUDIT_RECORD_KIND_{record.kind.name}")
                item.principal = record.principal
                item.method = record.method
                item.parameters.update(dict(record.params))
                item.decision = pb.AuditDecision.Value(f"AUDIT_DECISION_{record.decision.name}")
                item.outcome = "" if record.outcome is Outcome.PENDING else record.outcome.value
                item.refers_to = record.refers_to or 0
            else:  # a checkpoint signs the head before it (controller/audit/chain.py)
                item.kind = pb.AUDIT_RECORD_KIND_CHECKPOINT
                item.checkpoint.head_sequence = record.head_sequence
                item.checkpoint.head_hash = record.head_hash
                item.checkpoint.signature = record.signature
            out.append(item)
        next_sequence = records[-1].sequence + 1 if records else max(request.from_sequence, 1)
        return pb.ReadAuditLogResponse(records=out, next_sequence=next_sequence)

    # --- refusals, audit and status codes ----------------------------------------------

    def _refuse(self, principal: str | None, method: str, summary: dict[str, str], exc: ControllerError) -> NoReturn:
        """Audit a refused call (never with key material: ``summary`` is already redacted), then raise."""
        self._record(principal, method, summary, _DECISION_OF.get(exc.code, Decision.DENIED), Outcome[exc.code.value])
        raise exc

    def _record(self, principal: str | None, method: str, params: dict[str, str], decision: Decision,
                outcome: Outcome) -> None:
        """Append a read-only call or a refusal to the chain and wait until it is durable.

        The answer leaves only after its record is on disk, so a controller that
        dies at any moment has never answered a call the log does not show (C3).
        Concurrent callers share one fsync through the group commit, so a flood
        of reads or refusals costs one fsync per batch, not one per call.
        """
        self.audit.append(audit_principal(principal), audit_method(method), params, decision, outcome)

    @staticmethod
    def _abort(context: CallContext, exc: ControllerError) -> NoReturn:
        """The one mapping of a ControllerError to a gRPC status, with standard rich details.

        Field violations (google.rpc.BadRequest) and the retry hint
        (google.rpc.RetryInfo) travel in ``grpc-status-details-bin``; the hint
        is also sent as plain ``retry-after-ms`` for simple clients.
        """
        status = grpc.StatusCode[exc.code.value]
        violations = list(exc.violations[:MAX_VIOLATIONS_SHOWN])
        if len(exc.violations) > MAX_VIOLATIONS_SHOWN:
            # A request can break thousands of rules (one per unknown field); every shown violation costs
            # trailer bytes, and past a few KiB the client drops the whole answer.  The first ones and a count.
            violations.append(Violation("(request)", f"{len(exc.violations) - MAX_VIOLATIONS_SHOWN} more "
                                                     "violations not shown"))
        details = encode_status(status.value[0], exc.detail, [(v.field, v.description) for v in violations],
                                exc.retry_after_ms)
        metadata: list[tuple[str, str | bytes]] = [(STATUS_DETAILS_KEY, details)]
        if exc.retry_after_ms is not None:
            metadata.append(("retry-after-ms", str(exc.retry_after_ms)))
        context.set_trailing_metadata(tuple(metadata))
        text = exc.detail
        if violations:
            text += ": " + "; ".join(f"{v.field}: {v.description}" for v in violations)
        context.abort(status, text)
        raise AssertionError("grpc's abort returned")  # it raises; this line is never reached


RESPONSES: dict[pol.Method, type[Any]] = {
    pol.Method.START_INSTANCE: pb.StartInstanceResponse,
    pol.Method.STOP_INSTANCE: pb.StopInstanceResponse,
    pol.Method.ATTACH_VOLUME: pb.AttachVolumeResponse,
    pol.Method.DETACH_VOLUME: pb.DetachVolumeResponse,
    pol.Method.ASSIGN_VIRTUAL_FUNCTION: pb.AssignVirtualFunctionResponse,
    pol.Method.RELEASE_VIRTUAL_FUNCTION: pb.ReleaseVirtualFunctionResponse,
    pol.Method.DESCRIBE_INSTANCE: pb.DescribeInstanceResponse,
    pol.Method.LIST_INSTANCES: pb.ListInstancesResponse,
    pol.Method.GET_HOST_IDENTITY: pb.GetHostIdentityResponse,
    pol.Method.READ_AUDIT_LOG: pb.ReadAuditLogResponse,
    pol.Method.GET_METRICS: pb.GetMetricsResponse,
    pol.Method.POLL_EVENTS: pb.PollEventsResponse,
}

def _status_number(code: Code) -> int:
    return int(grpc.StatusCode[code.value].value[0])


def _event(event: m.Event) -> Any:
    stamp = Timestamp()
    stamp.FromMilliseconds(event.time_ms)
    return pb.Event(cursor=event.cursor, time=stamp, kind=int(event.kind),  # type: ignore[arg-type]
                    instance_id="" if event.instance_id is None else str(event.instance_id),
                    reason=int(event.reason))  # type: ignore[arg-type]


class Server:
    """The controller's gRPC server: grpc.aio on a private event loop thread, behind a blocking interface.

    Why asyncio (issue 6, defect D3): the synchronous ``grpc.server`` reads a
    unary request inside a worker thread, so a caller that sends a call's
    headers and never its message holds a worker until it gives up; as many
    such calls as workers stop the controller, and a client needs only some
    certificate of the CA to make them (authentication runs in the handler,
    once the message is there).  ``grpc.aio`` receives the message on its
    event loop, where a waiting call holds no thread, and only then runs the
    handler in the worker pool (``migration_thread_pool``: the handlers stay
    synchronous; their blocking work, the agent round trip and the audit
    fsync, needs a thread anyway).  The pool still bounds how many calls run
    at once, but only calls whose request has fully arrived can occupy it.

    The interface is the one ``controller.main`` and the benchmarks use:
    :meth:`start`, :meth:`stop` (returns an event set when the server has
    stopped) and :meth:`wait_for_termination`.
    """

    def __init__(self, handlers: list[grpc.GenericRpcHandler], options: list[tuple[str, Any]],
                 max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc-handler")
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._pool)  # where HostControllerHandler runs its pipeline
        self._thread = threading.Thread(target=self._run_loop, name="grpc-aio", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()

        async def create() -> grpc.aio.Server:  # grpc.aio binds a server to the loop running when it is made
            return grpc.aio.server(migration_thread_pool=self._pool, handlers=handlers, options=options)

        self._server = self._call(create())

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        async def add() -> int:
            return int(self._server.add_secure_port(address, credentials))
        return int(self._call(add()))

    def start(self) -> None:
        self._call(self._server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, let running ones finish for ``grace`` seconds, then cancel them and close down.

        Returns an event that is set once the server has stopped (it is, when this returns).
        """
        if not self._stopped.is_set():
            try:
                self._call(self._server.stop(grace))
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                self._loop.close()
                self._pool.shutdown(wait=True)
                self._stopped.set()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` seconds passed (False)."""
        return self._stopped.wait(timeout)


def build_server(handler: grpc.GenericRpcHandler, *, listen: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes,
                 max_workers: int = 16) -> tuple[Server, int]:
    """A server with one TLS port (client certificates required, no insecure port, no reflection)."""
    server = Server([handler], [("grpc.max_receive_message_length", 64 * 1024)], max_workers)
    credentials = grpc.ssl_server_credentials(((key_pem, cert_pem),), root_certificates=ca_pem,
                                              require_client_auth=True)
    try:
        port = server.add_secure_port(listen, credentials)
    except BaseException:
        server.stop(None)
        raise
    if port == 0:
        server.stop(None)
        raise RuntimeError(f"cannot listen on {listen}")
    return server, port
