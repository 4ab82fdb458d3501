"""A throwaway PostgreSQL 15 cluster for the tests (Debian's postgresql package).

Started once per pytest session when ``STRNET_TEST_DATABASE=postgresql`` (or by a test that needs
it), on a free port, with its own socket directory; stopped and removed at the end. Each agent data
directory or test gets a fresh database, copied from a template migrated to the newest schema.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")

ENGINE_ENV = "STRNET_TEST_DATABASE"


def engine_under_test() -> str:
    """``sqlite`` (the default) or ``postgresql``: the engine the database-facing tests run on."""
    value = os.environ.get(ENGINE_ENV, "sqlite").strip().lower() or "sqlite"
    if value not in ("sqlite", "postgresql"):
        raise RuntimeError(f"{ENGINE_ENV} must be sqlite or postgresql, not {value!r}")
    return value


class PgCluster:
    TEMPLATE = "strnet_template"

    def __init__(self, port: int) -> None:
        if not (PG_BIN / "initdb").is_file():  # `make test` installs the Debian package
            raise RuntimeError(f"{PG_BIN}/initdb not found: run `make test` (it installs postgresql)")
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="strnet-pg-"))
        self._as_root = os.geteuid() == 0  # initdb refuses root: run the server as postgres
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._names = itertools.count(1)
        self._template_ready = False

    def _run(self, *argv: str) -> None:
        cmd = " ".join(argv)
        full = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if self._as_root else ["/bin/sh", "-c", cmd]
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    def start(self) -> PgCluster:
        data = self.dir / "data"
        self._run(f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "--no-sync", "-U", "postgres")
        # the server's own zone is not UTC: the agent must set its sessions' zone itself
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off"
            " -c TimeZone=Europe/Berlin"
        )
        self._run(f"{PG_BIN}/pg_ctl", "-D", str(data), "-w", "-l", str(self.dir / "log"), "-o", f"'{opts}'", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(f"{PG_BIN}/pg_ctl", "-D", str(self.dir / "data"), "-w", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def empty_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def fresh_database(self) -> str:
        """The URL of a new database already at the newest schema (copied from the template)."""
        if not self._template_ready:
            from agent.db.engine import Database, upgrade

            self._admin(f"CREATE DATABASE {self.TEMPLATE} TEMPLATE template0")
            db = Database(self.url(self.TEMPLATE))
            upgrade(db)
            db.dispose()  # a template database must have no connections when it is copied
            self._template_ready = True
        name = f"t{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE}")
        return self.url(name)
