"""The admin web: FastAPI with server-rendered Jinja2 templates (no front-end build step).

``create_app`` receives everything it needs (settings, database, callables); it builds nothing
else. ``agent/app.py`` runs it in a thread of ``strnet serve``.

Imports in ``agent/web`` point one way: this module (the application, its middleware and error
pages) includes the routers of ``routes/``; they and this module render pages with
``render.py`` and check sessions with ``auth.py``, which import neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from agent.config import Settings
from agent.db.engine import Database
from agent.db.worklist import record_access
from agent.domain import ServedModel
from agent.logging import get_logger
from agent.web.auth import (
    CsrfFailed,
    Forbidden,
    LoginForms,
    NotLoggedIn,
    WebContext,
    load_secret,
)
from agent.web.render import render, templates
from agent.web.routes import admin, auth_routes, ops, patients

log = get_logger(__name__)
HERE = Path(__file__).parent

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# responses that hold no patient data and may be cached
_CACHEABLE_PREFIXES = ("/static/",)
# answered 401 rather than redirected to the login page (not pages a person navigates to)
_NON_PAGE_SUFFIXES = (".png", ".csv")


@dataclass
class ModelInfo:
    """What the status page shows about the loaded model (empty when no worker runs here)."""

    version: str | None = None
    threshold: float | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ServedModel | None) -> ModelInfo:
        """From the worker's served model (None when no worker runs here)."""
        if model is None:
            return cls()
        return cls(version=model.algorithm.version, threshold=model.threshold, thresholds=dict(model.thresholds))


def create_app(
    settings: Settings,
    db: Database,
    *,
    model_info: Callable[[], ModelInfo] | None = None,
    on_replay: Callable[[], None] | None = None,
) -> FastAPI:
    """The admin web application over ``db``.

    ``on_replay`` is called after dead letters are put back in the queue (the running sender's
    wake-up); ``model_info()`` tells the status page about the model loaded now.
    """
    web = settings.web
    app = FastAPI(title="strnet admin", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = WebContext(
        db=db,
        idle_timeout_s=web.idle_timeout_s,
        secure_cookies=bool(web.tls_cert_file) or web.behind_tls_proxy,
    )
    app.state.settings = settings
    app.state.templates = templates()
    app.state.login_forms = LoginForms(load_secret(web.session_secret, settings.data_dir))
    app.state.model_info = model_info or ModelInfo
    app.state.on_replay = on_replay or (lambda: None)
    app.state.results_dir = settings.results_dir

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith(_CACHEABLE_PREFIXES):
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        if app.state.ctx.secure_cookies:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if request.url.path.endswith(_NON_PAGE_SUFFIXES):
            return PlainTextResponse("login required", status_code=401)
        return RedirectResponse("/login?expired=1" if exc.expired else "/login", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        sess = getattr(request.state, "session", None)
        record_access(
            db,
            "security_alert",
            actor=sess.user.username if sess else "unknown",
            action="E",
            outcome=4,
            detail={"refused": "role", "path": request.url.path, "method": request.method},
        )
        return render(
            request,
            "error.html",
            {"title": "Not allowed", "message": "Your role does not give access to this page."},
            403,
        )

    @app.exception_handler(CsrfFailed)
    async def _csrf(request: Request, exc: CsrfFailed) -> Response:
        sess = getattr(request.state, "session", None)
        record_access(
            db,
            "security_alert",
            actor=sess.user.username if sess else "unknown",
            action="E",
            outcome=4,
            detail={"refused": "csrf", "path": request.url.path},
        )
        message = "The form was not valid any more. Reload the page and try again."
        return render(request, "error.html", {"title": "Form expired", "message": message}, 403)

    app.include_router(ops.router)
    app.include_router(auth_routes.router)
    app.include_router(patients.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
