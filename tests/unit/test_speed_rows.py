"""A speed member's scored rows: its copy of the store's outbox (`speed.consumer.OutboxCopy`),
which the flusher takes instead of reading the store back only while it is known to hold
every row the store's outbox holds (a row in the copy equals the row read back), and a
micro-batch's rows completed once its scores arrive (`_Scoring`)."""

from __future__ import annotations

from typing import Any

from speed.consumer import OutboxCopy, decode_row, encode_row


def rows(*offsets: int) -> list[dict[str, Any]]:
    return [{"offset": o} for o in offsets]


def test_a_partition_is_read_from_the_store_until_a_flush_read_it_with_no_step_in_between() -> None:
    copy = OutboxCopy()
    assert copy.take(0) is None  # just assigned: a predecessor's rows may be in the store
    copy.stepped(0, 9, 12, rows(10, 11, 12))
    assert copy.take(0) is None  # still unknown: the rows up to 9 are not in the copy
    copy.read(0, 12)  # the flusher read the store through 12, nothing stepped since
    copy.stepped(0, 12, 14, rows(13, 14))
    copy.stepped(0, 14, 15, rows(15))
    assert copy.take(0) == (15, rows(13, 14, 15))
    assert copy.take(0) == (15, [])  # taken: empty until the next step


def test_a_step_during_the_flushers_read_leaves_the_copy_unknown() -> None:
    copy = OutboxCopy()
    copy.stepped(0, -1, 5, rows(0, 1, 2, 3, 4, 5))
    # the flusher read through 5; the member stepped 6..8 before the flusher said so
    copy.stepped(0, 5, 8, rows(6, 7, 8))
    copy.read(0, 5)
    assert copy.take(0) is None


def test_another_members_step_in_between_leaves_the_copy_unknown() -> None:
    copy = OutboxCopy()
    copy.read(0, 20)
    copy.stepped(0, 20, 25, rows(21, 25))
    copy.stepped(0, 30, 33, rows(31, 33))  # someone applied 26..30 meanwhile: their rows are not here
    assert copy.take(0) is None
    copy.read(0, 33)
    copy.stepped(0, 33, 34, rows(34))
    assert copy.take(0) == (34, rows(34))


def test_a_revoked_or_reassigned_partition_is_forgotten() -> None:
    copy = OutboxCopy()
    copy.read(0, 3)
    copy.read(1, 7)
    copy.forget([0])
    assert copy.take(0) is None
    assert copy.take(1) == (7, [])


def test_a_row_in_the_copy_equals_the_row_read_back_from_the_outbox() -> None:
    row = {"user_id": "u1", "amount": 1234, "event_time": 1_767_225_600_000_000, "partition": 2, "offset": 41,
           "kafka_timestamp": None, "coverage": [(0, 17), (1, -1), (2, 40)], "features": [0.1, 3.0, 1e-300],
           "score": 0.25, "model_version": 3, "batch_run_id": None, "scored_at": 1, "feature_ms": 0.5}
    assert decode_row(encode_row(row)) == row
    # a row an older version wrote: its coverage an object keyed by partition
    older = encode_row({**row, "coverage": {"2": 40, "0": 17, "1": -1}})
    assert decode_row(older) == row


def test_a_micro_batchs_rows_are_completed_once_its_scores_arrive() -> None:
    from concurrent.futures import Future

    import pytest

    from speed.consumer import _Scoring, _ScoringFailed, _Taken

    taken = [_Taken(o, {"user_id": "u", "event_time": 5}, f"id{o}", 5, {"offset": o, "coverage": [(0, o - 1)]})
             for o in (3, 4)]
    future: Future[tuple[list[float], int, float]] = Future()
    scoring = _Scoring(future, [[1.0], [2.0]], taken, {"batch_run_id": None, "consumer_group": "g",
                                                        "feature_ms": 2.0}, "event_time")
    future.set_result(([0.25, 0.75], 7, 1.5))
    encoded = scoring.encoded(taken[1:])
    assert [t.row["score"] for t in taken] == [0.25, 0.75]
    assert decode_row(encoded[4])["model_version"] == 7 and decode_row(encoded[4])["event_time"] == 5000
    assert scoring.finish() == 7
    failed: Future[tuple[list[float], int, float]] = Future()
    failed.set_exception(RuntimeError("down"))
    with pytest.raises(_ScoringFailed, match="down"):
        _Scoring(failed, [], [], {"batch_run_id": None, "consumer_group": "g", "feature_ms": 0.0}, "t").finish()
