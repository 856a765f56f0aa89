"""Secret files: created with mode 0600 at creation (never chmod'ed after writing), refused
when group or others can read them, with the command that fixes it; the Airflow admin
password is generated on first `up` and `status` says where it is, never what it is."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import airflow
from lakehouse import secret_files
from lakehouse.bundle import load_or_create_signing_key
from lakehouse.config import Settings, load_settings
from lakehouse.errors import ConfigError
from lakehouse.secret_files import create_secret, exposure, load_or_create_secret, read_secret, replace_secret
from serving.auth import load_api_keys


@pytest.fixture(autouse=True)
def open_umask(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """umask 0 (a file's mode is then only what its creator asked for) and no chmod at all:
    a secret that is written first and restricted afterwards fails here."""
    for key in list(os.environ):
        if key.startswith("LAMBDALAKE_"):
            monkeypatch.delenv(key)
    previous = os.umask(0)

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"chmod{args}: a secret must get its mode when it is created")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    try:
        yield []
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def settings_in(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(state_dir=tmp_path / "var", **overrides)


def make_exposed(path: Path, text: str = "x") -> Path:
    """A file readable by everyone, as `echo ... > file` makes it under umask 022."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


# --------------------------------------------------------------------------- the mechanism


def test_a_secret_is_created_with_mode_0600_and_exclusively(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        opened.append((flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(secret_files.os, "open", spy)
    path = tmp_path / "secrets" / "token"
    create_secret(path, "s3cr3t")
    assert path.read_text() == "s3cr3t" and mode(path) == 0o600
    assert mode(path.parent) == 0o700  # a new secrets folder is private too
    flags, created_mode = opened[0]
    assert flags & os.O_CREAT and flags & os.O_EXCL and created_mode == 0o600
    with pytest.raises(FileExistsError):
        create_secret(path, "again")  # never overwritten in place


def test_a_replaced_secret_is_never_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "passwords.json"
    replace_secret(path, "one")
    replace_secret(path, "two")
    assert path.read_text() == "two" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["passwords.json"]  # no temporary left


def test_load_or_create_makes_the_secret_once(tmp_path: Path) -> None:
    path = tmp_path / "s" / "jwt"
    first = load_or_create_secret(path, lambda: "generated")
    again = load_or_create_secret(path, lambda: "other")
    assert first == again == "generated" and mode(path) == 0o600


@pytest.mark.parametrize("exposed", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_secret_readable_by_group_or_others_is_refused_with_the_fix(tmp_path: Path, exposed: int) -> None:
    path = make_exposed(tmp_path / "keys")
    os.umask(0)
    fd = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT | os.O_EXCL, exposed)
    os.close(fd)
    for candidate in (path, tmp_path / "other"):
        with pytest.raises(ConfigError) as refused:
            read_secret(candidate)
        assert f"chmod 600 {candidate}" in str(refused.value)


def test_group_read_is_allowed_only_for_a_root_owned_mount() -> None:
    """A Kubernetes Secret volume with fsGroup: owned by root, group-readable (as
    PostgreSQL allows for its key file). Others never; group write never."""
    regular = stat.S_IFREG
    assert exposure(regular | 0o600, owner=1000, me=1000) is None
    assert exposure(regular | 0o400, owner=1000, me=1000) is None
    assert exposure(regular | 0o640, owner=1000, me=1000) is not None
    assert exposure(regular | 0o640, owner=0, me=1000) is None
    assert exposure(regular | 0o440, owner=0, me=1000) is None
    assert exposure(regular | 0o660, owner=0, me=1000) is not None
    assert exposure(regular | 0o644, owner=0, me=1000) is not None
    assert exposure(regular | 0o640, owner=0, me=0) is not None  # root itself: no excuse


# ------------------------------------------------------------------ every secret writer


def test_the_api_keys_file_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secrets" / "api-keys"
    keys, created = load_api_keys("", path, create=True)
    assert created and mode(path) == 0o600
    assert keys.caller(created) is not None
    again, created_again = load_api_keys("", path, create=True)
    assert created_again is None and again.caller(created) is not None


def test_an_exposed_api_keys_file_is_refused(tmp_path: Path) -> None:
    path = make_exposed(tmp_path / "api-keys", "admin:0123456789abcdef0123:sql\n")
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        load_api_keys("", path)


def test_the_signing_key_is_created_0600_and_refused_when_exposed(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "model-signing.pem"
    load_or_create_signing_key(path)
    assert mode(path) == 0o600
    load_or_create_signing_key(path)  # an existing private key is read back
    exposed = make_exposed(tmp_path / "exposed.pem", path.read_text())
    with pytest.raises(ConfigError, match=f"chmod 600 {exposed}"):
        load_or_create_signing_key(exposed)


def test_airflow_secrets_and_login_file_are_0600(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    env = airflow.airflow_env(settings)
    home = settings.airflow_home_path
    assert {mode(home / ".jwt-secret"), mode(home / ".fernet-secret")} == {0o600}
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == (home / ".jwt-secret").read_text()
    password = airflow.admin_password(settings, create=True)
    login = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    airflow.write_login(settings, password)
    assert json.loads(login.read_text()) == {"admin": password} and mode(login) == 0o600


# ---------------------------------------------------------------- the Airflow password


def test_the_airflow_password_is_generated_once_and_kept(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    with pytest.raises(ConfigError, match="lambdalake up"):
        airflow.admin_password(settings)  # not generated yet: says how to get one
    password = airflow.admin_password(settings, create=True)
    path = settings.airflow_password_path
    assert path == tmp_path.resolve() / "var" / "secrets" / "airflow-admin-password"
    assert mode(path) == 0o600 and len(password) >= 16 and password != "admin"
    assert airflow.admin_password(settings) == airflow.admin_password(settings, create=True) == password
    other = airflow.admin_password(settings_in(tmp_path / "elsewhere"), create=True)
    assert other != password  # random, not a default


def test_a_configured_airflow_password_wins_and_writes_nothing(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, airflow_password="chosen-by-the-operator")
    assert airflow.admin_password(settings, create=True) == "chosen-by-the-operator"
    assert not settings.airflow_password_path.exists()
    assert "LAMBDALAKE_AIRFLOW_PASSWORD" in airflow.password_location(settings)


def test_an_exposed_airflow_password_file_is_refused(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    make_exposed(settings.airflow_password_path, "guessable")
    with pytest.raises(ConfigError, match=f"chmod 600 {settings.airflow_password_path}"):
        airflow.admin_password(settings)


def test_the_airflow_client_logs_in_with_the_effective_password(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    password = airflow.admin_password(settings, create=True)
    client = airflow.AirflowClient(settings)
    assert client._login == {"username": "admin", "password": password}


def _status(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lambdalake"), "status"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "LAMBDALAKE_STATE_DIR": str(tmp_path / "var"), "COLUMNS": "400",
             # no local services to look at: only the login line is under test
             **{f"LAMBDALAKE_MANAGE_{s}": "false" for s in ("KAFKA", "MLFLOW", "RAY", "AIRFLOW")},
             **env})


def test_status_says_where_the_password_is_never_what(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    password = airflow.admin_password(settings, create=True)
    result = _status(tmp_path)
    assert str(settings.airflow_password_path) in result.stdout, result.stdout + result.stderr
    assert password not in result.stdout + result.stderr
    configured = _status(tmp_path, LAMBDALAKE_AIRFLOW_PASSWORD="operator-chosen-password")
    assert "LAMBDALAKE_AIRFLOW_PASSWORD" in configured.stdout, configured.stdout + configured.stderr
    assert "operator-chosen-password" not in configured.stdout + configured.stderr
