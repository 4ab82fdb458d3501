"""The flagged worklist, its CSV export, patient detail, images and follow-up actions.

Every view of patient data and every export writes an audit event. Only row ids appear in paths.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agent.clock import as_utc, utcnow
from agent.db import fls, worklist
from agent.db.fls import ACTION_LABELS, STATUS_LABELS, FollowUpInvalid
from agent.db.registry import FOLLOW_UP_STATUSES, spreadsheet_cell
from agent.db.users import SessionView
from agent.db.worklist import (
    SEVERITIES,
    SORTS,
    FlaggedFilter,
    filter_date,
    record_access,
    shown_number,
    shown_probability,
)
from agent.dicom_values import format_da
from agent.logging import get_logger
from agent.web import images
from agent.web.auth import PhiSession, RadiologistSession, check_csrf
from agent.web.render import render

log = get_logger(__name__)
router = APIRouter()
PER_PAGE = 25
# the patient page's overlay: the browser may keep it for this user only, and must ask each time
# (an unchanged image is then a 304): every view is audited, and none outlives the session unasked
OVERLAY_CACHE_CONTROL = "private, no-cache"
SORT_LABELS = {
    "name": "Patient",
    "probability": "Probability",
    "t_score": "Est. T-score",
    "study_date": "Last study",
    "flagged": "Flagged (UTC)",
    "status": "Follow-up",
    "referred": "Referred (UTC)",
}


class BadFilter(ValueError):
    pass


def overdue_days(request: Request) -> int:
    return int(request.app.state.settings.fls.overdue_days)


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
        date_from = filter_date(q["date_from"]) if opt("date_from") else None
        date_to = filter_date(q["date_to"]) if opt("date_to") else None
    except ValueError:
        raise BadFilter("date") from None
    try:
        min_p = float(q["min_probability"]) if opt("min_probability") else None
        page = max(1, int(q.get("page") or 1))
    except ValueError:
        raise BadFilter("value") from None
    if min_p is not None and not 0 <= min_p <= 1:
        raise BadFilter("min_probability")
    sort = opt("sort") or "flagged"
    if sort not in SORTS:
        raise BadFilter("sort")
    if opt("overdue") not in (None, "1"):
        raise BadFilter("overdue")
    overdue_before = fls.overdue_cutoff(overdue_days(request)) if opt("overdue") else None
    return FlaggedFilter(
        status,
        severity,
        date_from,
        date_to,
        min_p,
        overdue_before,
        sort,
        q.get("order", "desc") != "asc",
        page,
        PER_PAGE,
    )


def _query(f: FlaggedFilter, **change: object) -> str:
    params: dict[str, object] = {
        "status": f.status or "",
        "severity": f.severity or "",
        "date_from": f.date_from.isoformat() if f.date_from else "",
        "date_to": f.date_to.isoformat() if f.date_to else "",
        "min_probability": "" if f.min_probability is None else f.min_probability,
        "overdue": "1" if f.overdue_before is not None else "",
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
            "client": request.client.host if request.client else None,
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
            "sort_labels": SORT_LABELS,
            "prob": shown_probability,
            "labels": STATUS_LABELS,
            "overdue": lambda r: fls.is_overdue(r.status, r.referred_at, overdue_days(request)),
            "waiting": fls.waiting_days,
            "overdue_days": overdue_days(request),
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
    "referred_utc",
    "overdue",
)


@router.get("/flagged/export.csv")
def export_csv(request: Request, sess: PhiSession) -> Response:
    """The filtered rows as CSV for a spreadsheet: UTF-8 with a byte order mark (without it Excel
    reads the file as the local code page and garbles CJK, Arabic or emoji names), dates as
    YYYY-MM-DD, and text that a spreadsheet would run as a formula neutralised."""
    db = request.app.state.ctx.db
    try:
        f = _parse_filter(request)
    except BadFilter:
        return Response("bad filter", status_code=400, media_type="text/plain")
    rows, total = worklist.flagged_page(db, f, paginate=False)
    buf = io.StringIO()
    buf.write("\ufeff")
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow(
            [
                r.id,
                *(
                    spreadsheet_cell(v)
                    for v in (r.patient_id, r.patient_name, format_da(r.patient_birth_date), r.patient_sex)
                ),
                r.status,
                r.severity,
                shown_probability(r.probability),  # as the page shows it: 3 decimals, rounded down
                round(r.t_score, 2),
                spreadsheet_cell(format_da(r.last_study_date)),
                as_utc(r.first_flagged_at).replace(tzinfo=None).isoformat(timespec="seconds"),
                as_utc(r.last_flagged_at).replace(tzinfo=None).isoformat(timespec="seconds"),
                as_utc(r.referred_at).replace(tzinfo=None).isoformat(timespec="seconds") if r.referred_at else "",
                "yes" if fls.is_overdue(r.status, r.referred_at, overdue_days(request)) else "",
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
        buf.getvalue().encode("utf-8"),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _patient_page(
    request: Request,
    sess: SessionView,
    flagged_id: int,
    *,
    form: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    """The patient page; after a refused follow-up, ``form`` (what was submitted) fills the form
    again and ``errors`` ({field: message}) are shown beside their fields."""
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
    p = detail.patient
    return render(
        request,
        "patient.html",
        {
            "d": detail,
            "p": p,
            "actions": ACTION_LABELS,
            "labels": STATUS_LABELS,
            "next_steps": fls.next_steps(p.status),
            "assessments": fls.assessments_of(db, flagged_id),
            "may_assess": sess.user.role == "radiologist",
            "is_overdue": fls.is_overdue(p.status, p.referred_at, overdue_days(request)),
            "waiting": fls.waiting_days(p.referred_at),
            "form": dict(form or {}),
            "errors": dict(errors or {}),
            "prob": shown_probability,
            "num": shown_number,
        },
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


def _overlay_file(request: Request, sess: SessionView, result_id: int) -> Path | None:
    """The stored overlay of a result (inside the results folder), its view audited; else None."""
    db = request.app.state.ctx.db
    found = worklist.overlay_of_result(db, result_id)
    root: Path = request.app.state.results_dir.resolve()
    if found is None:
        return None
    path = (root / found[0]).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    record_access(
        db,
        "patient_record",
        actor=sess.user.username,
        object_type="result",
        object_id=str(result_id),
        detail={"view": "overlay_image", "flagged_patient": found[1]},
    )
    return path


@router.get("/results/{result_id}/overlay.png")
def overlay(result_id: int, request: Request, sess: PhiSession) -> Response:
    """The overlay at its full stored size, lossless (opened from the patient page's link)."""
    path = _overlay_file(request, sess, result_id)
    if path is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(images.sc_to_png(path), media_type="image/png")


@router.get("/results/{result_id}/overlay.jpg")
def overlay_jpeg(result_id: int, request: Request, sess: PhiSession) -> Response:
    """The overlay the patient page shows: a downscaled JPEG, built once per stored file and kept
    in a bounded cache. The browser may keep it for this user (``private``: patient data, never
    ``public``) but asks again each time (``no-cache``): every view is checked and audited, and
    an unchanged image (``If-None-Match`` matching its ETag) is answered 304 without a body."""
    path = _overlay_file(request, sess, result_id)  # login, role and the audit of the view first
    if path is None:
        return Response("not found", status_code=404, media_type="text/plain")
    stat = path.stat()
    etag = f'"{result_id}-{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    headers = {"Cache-Control": OVERLAY_CACHE_CONTROL, "ETag": etag}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(images.overlay_jpeg(path), media_type="image/jpeg", headers=headers)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak comparison, as RFC 9110 asks)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.post("/patients/{flagged_id}/follow-up")
async def follow_up(flagged_id: int, request: Request, sess: PhiSession) -> Response:
    form = await check_csrf(request, sess)
    submitted = {
        "action": form.get("action", "")[:32],
        "note": form.get("note", "").strip()[:2000],
        "measured_t_score": form.get("measured_t_score", "").strip()[:32],
        "dxa_date": form.get("dxa_date", "").strip()[:32],
    }
    # the database writes (and a page that reads it) wait for the writer lock: off the event loop
    return await run_in_threadpool(_follow_up, request, sess, flagged_id, submitted)


def _follow_up(request: Request, sess: SessionView, flagged_id: int, submitted: dict[str, str]) -> Response:
    raw_t, raw_day = submitted["measured_t_score"], submitted["dxa_date"]
    try:
        measured = float(raw_t) if raw_t else None
    except ValueError:
        errors = {"measured_t_score": "The measured T-score must be a number, e.g. -2.1."}
        return _patient_page(request, sess, flagged_id, form=submitted, errors=errors, status_code=400)
    try:
        dxa_date = date.fromisoformat(raw_day) if raw_day else None
    except ValueError:
        errors = {"dxa_date": "The DXA date must be a date, YYYY-MM-DD."}
        return _patient_page(request, sess, flagged_id, form=submitted, errors=errors, status_code=400)
    db = request.app.state.ctx.db
    try:
        ok = fls.record_step(
            db, flagged_id, sess.user.username, submitted["action"], submitted["note"], measured, dxa_date
        )
    except FollowUpInvalid as exc:  # shown again as submitted, the message beside its field
        return _patient_page(
            request, sess, flagged_id, form=submitted, errors={exc.field: str(exc)}, status_code=exc.status_code
        )
    if not ok:
        return render(request, "error.html", {"title": "Not found", "message": "No such patient in the registry."}, 404)
    return RedirectResponse(f"/patients/{flagged_id}", status_code=303)


@router.post("/results/{result_id}/assessment")
async def assessment(result_id: int, request: Request, sess: RadiologistSession) -> Response:
    """A radiologist agrees or disagrees with one flagged image (a disagreement with its reason)."""
    form = await check_csrf(request, sess)
    verdict = form.get("verdict", "")[:16]
    reason = form.get("reason", "").strip()[:2000]
    return await run_in_threadpool(_assess, request, sess, result_id, verdict, reason)


def _assess(request: Request, sess: SessionView, result_id: int, verdict: str, reason: str) -> Response:
    db = request.app.state.ctx.db
    try:
        done = fls.assess_finding(db, result_id, sess.user.username, verdict, reason or None)
    except FollowUpInvalid as exc:
        found = fls.flagged_of_result(db, result_id)
        if found is None:
            return render(request, "error.html", {"title": "Not found", "message": "No such flagged image."}, 404)
        form = {"result_id": str(result_id), "verdict": verdict, "reason": reason}
        return _patient_page(request, sess, found, form=form, errors={exc.field: str(exc)}, status_code=400)
    if done is None:
        return render(request, "error.html", {"title": "Not found", "message": "No such flagged image."}, 404)
    try:  # the verdict is recorded; sending it onward (FHIR send_assessments) must not undo that
        request.app.state.on_assessed(done.study_id)
    except Exception as exc:  # noqa: BLE001 - any failure to queue it is logged by class only
        log.error("assessment_not_queued", study_id=done.study_id, error=exc.__class__.__name__)
    return RedirectResponse(f"/patients/{done.flagged_id}#result-{result_id}", status_code=303)
