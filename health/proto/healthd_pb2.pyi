from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT: _ClassVar[Phase]
    STEP: _ClassVar[Phase]
    CHECKPOINT: _ClassVar[Phase]
    EVAL: _ClassVar[Phase]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTINUE: _ClassVar[Action]
    STOP: _ClassVar[Action]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTHY: _ClassVar[NodeState]
    DEGRADED: _ClassVar[NodeState]
    UNHEALTHY: _ClassVar[NodeState]
INIT: Phase
STEP: Phase
CHECKPOINT: Phase
EVAL: Phase
CONTINUE: Action
STOP: Action
HEALTHY: NodeState
DEGRADED: NodeState
UNHEALTHY: NodeState

class HeartbeatRequest(_message.Message):
    __slots__ = ("rank", "local_rank", "pid", "step", "phase", "ts", "step_seconds", "auth")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    pid: int
    step: int
    phase: Phase
    ts: float
    step_seconds: float
    auth: str
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., ts: _Optional[float] = ..., step_seconds: _Optional[float] = ..., auth: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("action",)
    ACTION_FIELD_NUMBER: _ClassVar[int]
    action: Action
    def __init__(self, action: _Optional[_Union[Action, str]] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "local_rank", "pid", "step", "phase", "last_heartbeat_age_s", "last_progress_age_s", "limit_s", "step_seconds")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    pid: int
    step: int
    phase: Phase
    last_heartbeat_age_s: float
    last_progress_age_s: float
    limit_s: float
    step_seconds: float
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., last_heartbeat_age_s: _Optional[float] = ..., last_progress_age_s: _Optional[float] = ..., limit_s: _Optional[float] = ..., step_seconds: _Optional[float] = ...) -> None: ...

class GpuIssue(_message.Message):
    __slots__ = ("kind", "fatal", "code", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    fatal: bool
    code: int
    detail: str
    def __init__(self, kind: _Optional[str] = ..., fatal: _Optional[bool] = ..., code: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "name", "uuid", "issues")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    issues: _containers.RepeatedCompositeFieldContainer[GpuIssue]
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., issues: _Optional[_Iterable[_Union[GpuIssue, _Mapping]]] = ...) -> None: ...

class GpuReport(_message.Message):
    __slots__ = ("present", "reason", "gpus")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    present: bool
    reason: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    def __init__(self, present: _Optional[bool] = ..., reason: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ...) -> None: ...

class HostStatus(_message.Message):
    __slots__ = ("mem_available_bytes", "disk_free_bytes")
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    mem_available_bytes: int
    disk_free_bytes: int
    def __init__(self, mem_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "state", "reasons", "ranks", "gpu", "host", "ts", "host_name", "address", "refused_heartbeats")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    node: str
    state: NodeState
    reasons: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    gpu: GpuReport
    host: HostStatus
    ts: float
    host_name: str
    address: str
    refused_heartbeats: int
    def __init__(self, node: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., reasons: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., gpu: _Optional[_Union[GpuReport, _Mapping]] = ..., host: _Optional[_Union[HostStatus, _Mapping]] = ..., ts: _Optional[float] = ..., host_name: _Optional[str] = ..., address: _Optional[str] = ..., refused_heartbeats: _Optional[int] = ...) -> None: ...

class KillRequest(_message.Message):
    __slots__ = ("token", "reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    token: str
    reason: str
    def __init__(self, token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class KillReply(_message.Message):
    __slots__ = ("killed_pids",)
    KILLED_PIDS_FIELD_NUMBER: _ClassVar[int]
    killed_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, killed_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class QuarantineRequest(_message.Message):
    __slots__ = ("token", "rank", "fault", "reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FAULT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    token: str
    rank: int
    fault: str
    reason: str
    def __init__(self, token: _Optional[str] = ..., rank: _Optional[int] = ..., fault: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class QuarantineReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: NodeState
    def __init__(self, state: _Optional[_Union[NodeState, str]] = ...) -> None: ...
