from pagedserve.internal.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerHello(_message.Message):
    __slots__ = ("rank", "world_size", "num_blocks", "num_cpu_blocks", "block_size", "max_model_len", "vocab_size", "eos_token_ids", "architecture", "dtype")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    num_blocks: int
    num_cpu_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    architecture: str
    dtype: str
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_cpu_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class InitCache(_message.Message):
    __slots__ = ("num_blocks", "num_cpu_blocks")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    num_cpu_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ..., num_cpu_blocks: _Optional[int] = ...) -> None: ...

class NewSequence(_message.Message):
    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "num_scheduled_tokens", "block_ids", "sampling_params")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _scheduler_pb2.SamplingParams
    def __init__(self, seq_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., num_scheduled_tokens: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_scheduler_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class Fork(_message.Message):
    __slots__ = ("parent_seq_id", "child_seq_id", "token_id", "sampling_params")
    PARENT_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CHILD_SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    parent_seq_id: int
    child_seq_id: int
    token_id: int
    sampling_params: _scheduler_pb2.SamplingParams
    def __init__(self, parent_seq_id: _Optional[int] = ..., child_seq_id: _Optional[int] = ..., token_id: _Optional[int] = ..., sampling_params: _Optional[_Union[_scheduler_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("step_id", "finished_seq_ids", "forks", "copy_src_block_ids", "copy_dst_block_ids", "swap_out_src_block_ids", "swap_out_dst_block_ids", "swap_in_src_block_ids", "swap_in_dst_block_ids", "new_seqs", "running_seq_ids", "running_num_scheduled_tokens", "running_num_new_blocks", "running_new_block_ids", "table_updates", "num_top_logprobs", "last_token_seq_ids", "last_token_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    FORKS_FIELD_NUMBER: _ClassVar[int]
    COPY_SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    COPY_DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUT_SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUT_DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_IN_DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_SEQS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_NUM_NEW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TABLE_UPDATES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKEN_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    finished_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    forks: _containers.RepeatedCompositeFieldContainer[Fork]
    copy_src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    copy_dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    swap_out_src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    swap_out_dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    swap_in_src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    swap_in_dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    new_seqs: _containers.RepeatedCompositeFieldContainer[NewSequence]
    running_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    running_num_scheduled_tokens: _containers.RepeatedScalarFieldContainer[int]
    running_num_new_blocks: _containers.RepeatedScalarFieldContainer[int]
    running_new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    table_updates: _containers.RepeatedCompositeFieldContainer[TableUpdate]
    num_top_logprobs: int
    last_token_seq_ids: _containers.RepeatedScalarFieldContainer[int]
    last_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., finished_seq_ids: _Optional[_Iterable[int]] = ..., forks: _Optional[_Iterable[_Union[Fork, _Mapping]]] = ..., copy_src_block_ids: _Optional[_Iterable[int]] = ..., copy_dst_block_ids: _Optional[_Iterable[int]] = ..., swap_out_src_block_ids: _Optional[_Iterable[int]] = ..., swap_out_dst_block_ids: _Optional[_Iterable[int]] = ..., swap_in_src_block_ids: _Optional[_Iterable[int]] = ..., swap_in_dst_block_ids: _Optional[_Iterable[int]] = ..., new_seqs: _Optional[_Iterable[_Union[NewSequence, _Mapping]]] = ..., running_seq_ids: _Optional[_Iterable[int]] = ..., running_num_scheduled_tokens: _Optional[_Iterable[int]] = ..., running_num_new_blocks: _Optional[_Iterable[int]] = ..., running_new_block_ids: _Optional[_Iterable[int]] = ..., table_updates: _Optional[_Iterable[_Union[TableUpdate, _Mapping]]] = ..., num_top_logprobs: _Optional[int] = ..., last_token_seq_ids: _Optional[_Iterable[int]] = ..., last_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TableUpdate(_message.Message):
    __slots__ = ("seq_id", "positions", "block_ids")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    positions: _containers.RepeatedScalarFieldContainer[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[int] = ..., positions: _Optional[_Iterable[int]] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepTimings(_message.Message):
    __slots__ = ("prepare_ns", "forward_ns", "sample_ns", "total_ns")
    PREPARE_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    prepare_ns: int
    forward_ns: int
    sample_ns: int
    total_ns: int
    def __init__(self, prepare_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., sample_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "seq_ids", "sampled_token_ids", "sampled_logprobs", "top_logprobs", "timings", "error", "rank", "prompt_logprobs", "seq_errors")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SEQ_ERRORS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    sampled_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampled_logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_scheduler_pb2.TopLogprobs]
    timings: StepTimings
    error: str
    rank: int
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_scheduler_pb2.PromptLogprobs]
    seq_errors: _containers.RepeatedCompositeFieldContainer[SeqError]
    def __init__(self, step_id: _Optional[int] = ..., seq_ids: _Optional[_Iterable[int]] = ..., sampled_token_ids: _Optional[_Iterable[int]] = ..., sampled_logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[_scheduler_pb2.TopLogprobs, _Mapping]]] = ..., timings: _Optional[_Union[StepTimings, _Mapping]] = ..., error: _Optional[str] = ..., rank: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_scheduler_pb2.PromptLogprobs, _Mapping]]] = ..., seq_errors: _Optional[_Iterable[_Union[SeqError, _Mapping]]] = ...) -> None: ...

class SeqError(_message.Message):
    __slots__ = ("seq_id", "error")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    error: str
    def __init__(self, seq_id: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("init_cache", "step", "shutdown")
    INIT_CACHE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    init_cache: InitCache
    step: StepPlan
    shutdown: Shutdown
    def __init__(self, init_cache: _Optional[_Union[InitCache, _Mapping]] = ..., step: _Optional[_Union[StepPlan, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ...) -> None: ...

class CacheReady(_message.Message):
    __slots__ = ("rank", "num_blocks", "num_cpu_blocks")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    num_blocks: int
    num_cpu_blocks: int
    def __init__(self, rank: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_cpu_blocks: _Optional[int] = ...) -> None: ...

class WorkerReply(_message.Message):
    __slots__ = ("hello", "cache_ready", "step_result", "fatal_error")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CACHE_READY_FIELD_NUMBER: _ClassVar[int]
    STEP_RESULT_FIELD_NUMBER: _ClassVar[int]
    FATAL_ERROR_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    cache_ready: CacheReady
    step_result: StepResult
    fatal_error: str
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., cache_ready: _Optional[_Union[CacheReady, _Mapping]] = ..., step_result: _Optional[_Union[StepResult, _Mapping]] = ..., fatal_error: _Optional[str] = ...) -> None: ...
