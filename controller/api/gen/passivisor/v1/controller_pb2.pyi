import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from controller.api.gen.passivisor.v1 import constraints_pb2 as _constraints_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_STARTING: _ClassVar[InstanceState]
    INSTANCE_STATE_RUNNING: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPING: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPED: _ClassVar[InstanceState]
    INSTANCE_STATE_FAILED: _ClassVar[InstanceState]

class StopMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_MODE_UNSPECIFIED: _ClassVar[StopMode]
    STOP_MODE_GRACEFUL: _ClassVar[StopMode]
    STOP_MODE_FORCE: _ClassVar[StopMode]

class VolumeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOLUME_STATE_UNSPECIFIED: _ClassVar[VolumeState]
    VOLUME_STATE_ATTACHED: _ClassVar[VolumeState]
    VOLUME_STATE_DETACHED: _ClassVar[VolumeState]

class VirtualFunctionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIRTUAL_FUNCTION_STATE_UNSPECIFIED: _ClassVar[VirtualFunctionState]
    VIRTUAL_FUNCTION_STATE_ASSIGNED: _ClassVar[VirtualFunctionState]
    VIRTUAL_FUNCTION_STATE_RELEASED: _ClassVar[VirtualFunctionState]

class AuditDecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_DECISION_UNSPECIFIED: _ClassVar[AuditDecision]
    AUDIT_DECISION_ALLOWED: _ClassVar[AuditDecision]
    AUDIT_DECISION_DENIED: _ClassVar[AuditDecision]
    AUDIT_DECISION_INVALID: _ClassVar[AuditDecision]
    AUDIT_DECISION_RATE_LIMITED: _ClassVar[AuditDecision]

class AuditRecordKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_RECORD_KIND_UNSPECIFIED: _ClassVar[AuditRecordKind]
    AUDIT_RECORD_KIND_CALL: _ClassVar[AuditRecordKind]
    AUDIT_RECORD_KIND_OUTCOME: _ClassVar[AuditRecordKind]
    AUDIT_RECORD_KIND_CHECKPOINT: _ClassVar[AuditRecordKind]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_INSTANCE_STARTED: _ClassVar[EventKind]
    EVENT_KIND_INSTANCE_STOPPED: _ClassVar[EventKind]
    EVENT_KIND_INSTANCE_EXITED: _ClassVar[EventKind]
    EVENT_KIND_INSTANCE_FAILED: _ClassVar[EventKind]
    EVENT_KIND_VOLUME_ATTACHED: _ClassVar[EventKind]
    EVENT_KIND_VOLUME_DETACHED: _ClassVar[EventKind]
    EVENT_KIND_VIRTUAL_FUNCTION_ASSIGNED: _ClassVar[EventKind]
    EVENT_KIND_VIRTUAL_FUNCTION_RELEASED: _ClassVar[EventKind]
    EVENT_KIND_SESSION_REJECTED: _ClassVar[EventKind]
    EVENT_KIND_AGENT_RESTARTED: _ClassVar[EventKind]
    EVENT_KIND_RECONCILE_MISMATCH: _ClassVar[EventKind]

class EventReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_REASON_UNSPECIFIED: _ClassVar[EventReason]
    EVENT_REASON_REQUESTED: _ClassVar[EventReason]
    EVENT_REASON_GUEST_POWEROFF: _ClassVar[EventReason]
    EVENT_REASON_PROCESS_EXITED: _ClassVar[EventReason]
    EVENT_REASON_FORCED_AFTER_TIMEOUT: _ClassVar[EventReason]
    EVENT_REASON_AUTH_FAILED: _ClassVar[EventReason]
    EVENT_REASON_PROTOCOL_VIOLATION: _ClassVar[EventReason]
    EVENT_REASON_IDLE_TIMEOUT: _ClassVar[EventReason]
    EVENT_REASON_ADOPTED: _ClassVar[EventReason]
    EVENT_REASON_LOST: _ClassVar[EventReason]
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_STARTING: InstanceState
INSTANCE_STATE_RUNNING: InstanceState
INSTANCE_STATE_STOPPING: InstanceState
INSTANCE_STATE_STOPPED: InstanceState
INSTANCE_STATE_FAILED: InstanceState
STOP_MODE_UNSPECIFIED: StopMode
STOP_MODE_GRACEFUL: StopMode
STOP_MODE_FORCE: StopMode
VOLUME_STATE_UNSPECIFIED: VolumeState
VOLUME_STATE_ATTACHED: VolumeState
VOLUME_STATE_DETACHED: VolumeState
VIRTUAL_FUNCTION_STATE_UNSPECIFIED: VirtualFunctionState
VIRTUAL_FUNCTION_STATE_ASSIGNED: VirtualFunctionState
VIRTUAL_FUNCTION_STATE_RELEASED: VirtualFunctionState
AUDIT_DECISION_UNSPECIFIED: AuditDecision
AUDIT_DECISION_ALLOWED: AuditDecision
AUDIT_DECISION_DENIED: AuditDecision
AUDIT_DECISION_INVALID: AuditDecision
AUDIT_DECISION_RATE_LIMITED: AuditDecision
AUDIT_RECORD_KIND_UNSPECIFIED: AuditRecordKind
AUDIT_RECORD_KIND_CALL: AuditRecordKind
AUDIT_RECORD_KIND_OUTCOME: AuditRecordKind
AUDIT_RECORD_KIND_CHECKPOINT: AuditRecordKind
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_INSTANCE_STARTED: EventKind
EVENT_KIND_INSTANCE_STOPPED: EventKind
EVENT_KIND_INSTANCE_EXITED: EventKind
EVENT_KIND_INSTANCE_FAILED: EventKind
EVENT_KIND_VOLUME_ATTACHED: EventKind
EVENT_KIND_VOLUME_DETACHED: EventKind
EVENT_KIND_VIRTUAL_FUNCTION_ASSIGNED: EventKind
EVENT_KIND_VIRTUAL_FUNCTION_RELEASED: EventKind
EVENT_KIND_SESSION_REJECTED: EventKind
EVENT_KIND_AGENT_RESTARTED: EventKind
EVENT_KIND_RECONCILE_MISMATCH: EventKind
EVENT_REASON_UNSPECIFIED: EventReason
EVENT_REASON_REQUESTED: EventReason
EVENT_REASON_GUEST_POWEROFF: EventReason
EVENT_REASON_PROCESS_EXITED: EventReason
EVENT_REASON_FORCED_AFTER_TIMEOUT: EventReason
EVENT_REASON_AUTH_FAILED: EventReason
EVENT_REASON_PROTOCOL_VIOLATION: EventReason
EVENT_REASON_IDLE_TIMEOUT: EventReason
EVENT_REASON_ADOPTED: EventReason
EVENT_REASON_LOST: EventReason

class PciAddress(_message.Message):
    __slots__ = ("domain", "bus", "device", "function")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    domain: int
    bus: int
    device: int
    function: int
    def __init__(self, domain: _Optional[int] = ..., bus: _Optional[int] = ..., device: _Optional[int] = ..., function: _Optional[int] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "state", "vcpus", "memory_mib", "image_digest", "host_cpus", "volume_ids", "virtual_functions")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOST_CPUS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_IDS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    state: InstanceState
    vcpus: int
    memory_mib: int
    image_digest: bytes
    host_cpus: _containers.RepeatedScalarFieldContainer[int]
    volume_ids: _containers.RepeatedScalarFieldContainer[str]
    virtual_functions: _containers.RepeatedCompositeFieldContainer[PciAddress]
    def __init__(self, instance_id: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., image_digest: _Optional[bytes] = ..., host_cpus: _Optional[_Iterable[int]] = ..., volume_ids: _Optional[_Iterable[str]] = ..., virtual_functions: _Optional[_Iterable[_Union[PciAddress, _Mapping]]] = ...) -> None: ...

class InstanceSummary(_message.Message):
    __slots__ = ("instance_id", "state", "vcpus", "memory_mib")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    state: InstanceState
    vcpus: int
    memory_mib: int
    def __init__(self, instance_id: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class StartInstanceRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "vcpus", "memory_mib", "image_digest", "image_signature")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    vcpus: int
    memory_mib: int
    image_digest: bytes
    image_signature: bytes
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., image_digest: _Optional[bytes] = ..., image_signature: _Optional[bytes] = ...) -> None: ...

class StartInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ...) -> None: ...

class StopInstanceRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "mode", "timeout_seconds")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    mode: StopMode
    timeout_seconds: int
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., mode: _Optional[_Union[StopMode, str]] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class StopInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ...) -> None: ...

class AttachVolumeRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "volume_id", "read_only", "envelope")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    volume_id: str
    read_only: bool
    envelope: bytes
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., volume_id: _Optional[str] = ..., read_only: _Optional[bool] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class AttachVolumeResponse(_message.Message):
    __slots__ = ("instance_id", "volume_id", "state")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    volume_id: str
    state: VolumeState
    def __init__(self, instance_id: _Optional[str] = ..., volume_id: _Optional[str] = ..., state: _Optional[_Union[VolumeState, str]] = ...) -> None: ...

class DetachVolumeRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "volume_id")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    volume_id: str
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., volume_id: _Optional[str] = ...) -> None: ...

class DetachVolumeResponse(_message.Message):
    __slots__ = ("instance_id", "volume_id", "state")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    volume_id: str
    state: VolumeState
    def __init__(self, instance_id: _Optional[str] = ..., volume_id: _Optional[str] = ..., state: _Optional[_Union[VolumeState, str]] = ...) -> None: ...

class AssignVirtualFunctionRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "physical_function", "mac", "vlan")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    VLAN_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    physical_function: PciAddress
    mac: bytes
    vlan: int
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., physical_function: _Optional[_Union[PciAddress, _Mapping]] = ..., mac: _Optional[bytes] = ..., vlan: _Optional[int] = ...) -> None: ...

class AssignVirtualFunctionResponse(_message.Message):
    __slots__ = ("instance_id", "virtual_function", "vf_index", "state")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VF_INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    virtual_function: PciAddress
    vf_index: int
    state: VirtualFunctionState
    def __init__(self, instance_id: _Optional[str] = ..., virtual_function: _Optional[_Union[PciAddress, _Mapping]] = ..., vf_index: _Optional[int] = ..., state: _Optional[_Union[VirtualFunctionState, str]] = ...) -> None: ...

class ReleaseVirtualFunctionRequest(_message.Message):
    __slots__ = ("client_token", "instance_id", "virtual_function")
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    client_token: str
    instance_id: str
    virtual_function: PciAddress
    def __init__(self, client_token: _Optional[str] = ..., instance_id: _Optional[str] = ..., virtual_function: _Optional[_Union[PciAddress, _Mapping]] = ...) -> None: ...

class ReleaseVirtualFunctionResponse(_message.Message):
    __slots__ = ("instance_id", "virtual_function", "vf_index", "state")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    VF_INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    virtual_function: PciAddress
    vf_index: int
    state: VirtualFunctionState
    def __init__(self, instance_id: _Optional[str] = ..., virtual_function: _Optional[_Union[PciAddress, _Mapping]] = ..., vf_index: _Optional[int] = ..., state: _Optional[_Union[VirtualFunctionState, str]] = ...) -> None: ...

class DescribeInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DescribeInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: InstanceInfo
    def __init__(self, instance: _Optional[_Union[InstanceInfo, _Mapping]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances", "next_page_token")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceSummary]
    next_page_token: str
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetHostIdentityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetHostIdentityResponse(_message.Message):
    __slots__ = ("public_key", "fingerprint", "signing_public_key")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    fingerprint: bytes
    signing_public_key: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., fingerprint: _Optional[bytes] = ..., signing_public_key: _Optional[bytes] = ...) -> None: ...

class ReadAuditLogRequest(_message.Message):
    __slots__ = ("from_sequence", "max_records")
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    from_sequence: int
    max_records: int
    def __init__(self, from_sequence: _Optional[int] = ..., max_records: _Optional[int] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("head_sequence", "head_hash", "signature")
    HEAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    head_sequence: int
    head_hash: bytes
    signature: bytes
    def __init__(self, head_sequence: _Optional[int] = ..., head_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("sequence", "time", "kind", "principal", "method", "parameters", "decision", "outcome", "prev_hash", "record_hash", "refers_to", "checkpoint", "encoded")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    REFERS_TO_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    kind: AuditRecordKind
    principal: str
    method: str
    parameters: _containers.ScalarMap[str, str]
    decision: AuditDecision
    outcome: str
    prev_hash: bytes
    record_hash: bytes
    refers_to: int
    checkpoint: AuditCheckpoint
    encoded: bytes
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[AuditRecordKind, str]] = ..., principal: _Optional[str] = ..., method: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., decision: _Optional[_Union[AuditDecision, str]] = ..., outcome: _Optional[str] = ..., prev_hash: _Optional[bytes] = ..., record_hash: _Optional[bytes] = ..., refers_to: _Optional[int] = ..., checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class ReadAuditLogResponse(_message.Message):
    __slots__ = ("records", "next_sequence")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_sequence: int
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_sequence: _Optional[int] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("text", "content_type")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    text: str
    content_type: str
    def __init__(self, text: _Optional[str] = ..., content_type: _Optional[str] = ...) -> None: ...

class PollEventsRequest(_message.Message):
    __slots__ = ("after_cursor", "max_events")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    max_events: int
    def __init__(self, after_cursor: _Optional[int] = ..., max_events: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("cursor", "time", "kind", "instance_id", "reason")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    time: _timestamp_pb2.Timestamp
    kind: EventKind
    instance_id: str
    reason: EventReason
    def __init__(self, cursor: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[EventKind, str]] = ..., instance_id: _Optional[str] = ..., reason: _Optional[_Union[EventReason, str]] = ...) -> None: ...

class PollEventsResponse(_message.Message):
    __slots__ = ("events", "next_cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_cursor: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_cursor: _Optional[int] = ...) -> None: ...
