"""Why a sample ended: one Python enum, converted to the protos only at the process edges.

The values are the internal proto's (scheduler.proto's FINISH_REASON_*), so the scheduler writes a
member into a RequestOutput as is; ``public`` is the public API's number (generation.proto) and
``label`` the name that the offline API, the CLI, OpenAI responses and the logs show. ERROR has no
public value: an error ends the whole request with a status (the gateway) or an exception (``LLM``),
never as a finish reason.
"""

from __future__ import annotations

import enum

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2


class FinishReason(enum.IntEnum):
    UNSPECIFIED = scheduler_pb2.FINISH_REASON_UNSPECIFIED  # still running
    LENGTH = scheduler_pb2.FINISH_REASON_LENGTH
    STOP = scheduler_pb2.FINISH_REASON_STOP
    ABORT = scheduler_pb2.FINISH_REASON_ABORT
    ERROR = scheduler_pb2.FINISH_REASON_ERROR

    @property
    def public(self) -> generation_pb2.FinishReason:
        """The public API's number; one the public API does not know (ERROR) reads as an abort."""
        return _PUBLIC.get(self, generation_pb2.FINISH_REASON_ABORT)

    @property
    def label(self) -> str:
        """"length", "stop", "abort", "error", or "" while the sample runs."""
        return "" if self is FinishReason.UNSPECIFIED else self.name.lower()

    @classmethod
    def of_public(cls, value: generation_pb2.FinishReason) -> FinishReason:
        return _FROM_PUBLIC[value]


_PUBLIC = {
    FinishReason.UNSPECIFIED: generation_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.ABORT: generation_pb2.FINISH_REASON_ABORT,
}
_FROM_PUBLIC = {v: k for k, v in _PUBLIC.items()}
