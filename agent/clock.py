"""Time in one place: UTC, stored naive in SQLite (which keeps no zone)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now in UTC, without tzinfo (what the database returns, so values compare)."""
    return datetime.now(UTC).replace(tzinfo=None)
