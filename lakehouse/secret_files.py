"""Secret files: API keys, the model signing key, Airflow's password and its own secrets.

One way to write them and one way to read them:
- a secret is created with mode 0600 by the `open` that creates it (`O_CREAT | O_EXCL`), so
  there is no moment at which another user could read it, whatever the umask; a new
  secrets folder gets 0700. A secret that must change is written to a fresh 0600 file
  beside it and renamed over it (atomic: readers see the old or the new one).
- a secret is read only when neither group nor others can read it; otherwise ConfigError
  with the command that fixes it (`chmod 600 <path>`). One exception, as PostgreSQL makes
  for its key file: a file owned by root may be group-readable when we are not root, which
  is how a Kubernetes Secret volume with an `fsGroup` presents it (mode 0440/0640).

The content of a secret never reaches a log or an error message; its path may.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from lakehouse.errors import ConfigError

__all__ = ["create_secret", "exposure", "load_or_create_secret", "read_secret", "replace_secret"]

SECRET_MODE = 0o600
FOLDER_MODE = 0o700


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def create_secret(path: Path, data: bytes | str) -> None:
    """Create `path` holding `data`, mode 0600 from its creation; FileExistsError if it is
    there already (a secret is never overwritten in place)."""
    path.parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_as_bytes(data))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def replace_secret(path: Path, data: bytes | str) -> None:
    """Put `data` in `path` (created or replaced) through a fresh 0600 file renamed over it."""
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    create_secret(scratch, data)
    try:
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def exposure(mode: int, *, owner: int, me: int) -> str | None:
    """Who besides the owner can read a file of this mode, or None when nobody can."""
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH):
        return "everyone"
    if mode & (stat.S_IWGRP | stat.S_IXGRP):
        return "its group"
    if mode & stat.S_IRGRP and not (owner == 0 and me != 0):
        return "its group"
    return None


def read_secret(path: Path) -> bytes:
    """The bytes of a secret file that only its owner can read; ConfigError otherwise (with
    the fix), or when it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"the secret file {path} does not exist") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())  # the file we read, not whatever the path names later
        readers = exposure(info.st_mode, owner=info.st_uid, me=os.geteuid())
        if readers is not None:
            raise ConfigError(
                f"{path} holds a secret but {readers} can read it "
                f"(mode {stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}` and try again")
        return handle.read()


def load_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path` (stripped), created by `make()` if the file is missing. Two
    processes racing to create it end up with the same one."""
    if not path.exists():
        try:
            create_secret(path, make())
        except FileExistsError:
            pass  # another process made it first: use theirs
    return read_secret(path).decode().strip()
