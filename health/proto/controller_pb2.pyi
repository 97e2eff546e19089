from google.protobuf import empty_pb2 as _empty_pb2
from stalwart.health.proto import healthd_pb2 as _healthd_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankMetrics(_message.Message):
    __slots__ = ("rank", "node", "step", "step_seconds", "compute_seconds", "ts", "pid")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: str
    step: int
    step_seconds: float
    compute_seconds: float
    ts: float
    pid: int
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[str] = ..., step: _Optional[int] = ..., step_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., ts: _Optional[float] = ..., pid: _Optional[int] = ...) -> None: ...

class RankMetricsReport(_message.Message):
    __slots__ = ("metrics",)
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedCompositeFieldContainer[RankMetrics]
    def __init__(self, metrics: _Optional[_Iterable[_Union[RankMetrics, _Mapping]]] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("excluded", "reason")
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    excluded: bool
    reason: str
    def __init__(self, excluded: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ControllerState(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ExcludeRequest(_message.Message):
    __slots__ = ("token", "node", "reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    token: str
    node: str
    reason: str
    def __init__(self, token: _Optional[str] = ..., node: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ExcludeReply(_message.Message):
    __slots__ = ("newly_excluded",)
    NEWLY_EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    newly_excluded: bool
    def __init__(self, newly_excluded: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("token", "step", "latest_verified", "reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    token: str
    step: int
    latest_verified: bool
    reason: str
    def __init__(self, token: _Optional[str] = ..., step: _Optional[int] = ..., latest_verified: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("step", "notified_nodes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_NODES_FIELD_NUMBER: _ClassVar[int]
    step: int
    notified_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., notified_nodes: _Optional[_Iterable[str]] = ...) -> None: ...
