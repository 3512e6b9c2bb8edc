from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "codec", "scale", "zero_point", "compression")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    codec: str
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[float]
    compression: str
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., codec: _Optional[str] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[float]] = ..., compression: _Optional[str] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model_id", "sample_ids", "tensor", "queued_ms", "history")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    tensor: Tensor
    queued_ms: float
    history: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., queued_ms: _Optional[float] = ..., history: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("sample_id", "label", "confidence", "exit_tier", "exit_index", "degraded")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    EXIT_TIER_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    label: int
    confidence: float
    exit_tier: str
    exit_index: int
    degraded: bool
    def __init__(self, sample_id: _Optional[int] = ..., label: _Optional[int] = ..., confidence: _Optional[float] = ..., exit_tier: _Optional[str] = ..., exit_index: _Optional[int] = ..., degraded: _Optional[bool] = ...) -> None: ...

class HopTrace(_message.Message):
    __slots__ = ("tier", "samples_in", "samples_exited", "compute_ms", "bytes_received", "bytes_sent", "forward_ms", "flops", "encode_ms", "decode_ms", "link_ms", "handle_ms", "samples_degraded", "downstream_error")
    TIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_IN_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_EXITED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    LINK_MS_FIELD_NUMBER: _ClassVar[int]
    HANDLE_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_ERROR_FIELD_NUMBER: _ClassVar[int]
    tier: str
    samples_in: int
    samples_exited: int
    compute_ms: float
    bytes_received: int
    bytes_sent: int
    forward_ms: float
    flops: float
    encode_ms: float
    decode_ms: float
    link_ms: float
    handle_ms: float
    samples_degraded: int
    downstream_error: str
    def __init__(self, tier: _Optional[str] = ..., samples_in: _Optional[int] = ..., samples_exited: _Optional[int] = ..., compute_ms: _Optional[float] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., forward_ms: _Optional[float] = ..., flops: _Optional[float] = ..., encode_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., link_ms: _Optional[float] = ..., handle_ms: _Optional[float] = ..., samples_degraded: _Optional[int] = ..., downstream_error: _Optional[str] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("request_id", "predictions", "trace")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    trace: _containers.RepeatedCompositeFieldContainer[HopTrace]
    def __init__(self, request_id: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., trace: _Optional[_Iterable[_Union[HopTrace, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierDescription(_message.Message):
    __slots__ = ("tier", "model_id", "architecture", "stages", "exit_index", "exit_head", "gate_kind", "gate_params", "input_shape", "input_dtype", "next_tier", "segment_flops", "head_flops", "full_network_flops", "class_names", "tiers", "policy", "calibration", "max_batch", "max_message_bytes", "tensor_limits", "codecs", "compressions", "input_mean", "input_std", "exits", "history")
    class GateParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    GATE_KIND_FIELD_NUMBER: _ClassVar[int]
    GATE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_TIER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FLOPS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FLOPS_FIELD_NUMBER: _ClassVar[int]
    FULL_NETWORK_FLOPS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_LIMITS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    INPUT_STD_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    tier: str
    model_id: str
    architecture: str
    stages: _containers.RepeatedScalarFieldContainer[str]
    exit_index: int
    exit_head: str
    gate_kind: str
    gate_params: _containers.ScalarMap[str, float]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: str
    next_tier: str
    segment_flops: float
    head_flops: float
    full_network_flops: float
    class_names: _containers.RepeatedScalarFieldContainer[str]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    policy: str
    calibration: str
    max_batch: int
    max_message_bytes: int
    tensor_limits: TensorLimits
    codecs: _containers.RepeatedScalarFieldContainer[str]
    compressions: _containers.RepeatedScalarFieldContainer[str]
    input_mean: _containers.RepeatedScalarFieldContainer[float]
    input_std: _containers.RepeatedScalarFieldContainer[float]
    exits: _containers.RepeatedCompositeFieldContainer[ExitDescription]
    history: bool
    def __init__(self, tier: _Optional[str] = ..., model_id: _Optional[str] = ..., architecture: _Optional[str] = ..., stages: _Optional[_Iterable[str]] = ..., exit_index: _Optional[int] = ..., exit_head: _Optional[str] = ..., gate_kind: _Optional[str] = ..., gate_params: _Optional[_Mapping[str, float]] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[str] = ..., next_tier: _Optional[str] = ..., segment_flops: _Optional[float] = ..., head_flops: _Optional[float] = ..., full_network_flops: _Optional[float] = ..., class_names: _Optional[_Iterable[str]] = ..., tiers: _Optional[_Iterable[str]] = ..., policy: _Optional[str] = ..., calibration: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., tensor_limits: _Optional[_Union[TensorLimits, _Mapping]] = ..., codecs: _Optional[_Iterable[str]] = ..., compressions: _Optional[_Iterable[str]] = ..., input_mean: _Optional[_Iterable[float]] = ..., input_std: _Optional[_Iterable[float]] = ..., exits: _Optional[_Iterable[_Union[ExitDescription, _Mapping]]] = ..., history: _Optional[bool] = ...) -> None: ...

class ExitDescription(_message.Message):
    __slots__ = ("index", "gate_kind", "gate_params", "block_flops", "head_flops")
    class GateParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    GATE_KIND_FIELD_NUMBER: _ClassVar[int]
    GATE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FLOPS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FLOPS_FIELD_NUMBER: _ClassVar[int]
    index: int
    gate_kind: str
    gate_params: _containers.ScalarMap[str, float]
    block_flops: float
    head_flops: float
    def __init__(self, index: _Optional[int] = ..., gate_kind: _Optional[str] = ..., gate_params: _Optional[_Mapping[str, float]] = ..., block_flops: _Optional[float] = ..., head_flops: _Optional[float] = ...) -> None: ...

class TensorLimits(_message.Message):
    __slots__ = ("max_rank", "max_dim", "max_elements", "max_decoded_bytes")
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_rank: int
    max_dim: int
    max_elements: int
    max_decoded_bytes: int
    def __init__(self, max_rank: _Optional[int] = ..., max_dim: _Optional[int] = ..., max_elements: _Optional[int] = ..., max_decoded_bytes: _Optional[int] = ...) -> None: ...
