"""Shared fixtures: free ports, a running agent on loopback, DICOM test files, DCMTK tools, and the
database engine under test (``STRNET_TEST_DATABASE``: sqlite, the default, or postgresql)."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/dicom_factory.py

from pg_cluster import PgCluster, engine_under_test

from agent.app import Agent
from agent.config import Settings, load_settings

TEST_SCU_AET = "TESTSCU"
AGENT_AET = "STRNET_T"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the machine is shared: never a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # `make test` installs the Debian packages; a missing tool is a set-up error
        pytest.fail(f"{name} not found: run `make test` (it installs orthanc, dcmtk, dicom3tools)")
    return path


_pg: PgCluster | None = None  # the session's cluster, once started
_pg_urls: dict[Path, str] = {}  # on PostgreSQL: each agent data directory's own database


def pg_cluster_now() -> PgCluster:
    """The session's throwaway PostgreSQL cluster, started at the first call."""
    global _pg
    if _pg is None:
        _pg = PgCluster(free_port()).start()
    return _pg


def database_url_for(data_dir: Path) -> str | None:
    """On PostgreSQL, the database of this data directory (the same one each time it is asked, so an
    agent restarted on its data directory finds its rows); on SQLite None (the file in data_dir)."""
    if engine_under_test() != "postgresql":
        return None
    key = Path(data_dir).resolve()
    if key not in _pg_urls:
        _pg_urls[key] = pg_cluster_now().fresh_database()
    return _pg_urls[key]


def database_of(data_dir: Path) -> str:
    """The URL of this data directory's database on the engine under test (SQLite: its strnet.db)."""
    return database_url_for(data_dir) or f"sqlite:///{Path(data_dir) / 'strnet.db'}"


def agent_toml(data_dir: Path, extra: str = "") -> str:
    """An ``[agent]`` table for a config file of a CLI run on this data directory (and its database)."""
    url = database_url_for(data_dir)
    db_line = f'database_url = "{url}"\n' if url else ""
    return f'[agent]\ndata_dir = "{Path(data_dir).as_posix()}"\n{db_line}{extra}'


def agent_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "agent": {"data_dir": str(data_dir), "min_free_disk_mb": 0, "log_format": "json"},
        "scp": {
            "ae_title": AGENT_AET,
            "port": free_port(),
            "peers": [
                {"ae_title": TEST_SCU_AET, "host": "127.0.0.1"},
                {"ae_title": "ORTHANC", "host": "127.0.0.1"},
            ],
            "acse_timeout_s": 5,
            "dimse_timeout_s": 20,
            "network_timeout_s": 20,
        },
        # ingest tests run without the model; screening tests turn the worker on. In-process test
        # agents screen inline: a screening process per test would add its own torch start-up
        # (seconds each, ~6 minutes over the suite). The process path, the shipped default, is
        # tested in tests/unit/test_worker_screening.py and end to end in tests/integration.
        "worker": {"enabled": False, "process": False},
    }
    url = database_url_for(data_dir)
    if url is not None:
        base["agent"]["database_url"] = url
    for key, value in overrides.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return load_settings(None, search_default=False, **base)


@pytest.fixture(scope="session", autouse=True)
def _database_engine() -> Iterator[str]:
    """Starts the PostgreSQL cluster when the suite runs on it; stops it after the last test."""
    engine = engine_under_test()
    if engine == "postgresql":
        pg_cluster_now()
    yield engine
    global _pg
    if _pg is not None:
        _pg.stop()
        _pg = None


@pytest.fixture()
def pg_cluster(_database_engine: str) -> PgCluster:
    """The session's PostgreSQL cluster, for a test that runs on PostgreSQL whatever the engine."""
    return pg_cluster_now()


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    """A fresh database of the engine under test, at the newest schema on PostgreSQL (empty on SQLite:
    ``Database`` + ``upgrade`` or ``open_database`` migrate it)."""
    return database_url_for(tmp_path) or f"sqlite:///{tmp_path / 'strnet.db'}"


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    """The production log pipeline (with its PHI scrubber) for every in-process test."""
    from agent.logging import configure_logging

    configure_logging("info", "console")


@pytest.fixture()
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """Factory: start an agent (in this process) with overrides; stopped at teardown."""
    started: list[Agent] = []

    def _make(**overrides: Any) -> Agent:
        agent = Agent.build(agent_settings(tmp_path / f"agent{len(started)}", **overrides))
        agent.start()
        started.append(agent)
        return agent

    yield _make
    for agent in started:
        if not agent.stopped.is_set():
            agent.stop(grace_s=1)


@pytest.fixture()
def agent(make_agent: Any) -> Agent:
    return make_agent()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny STR-Net with random weights, saved as a real checkpoint.

    Used where the worker's plumbing (not the model's accuracy) is under test: it goes through
    the same checkpoint loading, preprocessing and inference code as the shipped weights.
    """
    import torch

    from model.checkpoint import save_checkpoint
    from model.preprocess import PreprocessSpec
    from model.strnet import strnet_tiny

    torch.manual_seed(0)
    net = strnet_tiny()
    meta = {
        "model_version": "tiny-test-0",
        "synthetic": True,
        "preprocess": PreprocessSpec(input_size=64).to_dict(),
        "thresholds": {"point": {"threshold": 0.5}, "conservative": {"threshold": 0.45}},
        "served_threshold": "conservative",
        "temperature": 1.0,
        "conformal": {"quantile": 0.8, "coverage": 0.9},
    }
    return save_checkpoint(net, meta, tmp_path_factory.mktemp("weights") / "tiny.json")
