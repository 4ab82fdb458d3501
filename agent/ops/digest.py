"""The daily digest, CSVs in a configured folder: newly flagged patients of the last day, and the
patients referred for DXA whose result is overdue (``[fls] overdue_days``)."""

from __future__ import annotations

import csv
import os
from datetime import timedelta
from pathlib import Path

from agent.audit import trail
from agent.clock import iso_z, utcnow
from agent.db import fls
from agent.db.engine import Database
from agent.db.registry import list_flagged, spreadsheet_cell

COLUMNS = [
    "patient_id",
    "patient_name",
    "first_flagged_at",
    "last_study_date",
    "probability",
    "severity",
    "t_score",
    "status",
    "studies",
]


OVERDUE_COLUMNS = ["registry_id", "patient_id", "patient_name", "referred_at", "days_waiting", "overdue_days"]


def _replace(out: Path, header: list[str], rows: list[list[object]]) -> None:
    """Write the CSV next to ``out``, fsync it, then rename it over ``out``."""
    tmp = out.with_name(out.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)


def write_overdue(db: Database, folder: Path, overdue_days: int) -> Path:
    """Write ``strnet-overdue-<date>.csv``: every patient referred for DXA more than
    ``overdue_days`` ago with no DXA result yet, longest waiting first (the file has a header
    line even when nobody is overdue)."""
    rows = fls.overdue(db, overdue_days)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"strnet-overdue-{utcnow():%Y%m%d}.csv"
    _replace(
        out,
        OVERDUE_COLUMNS,
        [
            [
                r.id,
                spreadsheet_cell(r.patient_id),
                spreadsheet_cell(r.patient_name),
                r.referred_at.isoformat(timespec="seconds") + "Z",
                r.waiting_days,
                overdue_days,
            ]
            for r in rows
        ],
    )
    with db.transaction() as s:
        trail.append(
            s,
            "export",
            actor="strnet-digest",
            action="R",
            object_type="flagged_list",
            detail={"rows": len(rows), "file": out.name, "patients": [r.id for r in rows]},
        )
    return out


def write_digest(db: Database, folder: Path, hours: float = 24.0) -> Path:
    """Write ``strnet-flags-<date>.csv`` (patients first flagged in the last ``hours``)."""
    since = utcnow() - timedelta(hours=hours)
    rows = [r for r in list_flagged(db) if r.first_flagged_at >= since]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"strnet-flags-{utcnow():%Y%m%d}.csv"
    tmp = out.with_name(out.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.patient_id,
                    r.patient_name,
                    iso_z(r.first_flagged_at),
                    r.last_study_date,
                    f"{r.probability:.4f}",
                    r.severity or "",
                    f"{r.t_score:.2f}",
                    r.status,
                    r.studies,
                ]
            )
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    with db.transaction() as s:
        trail.append(
            s,
            "export",
            actor="strnet-digest",
            action="R",
            object_type="flagged_list",
            detail={"rows": len(rows), "file": out.name},
        )
    return out
