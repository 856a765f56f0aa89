"""The Great Expectations suite of a record schema, derived from the spec, and the name of
the expectation each validation rule corresponds to.

The suite runs (through Spark) on the inspected slice: one column per field holding the
value as far as it could be read (`RecordSchema.inspect`), plus `_json_object` (the message
was a JSON object), `_unknown_fields` (how many fields the spec does not know) and
`_envelope_ok` (its Kafka key equals the key field, its time is within the skew of its
Kafka timestamp). So each
row a rule rejects is exactly one unexpected row of its expectation, and the Data Docs
report the same counts as the quarantine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse.spec import RecordSchema

if TYPE_CHECKING:
    import great_expectations as gx

JSON_OBJECT = "_json_object"
UNKNOWN_FIELDS = "_unknown_fields"
ENVELOPE_OK = "_envelope_ok"  # the Kafka key and timestamp agree with the record

# rules that refuse the whole document (it is no readable JSON object)
DOCUMENT_RULES = ("malformed_json", "not_an_object", "missing_value", "too_large", "invalid_utf8",
                  "too_deep", "number_too_long", "duplicate_key")
ENVELOPE_RULES = ("missing_key", "key_mismatch", "out_of_range_time")

NOT_NULL = "expect_column_values_to_not_be_null"
IN_SET = "expect_column_values_to_be_in_set"
BETWEEN = "expect_column_values_to_be_between"
LENGTHS = "expect_column_value_lengths_to_be_between"
UNIQUE = "expect_compound_columns_to_be_unique"  # over RecordSchema.dedup_key's columns

# validation rule → the expectation that fails for it
_RULE_EXPECTATION = {
    "missing": NOT_NULL,
    "wrong_type": NOT_NULL,  # a value of the wrong type cannot be read: it counts as absent
    "bad_timestamp": NOT_NULL,
    "bad_money": NOT_NULL,
    "invalid_string": NOT_NULL,
    "unrepresentable": NOT_NULL,
    "out_of_range": BETWEEN,
    "not_allowed": IN_SET,
    "too_long": LENGTHS,
}


def duplicate_expectation(schema: RecordSchema) -> str:
    """The expectation a duplicate fails: (key entity, id) unique (`RecordSchema.dedup_scope`)."""
    return f"{UNIQUE}:{schema.key_field},{schema.id_field}"


def expectation_for(reason: str, schema: RecordSchema) -> str:
    """`<expectation type>:<column>` of a rejection reason such as `out_of_range:amount`."""
    rule, _, field = reason.partition(":")
    if rule == "duplicate":
        return duplicate_expectation(schema)
    if rule in DOCUMENT_RULES:
        return f"{IN_SET}:{JSON_OBJECT}"
    if rule in ENVELOPE_RULES:
        return f"{IN_SET}:{ENVELOPE_OK}"
    if rule == "unknown_field":
        return f"{BETWEEN}:{UNKNOWN_FIELDS}"
    return f"{_RULE_EXPECTATION[rule]}:{field}"


def build_suite(schema: RecordSchema) -> gx.ExpectationSuite:
    """The expectation suite of a record schema, one expectation per rule of each field."""
    import great_expectations as gx

    # the classes from their defining modules: `gx.expectations` does not re-export them for mypy
    from great_expectations.expectations.core.expect_column_value_lengths_to_be_between import (
        ExpectColumnValueLengthsToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_between import (
        ExpectColumnValuesToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_in_set import ExpectColumnValuesToBeInSet
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import (
        ExpectColumnValuesToNotBeNull,
    )
    from great_expectations.expectations.core.expect_compound_columns_to_be_unique import (
        ExpectCompoundColumnsToBeUnique,
    )
    from great_expectations.expectations.row_conditions import Column

    # field expectations only look at rows that were JSON objects (else every field is missing)
    object_rows = Column(JSON_OBJECT) == True  # noqa: E712 (a GX condition)
    suite = gx.ExpectationSuite(name=schema.name, meta={"generated_from": "lakehouse spec"})
    suite.add_expectation(ExpectColumnValuesToBeInSet(column=JSON_OBJECT, value_set=[True]))
    suite.add_expectation(ExpectColumnValuesToBeBetween(
        column=UNKNOWN_FIELDS, min_value=0, max_value=0, row_condition=object_rows))
    suite.add_expectation(ExpectColumnValuesToBeInSet(column=ENVELOPE_OK, value_set=[True],
                                                      row_condition=object_rows))
    for field in schema.fields:
        if field.required:
            suite.add_expectation(ExpectColumnValuesToNotBeNull(column=field.name, row_condition=object_rows))
        if field.allowed is not None:
            suite.add_expectation(ExpectColumnValuesToBeInSet(
                column=field.name, value_set=list(field.allowed), row_condition=object_rows))
        if field.max_length is not None:
            suite.add_expectation(ExpectColumnValueLengthsToBeBetween(
                column=field.name, min_value=0, max_value=field.max_length, row_condition=object_rows))
        if field.minimum is not None or field.maximum is not None:
            scale = 100 if field.type == "money" else 1  # the column holds cents
            bounds: dict[str, Any] = {}  # only the bounds the field has (the others stay unset)
            if field.minimum is not None:
                bounds["min_value"] = round(field.minimum * scale)
            if field.maximum is not None:
                bounds["max_value"] = round(field.maximum * scale)
            suite.add_expectation(ExpectColumnValuesToBeBetween(
                column=field.name, **bounds, row_condition=object_rows))
    suite.add_expectation(ExpectCompoundColumnsToBeUnique(
        column_list=[schema.key_field, schema.id_field], row_condition=object_rows))
    return suite


class DataQualityReport:
    """Runs a schema's suite through Spark on each slice and keeps the Data Docs (HTML)
    under `<gx_dir>`: one file-backed Great Expectations project per state dir."""

    def __init__(self, gx_dir: Path, schema: RecordSchema) -> None:
        import os

        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no phoning home
        import great_expectations as gx
        from great_expectations.checkpoint.actions import UpdateDataDocsAction
        from great_expectations.data_context.types.base import ProgressBarsConfig

        gx_dir.mkdir(parents=True, exist_ok=True)
        self.context = context = gx.get_context(mode="file", project_root_dir=str(gx_dir))
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_or_update_spark("lambdalake")
        names = [asset.name for asset in source.assets]
        asset = source.get_asset(schema.name) if schema.name in names else source.add_dataframe_asset(schema.name)
        batches = [b.name for b in asset.batch_definitions]
        batch = asset.get_batch_definition("slice") if "slice" in batches else \
            asset.add_batch_definition_whole_dataframe("slice")
        suite = context.suites.add_or_update(build_suite(schema))
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=schema.name, data=batch, suite=suite))
        self.checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=schema.name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "SUMMARY"},
        ))

    def validate(self, frame: Any) -> dict[str, int]:
        """Validate one Spark DataFrame slice; return unexpected counts of failed expectations."""
        result = self.checkpoint.run(batch_parameters={"dataframe": frame})
        failed: dict[str, int] = {}
        for run in result.run_results.values():
            for outcome in run.results:
                if not outcome.success:
                    config = outcome.expectation_config
                    assert config is not None, "a checkpoint's result names its expectation"
                    column = config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or ())
                    key = f"{config.type}:{column}"
                    failed[key] = failed.get(key, 0) + int(outcome.result.get("unexpected_count") or 0)
        return failed

    @property
    def docs_index(self) -> str:
        return str(self.context.get_docs_sites_urls()[0]["site_url"])
