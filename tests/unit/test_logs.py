"""Structured log lines: JSON objects, with JSON messages merged in."""

from __future__ import annotations

import json
import logging

from lakehouse.logs import JsonFormatter


def _line(message: str, level: int = logging.INFO) -> dict:  # type: ignore[type-arg]
    record = logging.LogRecord("lambdalake.speed", level, __file__, 1, message, None, None)
    return json.loads(JsonFormatter().format(record))


def test_json_messages_are_merged_and_others_kept() -> None:
    merged = _line(json.dumps({"event": "batch_run_adopted", "run_id": "r1"}))
    assert merged["event"] == "batch_run_adopted" and merged["run_id"] == "r1"
    assert merged["level"] == "INFO" and merged["logger"] == "lambdalake.speed" and merged["ts"]
    plain = _line("something happened", logging.WARNING)
    assert plain["message"] == "something happened" and plain["level"] == "WARNING"
