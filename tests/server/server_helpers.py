"""Helpers shared by the server tests (imported as a plain module: tests/ is not a package)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from model_owner_server.core.config import Settings


def fast_settings(data_dir: Path, db_url: str, **overrides) -> Settings:
    """Settings with tiny sequence lengths so jobs take well under a second on CPU."""
    values = dict(
        data_dir=data_dir,
        database_url=db_url,
        device="cpu",
        queue_url="immediate",
        embedded_worker=False,
        importance_seq_len=32,
        importance_batch_size=2,
        eval_seq_len=32,
        eval_batch_size=2,
        eval_max_examples=4,
        max_eval_bytes=64 * 1024,
        max_new_tokens=32,
        audit_max_steps=4,  # the fuzz tests post valid audits too: keep each one a few tiny steps
        audit_val_blocks=4,
        # Quotas and rate limits off (tests/server/test_quotas.py turns them on, low, in its own apps).
        rate_limit_per_key=0,
        rate_limit_per_org=0,
        quota_emulator_builds_per_hour=0,
        quota_adapter_uploads_per_hour=0,
        quota_evaluations_per_hour=0,
        quota_generated_tokens_per_hour=0,
        max_active_jobs_per_org=0,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


# Redis for the RedisHuey cases (tests/server/test_jobs.py, test_queue_safety.py). Without it they skip, unless
# SCALEOT_REQUIRE_REDIS=1 (`make test`, CI): then they fail, so a Redis that should be there cannot go missing.
REDIS_URL = os.environ.get("SCALEOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("SCALEOT_REQUIRE_REDIS", "") == "1"


def redis_up() -> bool:
    parts = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=0.5):
            return True
    except OSError:
        return False


QUEUE_BACKENDS = [
    "sqlite",
    pytest.param(
        "redis",
        marks=pytest.mark.skipif(
            not REQUIRE_REDIS and not redis_up(),
            reason=f"no Redis at {REDIS_URL} (SCALEOT_REQUIRE_REDIS=1 makes this a failure)",
        ),
    ),
]


def queue_url_for(backend: str) -> str | None:
    """The queue URL of a QUEUE_BACKENDS case (None: the default SQLite queue file); fails when Redis is down."""
    if backend != "redis":
        return None
    if not redis_up():
        pytest.fail(
            f"SCALEOT_REQUIRE_REDIS=1 but no Redis answers at {REDIS_URL}: start Redis "
            "(or unset SCALEOT_REQUIRE_REDIS to skip this case)"
        )
    return REDIS_URL


@contextmanager
def engine_full(engine: Any) -> Iterator[None]:
    """Every generation slot and queue place of `engine` (a serving.GenerationEngine) held by a generation that
    blocks until the block ends; then they are released (their slots free up as those generations finish)."""
    release = threading.Event()

    def blocked() -> Iterator[str]:
        release.wait(30)
        yield "x"

    async def fill() -> list:
        return [engine.open(blocked()) for _ in range(engine.concurrency + engine.queue_size)]

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(fill())
        yield
    finally:
        release.set()
        loop.close()


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def adapter_bytes(tensors) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def data_dir_listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class World:
    client: TestClient
    settings: Settings
    keys: dict[str, str | None]
    org_ids: dict[str, str] = field(default_factory=dict)
    model_id: str = ""
    importance_job_id: str = ""
    emulator: dict = field(default_factory=dict)
    emulator_bytes: bytes = b""
    adapter_tensors: dict = field(default_factory=dict)
    adapter_id: str = ""
    eval_job_id: str = ""

    def sessions(self):
        return self.client.app.state.sessions()
