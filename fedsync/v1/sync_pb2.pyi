from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HelloRequest(_message.Message):
    __slots__ = ("model_version", "client_version", "events", "delta")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    client_version: str
    events: EventBatch
    delta: WholeDelta
    def __init__(self, model_version: _Optional[int] = ..., client_version: _Optional[str] = ..., events: _Optional[_Union[EventBatch, _Mapping]] = ..., delta: _Optional[_Union[WholeDelta, _Mapping]] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("events_high_water", "deltas_high_water", "current_model_version", "delta_resume_offset", "delta_resume_sha256", "corrections_cursor", "current_manifest_json", "events_ack", "delta_ack")
    EVENTS_HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    DELTAS_HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DELTA_RESUME_SHA256_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_CURSOR_FIELD_NUMBER: _ClassVar[int]
    CURRENT_MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ACK_FIELD_NUMBER: _ClassVar[int]
    DELTA_ACK_FIELD_NUMBER: _ClassVar[int]
    events_high_water: int
    deltas_high_water: int
    current_model_version: int
    delta_resume_offset: int
    delta_resume_sha256: bytes
    corrections_cursor: int
    current_manifest_json: bytes
    events_ack: EventAck
    delta_ack: DeltaAck
    def __init__(self, events_high_water: _Optional[int] = ..., deltas_high_water: _Optional[int] = ..., current_model_version: _Optional[int] = ..., delta_resume_offset: _Optional[int] = ..., delta_resume_sha256: _Optional[bytes] = ..., corrections_cursor: _Optional[int] = ..., current_manifest_json: _Optional[bytes] = ..., events_ack: _Optional[_Union[EventAck, _Mapping]] = ..., delta_ack: _Optional[_Union[DeltaAck, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("seq", "input_hashes", "labels", "confidences", "model_versions", "latencies_us", "times_unix_ns")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_HASHES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCIES_US_FIELD_NUMBER: _ClassVar[int]
    TIMES_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    seq: _containers.RepeatedScalarFieldContainer[int]
    input_hashes: bytes
    labels: _containers.RepeatedScalarFieldContainer[int]
    confidences: _containers.RepeatedScalarFieldContainer[float]
    model_versions: _containers.RepeatedScalarFieldContainer[int]
    latencies_us: _containers.RepeatedScalarFieldContainer[float]
    times_unix_ns: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[_Iterable[int]] = ..., input_hashes: _Optional[bytes] = ..., labels: _Optional[_Iterable[int]] = ..., confidences: _Optional[_Iterable[float]] = ..., model_versions: _Optional[_Iterable[int]] = ..., latencies_us: _Optional[_Iterable[float]] = ..., times_unix_ns: _Optional[_Iterable[int]] = ...) -> None: ...

class EventAck(_message.Message):
    __slots__ = ("high_water", "accepted", "duplicates", "corrections_cursor")
    HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_CURSOR_FIELD_NUMBER: _ClassVar[int]
    high_water: int
    accepted: int
    duplicates: int
    corrections_cursor: int
    def __init__(self, high_water: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., corrections_cursor: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class DeltaHeader(_message.Message):
    __slots__ = ("seq", "base_version", "num_examples", "codec", "tensors", "payload_size", "payload_sha256", "train_loss", "offset")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    seq: int
    base_version: int
    num_examples: int
    codec: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_size: int
    payload_sha256: bytes
    train_loss: float
    offset: int
    def __init__(self, seq: _Optional[int] = ..., base_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., codec: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_size: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., offset: _Optional[int] = ...) -> None: ...

class DeltaChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DeltaHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DeltaHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WholeDelta(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: DeltaHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[DeltaHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class DeltaAck(_message.Message):
    __slots__ = ("seq", "status", "reason", "deltas_high_water")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[DeltaAck.Status]
        ACCEPTED: _ClassVar[DeltaAck.Status]
        DUPLICATE: _ClassVar[DeltaAck.Status]
        REJECTED: _ClassVar[DeltaAck.Status]
    STATUS_UNSPECIFIED: DeltaAck.Status
    ACCEPTED: DeltaAck.Status
    DUPLICATE: DeltaAck.Status
    REJECTED: DeltaAck.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DELTAS_HIGH_WATER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: DeltaAck.Status
    reason: str
    deltas_high_water: int
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[DeltaAck.Status, str]] = ..., reason: _Optional[str] = ..., deltas_high_water: _Optional[int] = ...) -> None: ...

class PullCorrectionsRequest(_message.Message):
    __slots__ = ("after_cursor", "limit")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    limit: int
    def __init__(self, after_cursor: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("cursor", "input_hash", "label", "confidence", "model_version")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    INPUT_HASH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    input_hash: bytes
    label: int
    confidence: float
    model_version: int
    def __init__(self, cursor: _Optional[int] = ..., input_hash: _Optional[bytes] = ..., label: _Optional[int] = ..., confidence: _Optional[float] = ..., model_version: _Optional[int] = ...) -> None: ...

class PullCorrectionsResponse(_message.Message):
    __slots__ = ("corrections", "cursor", "more")
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    corrections: _containers.RepeatedCompositeFieldContainer[Correction]
    cursor: int
    more: bool
    def __init__(self, corrections: _Optional[_Iterable[_Union[Correction, _Mapping]]] = ..., cursor: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "manifest_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest_json: bytes
    def __init__(self, version: _Optional[int] = ..., manifest_json: _Optional[bytes] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("version", "name", "offset", "chunk_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    name: str
    offset: int
    chunk_size: int
    def __init__(self, version: _Optional[int] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
