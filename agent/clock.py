"""Time in one place: aware UTC datetimes, whatever the database engine or its session's zone.

SQLite keeps no zone (stored as naive UTC text), PostgreSQL returns aware values in the
session's zone: ``agent.db.types.UtcDateTime`` turns both into aware UTC, so every value the
code compares or subtracts is aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, aware, in UTC."""
    return datetime.now(UTC)


def as_utc(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime; a naive one is taken to be UTC already (the old rule)."""
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def iso_z(when: datetime) -> str:
    """ISO 8601 in UTC with a trailing Z (``2026-12-07T11:23:22.123456Z``), naive taken as UTC."""
    return as_utc(when).replace(tzinfo=None).isoformat() + "Z"
