"""Structured logs: one JSON object per line, for the long-running processes."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", ...}`; a message that is itself a JSON object is merged
    in, any other message is kept as "message"."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
                 "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        try:
            fields = json.loads(message)
        except ValueError:
            fields = None
        entry.update(fields if isinstance(fields, dict) else {"message": message})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def json_logging(level: str) -> None:
    """Send every log record to stderr as a JSON line."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))  # per-connection chatter
