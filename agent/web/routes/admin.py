"""Observed performance, dead letters (admin), system status and the audit log (auditor)."""

from __future__ import annotations

import csv
import io
import re
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agent.audit import export
from agent.audit.trail import EVENTS
from agent.clock import utcnow
from agent.db import fls, worklist
from agent.db.engine import Database
from agent.db.registry import FOLLOW_UP_STATUSES
from agent.db.users import SessionView
from agent.db.worklist import MAX_ROW_ID, AuditFilter, filter_date, record_access, shown_number
from agent.domain import OUTBOX_BACKLOG
from agent.queue import cluster, outbox, screening, store, sweeps
from agent.web import images
from agent.web.auth import AdminSession, AnySession, AuditorSession, check_csrf
from agent.web.render import render

router = APIRouter()
DEAD_PER_PAGE = 25  # at most; fewer where the form-field limit is lower (dead_letters_per_page)
AUDIT_PER_PAGE = 50
_DONE = ("replayed", "discarded", "gone")
_ROW_ID = re.compile(r"[0-9]{1,10}")  # a row id, if not past MAX_ROW_ID


def _page_number(request: Request) -> int:
    try:
        return max(1, int(request.query_params.get("page") or 1))
    except ValueError:
        return 1


@router.get("/performance")
def performance(request: Request, sess: AnySession) -> Response:
    db = request.app.state.ctx.db
    perf = worklist.performance(db)
    rows = fls.evidence(db)
    return render(
        request,
        "performance.html",
        {"perf": perf, "evidence": rows, "statuses": FOLLOW_UP_STATUSES, "labels": fls.STATUS_LABELS},
    )


@router.get("/performance/evidence.csv")
def evidence_csv(request: Request, sess: AnySession) -> Response:
    """The FLS evidence per month of first flag as CSV (counts and figures only, no patient data)."""
    db = request.app.state.ctx.db
    rows = fls.evidence(db)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(fls.EVIDENCE_COLUMNS)
    for r in rows:
        w.writerow(fls.evidence_cells(r))
    record_access(
        db, "export", actor=sess.user.username, object_type="fls_evidence", detail={"months": len(rows) - 1}
    )
    name = f"strnet-fls-evidence-{utcnow():%Y%m%d-%H%M}.csv"
    return Response(
        buf.getvalue().encode("utf-8"),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/performance/evidence.png")
def evidence_png(request: Request, sess: AnySession) -> Response:
    months = [r for r in fls.evidence(request.app.state.ctx.db) if r.month != "all"]
    return Response(images.evidence_png(months), media_type="image/png")


# -- dead letters --------------------------------------------------------------------------
def dead_letters_per_page(request: Request) -> int:
    """Dead letters per page: DEAD_PER_PAGE, or fewer, so that "Replay selected" with every row of
    a page ticked stays within ``web.max_form_fields`` (one field per ticked row, plus the CSRF
    token, the button and the list of rows shown)."""
    return max(1, min(DEAD_PER_PAGE, request.app.state.ctx.max_form_fields - 3))


def _dead_letters_page(
    request: Request, page: int, done: str | None = None, error: str | None = None, status_code: int = 200
) -> Response:
    db = request.app.state.ctx.db
    per_page = dead_letters_per_page(request)
    items, total, page = worklist.dead_letters(db, page, per_page)
    pages = max(1, -(-total // per_page))
    try:
        replayed = int(request.query_params.get("n") or 0)
    except ValueError:
        replayed = 0
    return render(
        request,
        "dead_letters.html",
        {
            "items": items,
            "total": total,
            "page": page,
            "pages": pages,
            "done": done if done in _DONE else None,
            "replayed": replayed,
            "error": error,
        },
        status_code,
    )


@router.get("/dead-letters")
def dead_letters(request: Request, sess: AdminSession) -> Response:
    return _dead_letters_page(request, _page_number(request), request.query_params.get("done"))


def _replay_studies(db: Database, sess: SessionView, items: dict[int, int], scope: str) -> int:
    """Replay the studies of these dead letters ({item id: study id}), one study at a time, each
    audited as a single replay is (the first of its items named); the number of rows replayed."""
    replayed = 0
    seen: set[int] = set()
    for item_id, study_id in items.items():
        if study_id in seen:
            continue
        seen.add(study_id)
        n = outbox.replay_dead(db, [study_id])  # every dead letter of that study goes back together
        screening.replay_failed_reports(db, [study_id])  # and its SR, if its build was given up
        replayed += n
        record_access(
            db,
            "application_activity",
            actor=sess.user.username,
            action="U",
            object_type="outbox_item",
            object_id=str(item_id),
            detail={"change": "dead_letters_replayed", "study_id": study_id, "items": n, "scope": scope},
        )
    return replayed


@router.post("/dead-letters/{item_id}/replay")
async def replay(item_id: int, request: Request, sess: AdminSession) -> Response:
    await check_csrf(request, sess)
    return await run_in_threadpool(_replay_one, request, sess, item_id)  # writes: off the event loop


def _replay_one(request: Request, sess: SessionView, item_id: int) -> Response:
    db = request.app.state.ctx.db
    study_id = worklist.dead_letter_study(db, item_id)
    if study_id is None:
        return RedirectResponse("/dead-letters?done=gone", status_code=303)
    n = _replay_studies(db, sess, {item_id: study_id}, "one")
    request.app.state.on_replay()
    return RedirectResponse(f"/dead-letters?done=replayed&n={n}", status_code=303)


@router.post("/dead-letters/bulk-replay")
async def replay_many(request: Request, sess: AdminSession) -> Response:
    """Replay the ticked rows ("Replay selected") or every row of the page ("Replay all shown")."""
    await check_csrf(request, sess)
    form = await request.form()  # as check_csrf read it (Starlette keeps it): the repeated fields
    if form.get("scope") == "shown":  # the page's rows, as it showed them: "12,13,14"
        field, values = "shown", str(form.get("shown") or "").split(",")
    else:
        field, values = "selected", [v for v in form.getlist("item") if isinstance(v, str)]
    ids = [int(v) for v in values[:DEAD_PER_PAGE] if _ROW_ID.fullmatch(v.strip()) and int(v) <= MAX_ROW_ID]
    return await run_in_threadpool(_replay_ids, request, sess, ids, field)  # writes: off the event loop


def _replay_ids(request: Request, sess: SessionView, ids: list[int], field: str) -> Response:
    if not ids:
        error = "Tick the dead letters to replay, or use Replay all shown."
        return _dead_letters_page(request, 1, error=error, status_code=400)
    db = request.app.state.ctx.db
    found = worklist.dead_letter_studies(db, ids)
    if not found:
        return RedirectResponse("/dead-letters?done=gone", status_code=303)
    n = _replay_studies(db, sess, found, field)
    request.app.state.on_replay()
    return RedirectResponse(f"/dead-letters?done=replayed&n={n}", status_code=303)


@router.post("/dead-letters/{item_id}/discard")
async def discard(item_id: int, request: Request, sess: AdminSession) -> Response:
    form = await check_csrf(request, sess)
    reason = form.get("reason", "").strip()[:500]
    return await run_in_threadpool(_discard, request, sess, item_id, reason)  # writes: off the event loop


def _discard(request: Request, sess: SessionView, item_id: int, reason: str) -> Response:
    if not reason:
        error = "Give a reason for discarding."
        return _dead_letters_page(request, _page_number(request), error=error, status_code=400)
    ok = outbox.discard_dead(request.app.state.ctx.db, item_id, sess.user.username, reason)
    return RedirectResponse(f"/dead-letters?done={'discarded' if ok else 'gone'}", status_code=303)


# -- status --------------------------------------------------------------------------------
@router.get("/status")
def status(request: Request, sess: AnySession) -> Response:
    db = request.app.state.ctx.db
    jobs = store.count_by_state(db)
    items = outbox.count_by_state(db)
    summary = worklist.status_summary(db)
    chain = worklist.verify_chain(db)
    gone = set(cluster.gone_nodes(db, request.app.state.settings.agent.node_timeout_s))
    return render(
        request,
        "status.html",
        {
            # several agents on one database: jobs not yet screened, by the agent holding them
            "waiting": [(node or "(single node of old)", n, node in gone)
                        for node, n in sorted(cluster.waiting_by_node(db).items())],  # fmt: skip
            "jobs": dict(sorted(jobs.items())),
            "outbox": dict(sorted(items.items())),
            "backlog": sum(items.get(s, 0) for s in OUTBOX_BACKLOG),
            "s": summary,
            "chain": chain,
            "labels": fls.STATUS_LABELS,
            "atna": export.state(db) if request.app.state.settings.atna.enabled else None,
            "sweeps": sweeps.progress(db),
            "model": request.app.state.model_info(),
            "num": shown_number,
        },
    )


# -- audit log -----------------------------------------------------------------------------
class _BadAuditFilter(ValueError):
    pass


def _audit_filter(request: Request) -> AuditFilter:
    q = request.query_params
    kind = q.get("kind", "").strip() or None
    if kind is not None and kind not in EVENTS:
        raise _BadAuditFilter("event")
    actor = q.get("actor", "").strip()[:128] or None
    if actor is not None and "\x00" in actor:  # no user name holds it; PostgreSQL cannot compare it
        raise _BadAuditFilter("actor")
    try:
        date_from = filter_date(q["date_from"].strip()) if q.get("date_from", "").strip() else None
        date_to = filter_date(q["date_to"].strip()) if q.get("date_to", "").strip() else None
    except ValueError:
        raise _BadAuditFilter("date") from None
    return AuditFilter(kind, actor, date_from, date_to)


def _audit_query(f: AuditFilter, page: int) -> str:
    params = {
        "kind": f.kind or "",
        "actor": f.actor or "",
        "date_from": f.date_from.isoformat() if f.date_from else "",
        "date_to": f.date_to.isoformat() if f.date_to else "",
        "page": page,
    }
    return urlencode({k: v for k, v in params.items() if v != ""})


@router.get("/audit")
def audit(request: Request, sess: AuditorSession) -> Response:
    db = request.app.state.ctx.db
    try:
        f = _audit_filter(request)
    except _BadAuditFilter as exc:
        return render(request, "error.html", {"title": "Bad filter", "message": f"Check the {exc} field."}, 400)
    page = _page_number(request)
    rows, total = worklist.audit_page(db, f, page, AUDIT_PER_PAGE)
    client = request.client.host if request.client else None
    detail = {**f.as_detail(), "page": page, "client": client}
    record_access(db, "query", actor=sess.user.username, object_type="audit_log", detail=detail)
    pages = max(1, -(-total // AUDIT_PER_PAGE))
    return render(
        request,
        "audit.html",
        {
            "rows": rows,
            "total": total,
            "page": page,
            "pages": pages,
            "f": f,
            "events": {kind: f"{name} ({code})" for kind, (code, name) in EVENTS.items()},
            "prev_q": _audit_query(f, page - 1) if page > 1 else None,
            "next_q": _audit_query(f, page + 1) if page < pages else None,
        },
    )
