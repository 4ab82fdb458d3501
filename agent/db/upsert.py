"""Race-safe "insert unless there": ``INSERT ... ON CONFLICT DO NOTHING``, then the caller selects.

Two processes (or threads) that both find no row and both insert would make one of them fail on
the unique key; with ON CONFLICT DO NOTHING the second insert waits for the first (PostgreSQL) or
runs after it (SQLite's one writer) and does nothing, and both then read the one row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_if_absent(session: Session, table: Any, values: dict[str, Any], key: list[str]) -> bool:
    """Insert ``values`` into ``table`` unless a row with the same ``key`` columns exists (or is being
    inserted by a transaction not yet committed, which this waits for); True when this inserted it."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite if dialect == "sqlite" else None
    if module is None:
        raise NotImplementedError(f"insert_if_absent: no ON CONFLICT for {dialect}")
    stmt = module.insert(table).values(**values).on_conflict_do_nothing(index_elements=key)
    # RETURNING tells whether a row went in, on both engines (the rowcount did not on PostgreSQL)
    returned = session.execute(stmt.returning(*[getattr(table, k) for k in key])).first()
    return returned is not None
