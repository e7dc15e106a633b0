"""The grammar of the agent channel, as construct definitions.

This is the single source of truth for the layout, bounds and cross-field
rules of every frame; ``docgen.py`` renders it into docs/wire-format.md and a
test keeps the two equal.  ``MESSAGES`` is the closed table from message type
to payload schema: a type that is not in it is rejected, never defaulted.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct as c

from . import messages as m
from .errors import FrameErrorKind
from .fields import (
    Bool,
    BoundedList,
    Constant,
    FixedBytes,
    Mac,
    Record,
    StrictEnum,
    StrictFlags,
    UInt,
    Uuid,
    field,
)

HEADER = Record(
    m.Header,
    field("magic", Constant(m.MAGIC, FrameErrorKind.BAD_MAGIC), "identifies the protocol"),
    field("version", Constant(bytes([m.VERSION]), FrameErrorKind.BAD_VERSION), "protocol version"),
    field("type", StrictEnum(1, m.MessageType, FrameErrorKind.UNKNOWN_TYPE), "message type (table below)"),
    field("flags", StrictFlags(2, m.Flags), "MAC: a MAC trailer follows the payload"),
    field("seq", UInt(8), "sequence number; the channel requires it to increase by one per direction"),
    field("fd_count", UInt(1, 0, m.MAX_FDS, FrameErrorKind.FD_COUNT_MISMATCH),
          "descriptors sent with this frame (SCM_RIGHTS); must equal what the message requires"),
    field("reserved", Constant(b"\x00", FrameErrorKind.RESERVED_NONZERO), "reserved"),
    field("length", UInt(2, 0, m.MAX_PAYLOAD, FrameErrorKind.OVERSIZED), "payload length in bytes"),
)

PCI_ADDRESS = Record(
    m.PciAddress,
    field("domain", UInt(2), "PCI segment"),
    field("bus", UInt(1), "bus"),
    field("device", UInt(1, 0, 31), "device (slot)"),
    field("function", UInt(1, 0, 7), "function"),
)


def _instance_id() -> c.Construct:
    return field("instance_id", Uuid(), "instance identifier")


def _pci_key(address: m.PciAddress) -> tuple[int, int, int, int]:
    return (address.domain, address.bus, address.device, address.function)


def _uuid_key(value: Any) -> bytes:
    return bytes(value.bytes)


def _instance_info_cpus_match(info: m.InstanceInfo) -> bool:
    if info.state in (m.InstanceState.STOPPED, m.InstanceState.FAILED):
        return not info.host_cpus and not info.volumes and not info.vfs
    return len(info.host_cpus) == info.vcpus


def _events_cursor_covers(events: m.Events) -> bool:
    return not events.events or events.next_cursor >= events.events[-1].cursor


def _event_subject(event: m.Event) -> bool:
    return (event.instance_id is None) == (event.kind in m.HOST_EVENT_KINDS)


def _more_only_when_full(listing: m.InstanceList) -> bool:
    # A page that is not full is the last one, so `more` never makes the controller ask for an empty page
    # it could not tell from the end, and there is one encoding of "this is the end" per page size.
    return not listing.more or len(listing.instances) == m.MAX_LISTED_INSTANCES


def _stop_timeout(stop: m.StopInstance) -> bool:
    if stop.mode is m.StopMode.FORCE:
        return stop.timeout_s == 0
    return 1 <= stop.timeout_s <= m.MAX_STOP_TIMEOUT_S


EVENT = Record(
    m.Event,
    field("cursor", UInt(8, 1), "position in the agent's event queue"),
    field("time_ms", UInt(8), "Unix time in milliseconds when the agent recorded it"),
    field("kind", StrictEnum(1, m.EventKind), "what happened"),
    field("instance_id", Uuid(nullable=True), "the instance, or nil for host-level events"),
    field("reason", StrictEnum(1, m.EventReason), "why"),
    rules=[("instance_id is nil exactly for host-level kinds", _event_subject)],
)

INSTANCE_SUMMARY = Record(
    m.InstanceSummary,
    _instance_id(),
    field("state", StrictEnum(1, m.InstanceState), "lifecycle state"),
    field("vcpus", UInt(2, m.MIN_VCPUS, m.MAX_VCPUS), "vCPUs"),
    field("memory_mib", UInt(4, m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB), "memory in MiB"),
)

METRIC_SAMPLE = Record(
    m.MetricSample,
    field("metric", StrictEnum(1, m.MetricId), "which gauge or counter"),
    field("value", UInt(8), "its value"),
)


@dataclass(frozen=True)
class MessageSpec:
    """One row of the closed message table."""

    type: m.MessageType
    cls: builtins.type
    payload: Record
    direction: m.Direction
    authenticated: bool  # carries the MAC flag and trailer
    fd_count: Callable[[Any], int]

    def doc(self) -> str:
        return (self.cls.__doc__ or "").strip()


def _no_fds(_: Any) -> int:
    return 0


def _attach_fds(attach: m.AttachVolume) -> int:
    return 1 if attach.source is m.VolumeSource.NBD_SOCKET else 0


_TO_AGENT, _TO_CONTROLLER = m.Direction.TO_AGENT, m.Direction.TO_CONTROLLER


def _spec(type_: m.MessageType, payload: Record, direction: m.Direction, *,
          authenticated: bool = True, fd_count: Callable[[Any], int] = _no_fds) -> MessageSpec:
    return MessageSpec(type_, payload.cls, payload, direction, authenticated, fd_count)


MESSAGES: dict[m.MessageType, MessageSpec] = {
    spec.type: spec
    for spec in (
        _spec(m.MessageType.HELLO, Record(
            m.Hello,
            field("controller_nonce", FixedBytes(m.NONCE_SIZE), "fresh random nonce of the controller"),
        ), _TO_AGENT, authenticated=False),
        _spec(m.MessageType.CHALLENGE, Record(
            m.Challenge,
            field("agent_nonce", FixedBytes(m.NONCE_SIZE), "fresh random nonce of the agent"),
            field("agent_proof", FixedBytes(m.PROOF_SIZE), "HMAC proving the agent holds the channel secret"),
        ), _TO_CONTROLLER, authenticated=False),
        _spec(m.MessageType.PROOF, Record(
            m.Proof,
            field("controller_proof", FixedBytes(m.PROOF_SIZE),
                  "HMAC proving the controller holds the channel secret"),
        ), _TO_AGENT, authenticated=False),
        _spec(m.MessageType.PING, Record(
            m.Ping,
            field("token", UInt(8), "echoed in PONG"),
        ), _TO_AGENT),
        _spec(m.MessageType.START_INSTANCE, Record(
            m.StartInstance,
            _instance_id(),
            field("vcpus", UInt(2, m.MIN_VCPUS, m.MAX_VCPUS),
                  "vCPUs; the agent also requires a multiple of the SMT width"),
            field("memory_mib", UInt(4, m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB), "guest memory in MiB"),
            field("image_digest", FixedBytes(m.DIGEST_SIZE), "SHA-256 of the image in the content-addressed store"),
            field("image_signature", FixedBytes(m.SIGNATURE_SIZE),
                  "Ed25519 signature by the image-signing key over 'passivisor/v1 image' NUL digest"),
        ), _TO_AGENT),
        _spec(m.MessageType.STOP_INSTANCE, Record(
            m.StopInstance,
            _instance_id(),
            field("mode", StrictEnum(1, m.StopMode), "graceful ACPI power-down or immediate quit"),
            field("timeout_s", UInt(2, 0, m.MAX_STOP_TIMEOUT_S), "seconds to wait for the guest before quitting"),
            rules=[("GRACEFUL needs timeout_s 1..600, FORCE needs timeout_s 0", _stop_timeout)],
        ), _TO_AGENT),
        _spec(m.MessageType.ATTACH_VOLUME, Record(
            m.AttachVolume,
            _instance_id(),
            field("volume_id", Uuid(), "volume identifier"),
            field("source", StrictEnum(1, m.VolumeSource), "where the block data comes from"),
            field("read_only", Bool(), "attach read-only"),
        ), _TO_AGENT, fd_count=_attach_fds),
        _spec(m.MessageType.DETACH_VOLUME, Record(
            m.DetachVolume,
            _instance_id(),
            field("volume_id", Uuid(), "volume identifier"),
        ), _TO_AGENT),
        _spec(m.MessageType.ASSIGN_VF, Record(
            m.AssignVf,
            _instance_id(),
            field("pf", PCI_ADDRESS, "physical function to take a free VF from"),
            field("mac", Mac(), "MAC address to program on the VF"),
            field("vlan", UInt(2, 0, m.MAX_VLAN), "802.1Q VLAN id, 0 = untagged"),
        ), _TO_AGENT),
        _spec(m.MessageType.RELEASE_VF, Record(
            m.ReleaseVf,
            _instance_id(),
            field("vf", PCI_ADDRESS, "the VF to release"),
        ), _TO_AGENT),
        _spec(m.MessageType.DESCRIBE_INSTANCE, Record(m.DescribeInstance, _instance_id()), _TO_AGENT),
        _spec(m.MessageType.LIST_INSTANCES, Record(
            m.ListInstances,
            field("after", Uuid(nullable=True),
                  "list instances whose id sorts after this one (by its 16 bytes); nil = from the first; "
                  "the id need not exist"),
        ), _TO_AGENT),
        _spec(m.MessageType.GET_METRICS, Record(m.GetMetrics), _TO_AGENT),
        _spec(m.MessageType.GET_EVENTS, Record(
            m.GetEvents,
            field("after", UInt(8), "return events with a cursor above this one"),
            field("limit", UInt(1, 1, m.MAX_EVENTS_PER_PULL), "at most this many events"),
        ), _TO_AGENT),
        _spec(m.MessageType.PONG, Record(
            m.Pong,
            field("token", UInt(8), "the token of the PING"),
        ), _TO_CONTROLLER),
        _spec(m.MessageType.INSTANCE_INFO, Record(
            m.InstanceInfo,
            _instance_id(),
            field("state", StrictEnum(1, m.InstanceState), "lifecycle state"),
            field("vcpus", UInt(2, m.MIN_VCPUS, m.MAX_VCPUS), "vCPUs"),
            field("memory_mib", UInt(4, m.MIN_MEMORY_MIB, m.MAX_MEMORY_MIB), "memory in MiB"),
            field("image_digest", FixedBytes(m.DIGEST_SIZE), "image the instance booted"),
            field("host_cpus", BoundedList(UInt(2, 0, 4095), m.MAX_VCPUS, order_key=int),
                  "host CPUs (SMT threads) the vCPUs are pinned to"),
            field("volumes", BoundedList(Uuid(), m.MAX_VOLUMES_PER_INSTANCE, order_key=_uuid_key),
                  "attached volumes"),
            field("vfs", BoundedList(PCI_ADDRESS, m.MAX_VFS_PER_INSTANCE, order_key=_pci_key),
                  "assigned virtual functions"),
            rules=[("host_cpus has vcpus entries while the instance holds cores; "
                    "STOPPED and FAILED instances hold no cores, volumes or VFs", _instance_info_cpus_match)],
        ), _TO_CONTROLLER),
        _spec(m.MessageType.INSTANCE_LIST, Record(
            m.InstanceList,
            field("more", Bool(), "1: instances sorting after the last one listed follow; ask again with its id "
                                  "as `after`"),
            field("instances", BoundedList(INSTANCE_SUMMARY, m.MAX_LISTED_INSTANCES,
                                           order_key=lambda s: s.instance_id.bytes),
                  "instances ordered by id, each sorting after the request's `after`"),
            rules=[("more is 1 only on a full page (64 instances)", _more_only_when_full)],
        ), _TO_CONTROLLER),
        _spec(m.MessageType.VOLUME_STATUS, Record(
            m.VolumeStatus,
            _instance_id(),
            field("volume_id", Uuid(), "volume identifier"),
            field("state", StrictEnum(1, m.VolumeState), "attachment state"),
        ), _TO_CONTROLLER),
        _spec(m.MessageType.VF_STATUS, Record(
            m.VfStatus,
            _instance_id(),
            field("vf", PCI_ADDRESS, "the virtual function"),
            field("vf_index", UInt(2, 0, m.MAX_VF_INDEX), "index N of virtfnN under the PF"),
            field("state", StrictEnum(1, m.VfState), "assignment state"),
        ), _TO_CONTROLLER),
        _spec(m.MessageType.METRICS, Record(
            m.Metrics,
            field("samples", BoundedList(METRIC_SAMPLE, len(m.MetricId), order_key=lambda s: int(s.metric)),
                  "samples ordered by metric id"),
        ), _TO_CONTROLLER),
        _spec(m.MessageType.EVENTS, Record(
            m.Events,
            field("next_cursor", UInt(8), "pass as `after` to continue"),
            field("events", BoundedList(EVENT, m.MAX_EVENTS_PER_PULL, order_key=lambda e: e.cursor),
                  "events ordered by cursor"),
            rules=[("next_cursor is at least the last event's cursor", _events_cursor_covers)],
        ), _TO_CONTROLLER),
        _spec(m.MessageType.ERROR, Record(
            m.Error,
            field("code", StrictEnum(2, m.ErrorCode), "what went wrong"),
        ), _TO_CONTROLLER),
    )
}

SPEC_BY_CLASS: dict[type, MessageSpec] = {spec.cls: spec for spec in MESSAGES.values()}

if len(MESSAGES) != len(m.MessageType):  # pragma: no cover - import-time consistency check
    raise TypeError("every MessageType needs exactly one schema")
