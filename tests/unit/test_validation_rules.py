"""Pure parts of batch validation: rule → expectation names, the failure-rate gate."""

from __future__ import annotations

import pytest

from batch.expectations import expectation_for
from batch.validate import ValidationSummary, check_failure_rate
from lakehouse.errors import DataQualityError


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
        ("duplicate:event_id", "expect_column_values_to_be_unique:event_id"),
    ],
)
def test_each_rule_names_its_expectation(reason: str, expectation: str) -> None:
    assert expectation_for(reason) == expectation


def _summary(rows: int, quarantined: int, duplicates: int) -> ValidationSummary:
    return ValidationSummary("transaction", rows, rows - quarantined, quarantined, duplicates,
                             {"missing": quarantined - duplicates, "duplicate": duplicates}, {}, "")


def test_failure_rate_gate_counts_invalid_records_not_duplicates() -> None:
    check_failure_rate([_summary(1000, 60, 50)], limit=0.05)  # 10 invalid: 1%
    with pytest.raises(DataQualityError) as failed:
        check_failure_rate([_summary(1000, 120, 50)], limit=0.05)  # 70 invalid: 7%
    message = str(failed.value)
    assert "70 of 1000 records invalid" in message and "7.00% > " in message
    assert "LAMBDALAKE_BATCH_MAX_FAILURE_RATE" in message and "quarantine" in message


def test_empty_run_passes() -> None:
    check_failure_rate([_summary(0, 0, 0)], limit=0.0)
