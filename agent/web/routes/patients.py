"""The flagged worklist, its CSV export, patient detail, images and follow-up actions.

Every view of patient data and every export writes an audit event. Only row ids appear in paths.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from agent.clock import utcnow
from agent.db import worklist
from agent.db.registry import FOLLOW_UP_STATUSES, spreadsheet_cell
from agent.db.users import SessionView
from agent.db.worklist import FOLLOW_UP_ACTIONS, SEVERITIES, SORTS, FlaggedFilter, record_access
from agent.web import images
from agent.web.auth import PhiSession, check_csrf
from agent.web.render import render

router = APIRouter()
PER_PAGE = 25


class BadFilter(ValueError):
    pass


def _parse_filter(request: Request) -> FlaggedFilter:
    q = request.query_params

    def opt(name: str) -> str | None:
        v = q.get(name, "").strip()
        return v or None

    status, severity = opt("status"), opt("severity")
    if status and status not in FOLLOW_UP_STATUSES:
        raise BadFilter("status")
    if severity and severity not in SEVERITIES:
        raise BadFilter("severity")
    try:
        date_from = date.fromisoformat(q["date_from"]) if opt("date_from") else None
        date_to = date.fromisoformat(q["date_to"]) if opt("date_to") else None
        min_p = float(q["min_probability"]) if opt("min_probability") else None
        page = max(1, int(q.get("page") or 1))
    except ValueError:
        raise BadFilter("value") from None
    if min_p is not None and not 0 <= min_p <= 1:
        raise BadFilter("min_probability")
    sort = opt("sort") or "flagged"
    if sort not in SORTS:
        raise BadFilter("sort")
    return FlaggedFilter(
        status, severity, date_from, date_to, min_p, sort, q.get("order", "desc") != "asc", page, PER_PAGE
    )


def _query(f: FlaggedFilter, **change: object) -> str:
    params: dict[str, object] = {
        "status": f.status or "",
        "severity": f.severity or "",
        "date_from": f.date_from.isoformat() if f.date_from else "",
        "date_to": f.date_to.isoformat() if f.date_to else "",
        "min_probability": "" if f.min_probability is None else f.min_probability,
        "sort": f.sort,
        "order": "desc" if f.descending else "asc",
        "page": f.page,
    }
    params.update(change)
    return urlencode({k: v for k, v in params.items() if v != ""})


@router.get("/flagged")
def flagged(request: Request, sess: PhiSession) -> Response:
    db = request.app.state.ctx.db
    try:
        f = _parse_filter(request)
    except BadFilter as exc:
        return render(request, "error.html", {"title": "Bad filter", "message": f"Check the {exc} field."}, 400)
    rows, total = worklist.flagged_page(db, f)
    record_access(
        db,
        "query",
        actor=sess.user.username,
        object_type="flagged_list",
        detail={
            **f.as_detail(),
            "page": f.page,
            "rows_shown": len(rows),
            "total": total,
            "patients": [r.id for r in rows],
        },
    )
    pages = max(1, (total + PER_PAGE - 1) // PER_PAGE)
    return render(
        request,
        "flagged.html",
        {
            "rows": rows,
            "total": total,
            "f": f,
            "pages": pages,
            "statuses": FOLLOW_UP_STATUSES,
            "severities": SEVERITIES,
            "sorts": list(SORTS),
            "prev_q": _query(f, page=f.page - 1) if f.page > 1 else None,
            "next_q": _query(f, page=f.page + 1) if f.page < pages else None,
            "export_q": _query(f, page=""),
            "sort_q": {
                k: _query(f, sort=k, order="asc" if f.sort == k and f.descending else "desc", page=1) for k in SORTS
            },
        },
    )


CSV_FIELDS = (
    "registry_id",
    "patient_id",
    "patient_name",
    "birth_date",
    "sex",
    "status",
    "severity",
    "probability",
    "estimated_t_score",
    "last_study_date",
    "first_flagged_utc",
    "last_flagged_utc",
)


@router.get("/flagged/export.csv")
def export_csv(request: Request, sess: PhiSession) -> Response:
    db = request.app.state.ctx.db
    try:
        f = _parse_filter(request)
    except BadFilter:
        return Response("bad filter", status_code=400, media_type="text/plain")
    rows, total = worklist.flagged_page(db, f, paginate=False)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow(
            [
                r.id,
                *(spreadsheet_cell(v) for v in (r.patient_id, r.patient_name, r.patient_birth_date, r.patient_sex)),
                r.status,
                r.severity,
                round(r.probability, 4),
                round(r.t_score, 2),
                r.last_study_date,
                r.first_flagged_at.isoformat(timespec="seconds"),
                r.last_flagged_at.isoformat(timespec="seconds"),
            ]
        )
    record_access(
        db,
        "export",
        actor=sess.user.username,
        object_type="flagged_list",
        detail={**f.as_detail(), "rows": total, "format": "csv", "patients": [r.id for r in rows]},
    )
    name = f"strnet-flagged-{utcnow():%Y%m%d-%H%M}.csv"
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _patient_page(
    request: Request, sess: SessionView, flagged_id: int, error: str | None = None, status_code: int = 200
) -> Response:
    db = request.app.state.ctx.db
    detail = worklist.patient_detail(db, flagged_id)
    if detail is None:
        return render(request, "error.html", {"title": "Not found", "message": "No such patient in the registry."}, 404)
    record_access(
        db,
        "patient_record",
        actor=sess.user.username,
        object_type="flagged_patient",
        object_id=str(flagged_id),
        detail={"view": "patient_detail"},
    )
    return render(
        request,
        "patient.html",
        {"d": detail, "p": detail.patient, "actions": FOLLOW_UP_ACTIONS, "error": error},
        status_code,
    )


@router.get("/patients/{flagged_id}")
def patient(flagged_id: int, request: Request, sess: PhiSession) -> Response:
    return _patient_page(request, sess, flagged_id)


@router.get("/patients/{flagged_id}/trend.png")
def patient_trend(flagged_id: int, request: Request, sess: PhiSession) -> Response:
    db = request.app.state.ctx.db
    points = worklist.trend(db, flagged_id)
    if not points:
        return Response("not found", status_code=404, media_type="text/plain")
    record_access(
        db,
        "patient_record",
        actor=sess.user.username,
        object_type="flagged_patient",
        object_id=str(flagged_id),
        detail={"view": "trend_plot"},
    )
    return Response(images.trend_png(points, points[-1].threshold), media_type="image/png")


@router.get("/results/{result_id}/overlay.png")
def overlay(result_id: int, request: Request, sess: PhiSession) -> Response:
    db = request.app.state.ctx.db
    found = worklist.overlay_of_result(db, result_id)
    root: Path = request.app.state.results_dir.resolve()
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    path = (root / found[0]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    record_access(
        db,
        "patient_record",
        actor=sess.user.username,
        object_type="result",
        object_id=str(result_id),
        detail={"view": "overlay_image", "flagged_patient": found[1]},
    )
    return Response(images.sc_to_png(path), media_type="image/png")


@router.post("/patients/{flagged_id}/follow-up")
async def follow_up(flagged_id: int, request: Request, sess: PhiSession) -> Response:
    form = await check_csrf(request, sess)
    action = form.get("action", "")
    note = form.get("note", "").strip()[:2000] or None
    raw_t = form.get("measured_t_score", "").strip()
    try:
        measured = float(raw_t) if raw_t else None
    except ValueError:
        return _patient_page(request, sess, flagged_id, "The measured T-score must be a number, e.g. -2.1.", 400)
    try:
        ok = worklist.add_follow_up(request.app.state.ctx.db, flagged_id, sess.user.username, action, note, measured)
    except ValueError as exc:
        return _patient_page(request, sess, flagged_id, str(exc), 400)
    if not ok:
        return render(request, "error.html", {"title": "Not found", "message": "No such patient in the registry."}, 404)
    return RedirectResponse(f"/patients/{flagged_id}", status_code=303)
