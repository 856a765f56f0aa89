"""The platform's online store: `redis-server` (the Debian package) on 127.0.0.1, on a port
clear of Ray's (6390 by default; Ray takes 6379-6383), with its append-only file under the
state dir (every write reaches the AOF, fsynced each second, so a restart finds the
increments) and its memory capped.

`maxmemory-policy noeviction`: a full store refuses writes (the speed layer stops and says
so) rather than evicting increments, which would silently break the exact merge. At scale,
point `LAMBDALAKE_ONLINE_STORE_URL` at any Redis-protocol server (Redis Cluster included)
and set `LAMBDALAKE_MANAGE_REDIS=false`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from infra.process import ManagedProcess
from infra.service import LOCALHOST, Service
from lakehouse.errors import ServiceError


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise ServiceError("redis-server is not installed: run `make install` (it installs the Debian "
                           "package redis-server), or point LAMBDALAKE_ONLINE_STORE_URL at a Redis "
                           "server and set LAMBDALAKE_MANAGE_REDIS=false")
    return found


class RedisService(Service):
    """The online store's redis-server."""

    name = "redis"
    start_timeout = 30.0

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.redis_port,)

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.settings.redis_port}/0"

    @property
    def config_file(self) -> Path:
        return self.home / "redis.conf"

    def prepare(self) -> None:
        """The password (if any) goes into a config file only the owner reads, not onto the
        command line, where every user's `ps` would show it."""
        super().prepare()
        password = self.settings.online_store_password.get_secret_value()
        self.config_file.touch(mode=0o600, exist_ok=True)
        self.config_file.chmod(0o600)
        self.config_file.write_text(f'requirepass "{password}"\n' if password else "")

    def processes(self) -> list[ManagedProcess]:
        argv = [
            redis_server_binary(),
            str(self.config_file),
            "--bind", LOCALHOST,
            "--port", str(self.settings.redis_port),
            "--protected-mode", "yes",
            "--dir", str(self.home),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # the AOF is the persistence; no RDB snapshots besides
            "--maxmemory", self.settings.redis_maxmemory,
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", "",  # to stdout, which the process log keeps
        ]
        return [self.process("redis", argv)]

    def ready(self) -> bool:
        password = self.settings.online_store_password.get_secret_value() or None
        try:
            return bool(redis.Redis(host=LOCALHOST, port=self.settings.redis_port, password=password,
                                    socket_timeout=2).ping())
        except redis.RedisError:
            return False
