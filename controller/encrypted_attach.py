"""Attaching encrypted volumes: envelope in, decrypted NBD socket out, key kept on the controller (claims C7, C8).

Theory of operation.  An AttachVolume request that carries an ``envelope``
goes through three steps, each with its own failure class:

1. :meth:`EncryptedAttach.admit`, during validation, before any audit intent
   or work: the envelope is parsed strictly and its binding checked against
   this host's fingerprint and the request's instance and volume ids.  A
   malformed envelope is INVALID_ARGUMENT; one wrapped for another host,
   instance or volume is PERMISSION_DENIED.  Nothing is decrypted yet.
2. :meth:`EncryptedAttach.attach`, once the intent is durable: the envelope
   is opened with the host's X25519 key into a bytearray (an envelope that
   does not authenticate is INVALID_ARGUMENT), the key is checked against
   the volume and the volume served decrypted by an encryption process on
   one end of a socketpair (``controller.volumes``; a key that does not
   unlock the volume is FAILED_PRECONDITION and nothing is left running),
   and the other end goes to the agent with ATTACH_VOLUME (source
   NBD_SOCKET, one descriptor by SCM_RIGHTS).  The agent gives it to QEMU.
   If the agent refuses, the encryption process is ended and the key wiped.
   If the outcome is unknown (the link broke or timed out), it is left to
   end by itself once nobody holds its client end (``UNKNOWN_OUTCOME``).  A
   retry that finds the volume still served for the same instance asks the
   agent (DESCRIBE_INSTANCE): if the agent has it, the answer is
   ALREADY_EXISTS, like any repeated attach; if not (the agent died before
   attaching it, and its recovery unplugged it), the old server is ended
   and the volume served anew.
3. :meth:`EncryptedAttach.detached` and :meth:`instance_stopped`, after the
   agent confirmed a detach or a stop: the encryption process ends and the
   key is wiped.  (An encryption process whose client went away on its own,
   because the guest stopped, is reaped by ``controller.volumes``.)

Where the plaintext key lives: in the bytearray ``open_envelope`` returns,
handed to ``EncryptedVolumes.serve`` which keeps it for the attachment's life,
and in the encryption process.  It never reaches the agent channel (only a
descriptor travels), the audit log (the envelope field is ``sensitive`` in the
.proto and redacted), the idempotency store (which keeps a hash of the
parameters and the response), metrics, logs or error messages.

One encrypted attach runs at a time (a lock), so the check that a volume is
not already served and the start of its server cannot interleave with
another attach of the same volume: two writers on one LUKS file would
corrupt it.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable

from hostagent.wire import messages as m

from . import envelope as env
from .app import Code, ControllerError, Violation
from .identity import HostIdentity
from .volumes import EncryptedVolumes, VolumeErrorReason, VolumeServerError

# The envelope's failure kinds, as the API reports them (docs/envelope-format.md).
ENVELOPE_CODES: dict[env.EnvelopeErrorKind, Code] = {
    env.EnvelopeErrorKind.MALFORMED: Code.INVALID_ARGUMENT,
    env.EnvelopeErrorKind.DOES_NOT_OPEN: Code.INVALID_ARGUMENT,
    env.EnvelopeErrorKind.WRONG_HOST: Code.PERMISSION_DENIED,
    env.EnvelopeErrorKind.WRONG_INSTANCE: Code.PERMISSION_DENIED,
    env.EnvelopeErrorKind.WRONG_VOLUME: Code.PERMISSION_DENIED,
}

AgentRequest = Callable[[m.Message, float, tuple[int, ...]], m.Message]

# The agent link broke or timed out after the socket may have left: the agent may have attached the volume
# (and its VMM hold the socket) or not.  The encryption process is then left to end by itself: it sees
# end-of-file as soon as no process holds the other end of its socket, which is at once if the agent never
# attached it, and only when the volume is detached if it did.  Ending it here would cut the disk of a
# guest whose attach did happen (found by tests/faults: agent killed after journaling the attach).
UNKNOWN_OUTCOME = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})


def _envelope_error(exc: env.EnvelopeError) -> ControllerError:
    code = ENVELOPE_CODES[exc.kind]
    violations = (Violation("envelope", exc.detail),) if code is Code.INVALID_ARGUMENT else ()
    return ControllerError(code, f"envelope refused: {exc.detail}", violations)


def _server_error(exc: VolumeServerError) -> ControllerError:
    reason = exc.reason
    if reason is VolumeErrorReason.KEY_REJECTED:
        return ControllerError(Code.FAILED_PRECONDITION, "the data key does not unlock the volume")
    if reason is VolumeErrorReason.VOLUME_NOT_FOUND:
        return ControllerError(Code.NOT_FOUND, f"encrypted volume not found: {exc.detail}")
    if reason is VolumeErrorReason.VOLUME_UNUSABLE:
        return ControllerError(Code.FAILED_PRECONDITION, f"the volume cannot be served: {exc.detail}")
    return ControllerError(Code.INTERNAL, f"the encryption server failed: {exc.detail}")


class EncryptedAttach:
    def __init__(self, identity: HostIdentity, volumes: EncryptedVolumes) -> None:
        self._identity = identity
        self._fingerprint = bytes.fromhex(identity.fingerprint)
        self._volumes = volumes
        self._lock = threading.Lock()

    @property
    def volumes(self) -> EncryptedVolumes:
        return self._volumes

    def admit(self, data: bytes, instance_id: uuid.UUID, volume_id: uuid.UUID) -> env.Envelope:
        """Parse the envelope and check what it is bound to; decrypts nothing."""
        try:
            envelope = env.parse(data)
            env.check_binding(envelope, self._fingerprint, instance_id, volume_id)
        except env.EnvelopeError as exc:
            raise _envelope_error(exc) from None
        return envelope

    def attach(self, envelope: env.Envelope, command: m.AttachVolume, request: AgentRequest,
               timeout: float) -> m.Message:
        """Open, serve, hand the socket to the agent; undo everything if any step fails."""
        with self._lock:
            for served in self._volumes.attachments():
                if served.volume_id != command.volume_id:
                    continue
                if served.instance_id != command.instance_id or self._agent_has(command, request, timeout):
                    raise ControllerError(Code.ALREADY_EXISTS, "the volume is already attached")
                # Left serving by an attach whose outcome was unknown, and the agent does not have it: the
                # agent died before attaching it (and its recovery undid the plug).  End it, serve anew.
                try:
                    self._volumes.release(served.instance_id, served.volume_id)
                except VolumeServerError as exc:
                    raise _server_error(exc) from None
            try:
                key = env.open_envelope(envelope, self._identity.exchange, self._identity.public_bytes)
            except env.EnvelopeError as exc:
                raise _envelope_error(exc) from None
            try:
                attachment, agent_end = self._volumes.serve(command.instance_id, command.volume_id, key)
            except VolumeServerError as exc:
                env.wipe(key)
                raise _server_error(exc) from None
            try:
                answer = request(command, timeout, (agent_end,))
            except ControllerError as exc:
                if exc.code not in UNKNOWN_OUTCOME:
                    self._volumes.release(attachment.instance_id, attachment.volume_id)
                raise
            except BaseException:
                self._volumes.release(attachment.instance_id, attachment.volume_id)
                raise
            finally:
                os.close(agent_end)
            return answer

    @staticmethod
    def _agent_has(command: m.AttachVolume, request: AgentRequest, timeout: float) -> bool:
        """Whether the agent lists the volume on the instance (UNAVAILABLE and the like propagate)."""
        try:
            info = request(m.DescribeInstance(command.instance_id), timeout, ())
        except ControllerError as exc:
            if exc.agent_code is None:
                raise  # no answer: the client retries later
            return False  # the agent answered (UNKNOWN_INSTANCE...): it does not have the volume
        return isinstance(info, m.InstanceInfo) and command.volume_id in info.volumes

    def detached(self, instance_id: uuid.UUID, volume_id: uuid.UUID) -> None:
        """The agent confirmed the volume is not attached: end its server (if it is encrypted), wipe the key."""
        self._volumes.release(instance_id, volume_id)

    def instance_stopped(self, instance_id: uuid.UUID) -> None:
        self._volumes.release_instance(instance_id)
