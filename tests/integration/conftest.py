"""Fixtures of the integration tests that need no running platform."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from infra.redis import RedisService
from lakehouse.config import load_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of its own, started and stopped by the platform's service (infra.redis)."""
    service = RedisService(load_settings(state_dir=tmp_path_factory.mktemp("state"), redis_port=free_port()))
    service.start()
    try:
        service.wait_ready()
        yield service.url
    finally:
        service.stop()
