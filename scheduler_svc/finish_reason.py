"""Why a sample ended, in its three forms: the scheduler's enum (internal proto), the public API's
enum, and the name that the offline API, the CLI and the logs show.

The scheduler's FINISH_REASON_ERROR has no public value: an error ends the whole request with a status
(the gateway) or an exception (``LLM``), never as a finish reason.
"""

from __future__ import annotations

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2

_PUBLIC = {
    scheduler_pb2.FINISH_REASON_LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    scheduler_pb2.FINISH_REASON_STOP: generation_pb2.FINISH_REASON_STOP,
    scheduler_pb2.FINISH_REASON_ABORT: generation_pb2.FINISH_REASON_ABORT,
}
_NAMES = {
    generation_pb2.FINISH_REASON_UNSPECIFIED: "",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_ABORT: "abort",
}


def to_public(reason: scheduler_pb2.FinishReason) -> generation_pb2.FinishReason:
    """The public reason of a scheduler's reason; one the public API does not know reads as an abort."""
    return _PUBLIC.get(reason, generation_pb2.FINISH_REASON_ABORT)


def name(reason: generation_pb2.FinishReason) -> str:
    """"length", "stop", "abort", or "" while the sample runs."""
    return _NAMES[reason]
