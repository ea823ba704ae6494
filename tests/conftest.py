from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests import serving


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One cache folder per run: tiny-sdxl is built once and reused by every server."""
    serving.CACHE_DIR = tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    """The default live server: tiny-sdxl, no auth, shared by read-only tests."""
    with serving.live_server(tmp_path_factory.mktemp("srv")) as live:
        yield live


@pytest.fixture(scope="session")
async def tiny_engine():
    """An engine on tiny-sdxl without HTTP, for tests that drive the runner directly."""
    from inference import Engine, EngineConfig
    from observability.metrics import Metrics

    engine = Engine(EngineConfig(cache_dir=serving.CACHE_DIR, warmup_sizes=((64, 64),)), Metrics())
    await engine.start()
    yield engine
    await engine.drain(5)


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.LiveServer]:
    """A live server that requires the API key ``test-key``."""
    with serving.live_server(tmp_path_factory.mktemp("keyed"), api_keys="test-key") as live:
        yield live


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """Each task store, empty: SQLite in ``tmp_path``, Redis under a prefix of its own."""
    from gateway.jobs import job_store
    from tests.test_task_store_async import redis_store

    if request.param == "redis":
        with redis_store() as store:
            yield store
        return
    store = job_store(tmp_path / "data")
    store.open()
    try:
        yield store
    finally:
        store.close()
