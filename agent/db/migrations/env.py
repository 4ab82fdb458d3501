"""Alembic environment: run against the connection handed over by agent.db.engine.upgrade()."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from agent.db.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
        with engine.connect() as conn:
            _migrate(conn)
            conn.commit()
        return
    _migrate(connection)


def _migrate(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite needs batch mode to alter tables
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
