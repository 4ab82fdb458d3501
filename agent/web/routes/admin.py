"""Observed performance, dead letters (admin), system status and the audit log (auditor)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from agent.db import worklist
from agent.db.worklist import record_access
from agent.domain import OUTBOX_BACKLOG
from agent.queue import outbox, store
from agent.web.auth import AdminSession, AnySession, AuditorSession, check_csrf
from agent.web.render import render

router = APIRouter()


@router.get("/performance")
def performance(request: Request, sess: AnySession) -> Response:
    perf = worklist.performance(request.app.state.ctx.db)
    return render(request, "performance.html", {"perf": perf})


@router.get("/dead-letters")
def dead_letters(request: Request, sess: AdminSession) -> Response:
    db = request.app.state.ctx.db
    return render(
        request, "dead_letters.html", {"items": worklist.dead_letters(db), "done": request.query_params.get("done")}
    )


@router.post("/dead-letters/{item_id}/replay")
async def replay(item_id: int, request: Request, sess: AdminSession) -> Response:
    await check_csrf(request, sess)
    db = request.app.state.ctx.db
    study_id = worklist.dead_letter_study(db, item_id)
    if study_id is None:
        return RedirectResponse("/dead-letters?done=gone", status_code=303)
    n = outbox.replay_dead(db, [study_id])  # every dead letter of that study goes back together
    record_access(
        db,
        "application_activity",
        actor=sess.user.username,
        action="U",
        object_type="outbox_item",
        object_id=str(item_id),
        detail={"change": "dead_letters_replayed", "study_id": study_id, "items": n},
    )
    request.app.state.on_replay()
    return RedirectResponse("/dead-letters?done=replayed", status_code=303)


@router.post("/dead-letters/{item_id}/discard")
async def discard(item_id: int, request: Request, sess: AdminSession) -> Response:
    form = await check_csrf(request, sess)
    reason = form.get("reason", "").strip()[:500]
    db = request.app.state.ctx.db
    if not reason:
        return render(
            request,
            "dead_letters.html",
            {"items": worklist.dead_letters(db), "done": None, "error": "Give a reason for discarding."},
            400,
        )
    ok = outbox.discard_dead(db, item_id, sess.user.username, reason)
    return RedirectResponse(f"/dead-letters?done={'discarded' if ok else 'gone'}", status_code=303)


@router.get("/status")
def status(request: Request, sess: AnySession) -> Response:
    db = request.app.state.ctx.db
    jobs = store.count_by_state(db)
    items = outbox.count_by_state(db)
    summary = worklist.status_summary(db)
    chain = worklist.verify_chain(db)
    return render(
        request,
        "status.html",
        {
            "jobs": dict(sorted(jobs.items())),
            "outbox": dict(sorted(items.items())),
            "backlog": sum(items.get(s, 0) for s in OUTBOX_BACKLOG),
            "s": summary,
            "chain": chain,
            "model": request.app.state.model_info(),
        },
    )


@router.get("/audit")
def audit(request: Request, sess: AuditorSession) -> Response:
    db = request.app.state.ctx.db
    try:
        page = max(1, int(request.query_params.get("page") or 1))
    except ValueError:
        page = 1
    per_page = 50
    rows, total = worklist.audit_page(db, page, per_page)
    record_access(db, "query", actor=sess.user.username, object_type="audit_log", detail={"page": page})
    pages = max(1, (total + per_page - 1) // per_page)
    return render(request, "audit.html", {"rows": rows, "total": total, "page": page, "pages": pages})
