"""API keys: who may call which route.

A key is `name:key:scopes` (scopes joined by `+`: predict, features, sql), from the setting
`LAMBDALAKE_API_KEYS` (comma-separated) or, when that is empty, from the keys file (one per
line, `#` comments). With neither, the first `lambdalake serve` writes a keys file holding one
`admin` key with every scope (created with mode 0600) and logs where; a keys file that
group or others can read is refused (`lakehouse.secret_files`). Keys are kept as SHA-256
digests and compared in constant time; only the key's name reaches logs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from lakehouse.errors import ConfigError
from lakehouse.secret_files import create_secret, read_secret

SCOPES = ("predict", "features", "sql")
HEADER = "X-API-Key"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]


class ApiKeys:
    def __init__(self, entries: list[tuple[str, str, frozenset[str]]]) -> None:
        if not entries:
            raise ConfigError("no API keys configured: set LAMBDALAKE_API_KEYS or write the keys file")
        self._by_digest = {_digest(key): Caller(name, scopes) for name, key, scopes in entries}

    @classmethod
    def parse(cls, text: str, *, where: str, separator: str = "\n") -> ApiKeys:
        """Entries `name:key:scope+scope`, one per line (or per `separator`), `#` comments."""
        entries = []
        for number, raw in enumerate(text.split(separator), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) != 3 or not _NAME.match(parts[0]) or len(parts[1]) < 16:
                raise ConfigError(f"{where}, entry {number}: expected <name>:<key>:<scope>+<scope> "
                                  "with a key of at least 16 characters")
            scopes = frozenset(s for s in parts[2].split("+") if s)
            unknown = scopes - set(SCOPES)
            if unknown or not scopes:
                raise ConfigError(f"{where}, entry {number} ({parts[0]}): scopes must be some of "
                                  f"{'+'.join(SCOPES)}, got {parts[2]!r}")
            entries.append((parts[0], parts[1], scopes))
        return cls(entries)

    def caller(self, presented: str | None) -> Caller | None:
        """Who a presented key belongs to; None for a missing or unknown key."""
        if not presented:
            return None
        digest = _digest(presented)
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return caller
        return None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(configured: str, path: Path, *, create: bool = False) -> tuple[ApiKeys, str | None]:
    """The API keys, and the admin key when this call created the keys file."""
    if configured.strip():
        return ApiKeys.parse(configured, where="LAMBDALAKE_API_KEYS", separator=","), None
    created = None
    if not path.is_file():
        if not create:
            raise ConfigError(f"no API keys: set LAMBDALAKE_API_KEYS or create {path}")
        created = secrets.token_urlsafe(24)
        try:
            create_secret(path, f"# <name>:<key>:<scope>+<scope>, scopes among {'/'.join(SCOPES)}\n"
                                f"admin:{created}:{'+'.join(SCOPES)}\n")
        except FileExistsError:
            created = None  # another process wrote it first: its keys count
    return ApiKeys.parse(read_secret(path).decode(), where=str(path)), created
