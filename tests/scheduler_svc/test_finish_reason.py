"""The one FinishReason enum and its two proto edges."""

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.finish_reason import FinishReason


def test_members_are_the_internal_protos_numbers():
    for member in FinishReason:
        assert scheduler_pb2.FinishReason.Name(member) == f"FINISH_REASON_{member.name}"
    out = scheduler_pb2.RequestOutput(finish_reason=FinishReason.ERROR)  # written as is
    assert FinishReason(out.finish_reason) is FinishReason.ERROR


def test_public_values_and_labels_round_trip():
    for member in (FinishReason.UNSPECIFIED, FinishReason.LENGTH, FinishReason.STOP, FinishReason.ABORT):
        assert generation_pb2.FinishReason.Name(member.public) == f"FINISH_REASON_{member.name}"
        assert FinishReason.of_public(member.public) is member
    assert [m.label for m in FinishReason] == ["", "length", "stop", "abort", "error"]


def test_an_error_has_no_public_reason_and_reads_as_an_abort():
    assert FinishReason.ERROR.public == generation_pb2.FINISH_REASON_ABORT
