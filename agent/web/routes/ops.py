"""``/healthz`` and ``/metrics``: no login, no patient data."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from agent import metrics
from agent.audit import export
from agent.db.worklist import flagged_count, ping
from agent.errors import AgentError
from agent.queue import outbox, store, sweeps

router = APIRouter()


@router.get("/healthz")
def healthz(request: Request) -> Response:
    db = request.app.state.ctx.db
    try:
        reachable = ping(db)
    except AgentError:
        reachable = False
    body = {
        "status": "ok" if reachable else "degraded",
        "database": "reachable" if reachable else "unreachable",
        "model_version": request.app.state.model_info().version,
    }
    return JSONResponse(body, status_code=200 if reachable else 503)


@router.get("/metrics")
def prometheus(request: Request) -> Response:
    db = request.app.state.ctx.db
    atna = export.state(db).backlog if request.app.state.settings.atna.enabled else None
    body = metrics.render(
        store.count_by_state(db), outbox.count_by_state(db), flagged_count(db), sweeps.counts(db), atna
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
