"""Column types: ``UtcDateTime``, the one rule for stored times.

Every DateTime column is a ``UtcDateTime``: it stores UTC (naive UTC text in SQLite, as before;
``timestamp with time zone`` in PostgreSQL) and always gives back an aware UTC datetime, whatever
the engine or the session's time zone. A naive value bound to it is taken to be UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from agent.clock import as_utc


class UtcDateTime(TypeDecorator[datetime]):
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or not isinstance(value, datetime):
            return value
        utc = as_utc(value)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None)  # SQLite's text format has no zone: naive UTC, as always
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)
