"""Pure parts of batch validation: rule → expectation names, the failure-rate gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.expectations import expectation_for
from batch.validate import SliceCheck, accept_slice, accepted_slices, check_failure_rate, slice_id
from lakehouse.errors import DataQualityError
from lakehouse.fraud import TRANSACTIONS
from lakehouse.tables import Lakehouse


@pytest.mark.parametrize(
    ("reason", "expectation"),
    [
        ("missing:currency", "expect_column_values_to_not_be_null:currency"),
        ("wrong_type:amount", "expect_column_values_to_not_be_null:amount"),
        ("bad_timestamp:event_time", "expect_column_values_to_not_be_null:event_time"),
        ("out_of_range:amount", "expect_column_values_to_be_between:amount"),
        ("not_allowed:country", "expect_column_values_to_be_in_set:country"),
        ("too_long:user_id", "expect_column_value_lengths_to_be_between:user_id"),
        ("unknown_field:cvv", "expect_column_values_to_be_between:_unknown_fields"),
        ("malformed_json: JSONDecodeError", "expect_column_values_to_be_in_set:_json_object"),
        ("not_an_object", "expect_column_values_to_be_in_set:_json_object"),
        ("duplicate:event_id", "expect_compound_columns_to_be_unique:user_id,event_id"),
        ("too_deep", "expect_column_values_to_be_in_set:_json_object"),
        ("number_too_long", "expect_column_values_to_be_in_set:_json_object"),
        ("missing_value", "expect_column_values_to_be_in_set:_json_object"),
        ("duplicate_key:event_id", "expect_column_values_to_be_in_set:_json_object"),
        ("invalid_utf8", "expect_column_values_to_be_in_set:_json_object"),
        ("too_large", "expect_column_values_to_be_in_set:_json_object"),
        ("invalid_string:user_id", "expect_column_values_to_not_be_null:user_id"),
        ("unrepresentable:n", "expect_column_values_to_not_be_null:n"),
        ("key_mismatch:user_id", "expect_column_values_to_be_in_set:_envelope_ok"),
        ("missing_key:user_id", "expect_column_values_to_be_in_set:_envelope_ok"),
        ("out_of_range_time:event_time", "expect_column_values_to_be_in_set:_envelope_ok"),
    ],
)
def test_each_rule_names_its_expectation(reason: str, expectation: str) -> None:
    assert expectation_for(reason, TRANSACTIONS) == expectation


def _check(rows: int, invalid: int, offsets: dict[int, tuple[int, int]] | None = None) -> SliceCheck:
    offsets = offsets or {0: (0, rows // 2 - 1), 1: (0, rows - rows // 2 - 1)}
    return SliceCheck("transaction", slice_id(TRANSACTIONS, 3, offsets), rows, invalid,
                      {"missing": invalid}, offsets)


def test_failure_rate_gate_refuses_a_slice_with_its_numbers_and_the_accept_command() -> None:
    check_failure_rate(_check(1000, 50), limit=0.05, accepted=False)  # 5%: at the limit passes
    refused = _check(1000, 70)
    with pytest.raises(DataQualityError) as failed:
        check_failure_rate(refused, limit=0.05, accepted=False)
    message = str(failed.value)
    assert "70 of 1000 records invalid" in message and "7.00% > " in message
    assert "LAMBDALAKE_BATCH_MAX_FAILURE_RATE" in message and "nothing of it was written" in message
    assert f"lambdalake batch accept {refused.slice_id}" in message
    assert "partition 0 offsets 0..499" in message
    check_failure_rate(refused, limit=0.05, accepted=True)


def test_slice_ids_name_the_same_records_the_same_way_only() -> None:
    offsets = {0: (10, 20), 1: (5, 9)}
    assert slice_id(TRANSACTIONS, 3, offsets) == slice_id(TRANSACTIONS, 3, dict(reversed(offsets.items())))
    assert slice_id(TRANSACTIONS, 3, offsets) != slice_id(TRANSACTIONS, 3, {0: (10, 21), 1: (5, 9)})
    assert slice_id(TRANSACTIONS, 3, offsets).startswith("transaction/3-")


def test_accepting_something_that_is_no_slice_id_says_what_one_looks_like(tmp_path: Path) -> None:
    lakehouse = Lakehouse(str(tmp_path))
    with pytest.raises(DataQualityError, match="<schema>/<micro-batch>-<digest>"):
        accept_slice(lakehouse, "transaction", accepted_by="ops")
    good = slice_id(TRANSACTIONS, 3, {0: (0, 9)})
    accept_slice(lakehouse, good, accepted_by="ops", note="producer bug, fixed")
    assert accepted_slices(lakehouse) == {good}


def test_empty_slice_passes() -> None:
    check_failure_rate(_check(0, 0, {}), limit=0.0, accepted=False)
