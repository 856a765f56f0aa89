"""The CLI's face for errors: every PlatformError is one line on stderr, no traceback, and a
non-zero exit (2 for a ConfigError or bad arguments, 1 otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batch import jobs
from infra import cli
from lakehouse.errors import ConfigError, PlatformError, ServiceError

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lambdalake"), *args], capture_output=True, text=True,
        timeout=120, cwd=REPO,
        # a narrow terminal and a long path: the message must still come out as one line
        env={**os.environ, "COLUMNS": "60",
             "LAMBDALAKE_STATE_DIR": str(tmp_path / ("a-long-state-directory-name-" * 3) / "var")})


def test_a_subcommands_platform_error_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    result = _run(["model", "config"], tmp_path)  # no verify key in a fresh state dir
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no model verification key at ")
    assert "LAMBDALAKE_MODEL_VERIFY_KEY" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_bad_argument_exits_2(tmp_path: Path) -> None:
    result = _run(["batch", "train", "--label-cutoff", "yesterday"], tmp_path)
    assert result.returncode == 2
    assert "--label-cutoff" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("error", "code", "prefix"), [
    (ServiceError("kafka: kafka exited during start-up:\n  heap too small\n\n  [core] says [red]no[/red]"),
     1, "error: "),
    (ConfigError("LAMBDALAKE_KAFKA_PARTITIONS must be at least 1"), 2, "configuration error: "),
])
def test_main_prints_any_error_of_the_tree_as_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str],
                                                       error: PlatformError, code: int,
                                                       prefix: str) -> None:
    def refuse(*args: object, **kwargs: object) -> dict[str, str]:
        raise error

    monkeypatch.setattr(jobs, "accept", refuse)  # `batch accept` runs batch.jobs.accept
    with pytest.raises(SystemExit) as exited:
        cli.main(["batch", "accept", "transaction/3-1a2b3c4d5e"])
    assert exited.value.code == code
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = [line for line in captured.err.splitlines() if line.strip()]
    assert line == prefix + cli.one_line(error)
    if code == 1:  # a log tail's lines joined, the text as it is (not read as markup)
        assert line == ("error: kafka: kafka exited during start-up: | heap too small | "
                        "[core] says [red]no[/red]")
