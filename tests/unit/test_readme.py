"""The README's configuration table is the settings object's, so it cannot drift."""

from __future__ import annotations

from pathlib import Path

from lakehouse.config import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_in_readme_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start")
    end = text.index("<!-- settings-table:end -->")
    rows = [line for line in text[start:end].splitlines() if line.startswith("| `")]
    expected = [f"| `{name}` | `{default}` | {meaning} |" for name, default, meaning in settings_table()]
    assert rows == expected, "regenerate the table in README.md from lakehouse.config.settings_table()"
