from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
constraint: _descriptor.FieldDescriptor
MESSAGE_CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
message_constraint: _descriptor.FieldDescriptor

class FieldConstraint(_message.Message):
    __slots__ = ("required", "pattern", "min_len", "max_len", "min", "max", "defined_only", "max_items", "sensitive")
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    MIN_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DEFINED_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SENSITIVE_FIELD_NUMBER: _ClassVar[int]
    required: bool
    pattern: str
    min_len: int
    max_len: int
    min: int
    max: int
    defined_only: bool
    max_items: int
    sensitive: bool
    def __init__(self, required: _Optional[bool] = ..., pattern: _Optional[str] = ..., min_len: _Optional[int] = ..., max_len: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ..., defined_only: _Optional[bool] = ..., max_items: _Optional[int] = ..., sensitive: _Optional[bool] = ...) -> None: ...

class ConditionalRange(_message.Message):
    __slots__ = ("when_field", "equals", "field", "min", "max")
    WHEN_FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    when_field: str
    equals: int
    field: str
    min: int
    max: int
    def __init__(self, when_field: _Optional[str] = ..., equals: _Optional[int] = ..., field: _Optional[str] = ..., min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class MessageConstraint(_message.Message):
    __slots__ = ("conditional_ranges",)
    CONDITIONAL_RANGES_FIELD_NUMBER: _ClassVar[int]
    conditional_ranges: _containers.RepeatedCompositeFieldContainer[ConditionalRange]
    def __init__(self, conditional_ranges: _Optional[_Iterable[_Union[ConditionalRange, _Mapping]]] = ...) -> None: ...
