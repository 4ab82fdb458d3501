"""The admin web: FastAPI with server-rendered Jinja2 templates (no front-end build step).

``create_app`` receives everything it needs (settings, database, callables); it builds nothing
else. ``agent/app.py`` runs it in a thread of ``strnet serve``.

Imports in ``agent/web`` point one way: this module (the application, its middleware and error
pages) includes the routers of ``routes/``; they and this module render pages with
``render.py`` and check sessions with ``auth.py``, which import neither.

What a hostile client meets before any route runs (docs/security.md): ``_SecurityHeaders``
(outermost: every answer, errors included, carries the security headers) and ``_RequestLimits``
(bodies over ``web.max_form_bytes``, or ``web.max_login_bytes`` for a login, get 413 unread,
whether announced by Content-Length or counted as they stream; multipart, in any of several
Content-Type headers, gets 415; an integer in the path beyond a row id's range gets 404, one in
the query beyond SQLite's range 422). Every error is a page of ``error.html``; client errors log
no traceback.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from agent.config import Settings
from agent.db.engine import Database
from agent.db.worklist import MAX_ROW_ID, record_access
from agent.domain import ServedModel
from agent.logging import get_logger
from agent.web.auth import (
    NEXT_COOKIE,
    CsrfFailed,
    Forbidden,
    LoginForms,
    LoginGate,
    NotLoggedIn,
    NulInForm,
    WebContext,
    load_secret,
    safe_next,
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
_NON_PAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".csv")
# the largest integer SQLite stores; a row id or count beyond it names nothing
SQLITE_MAX_INT = 2**63 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


def security_headers(path: str, secure: bool) -> dict[str, str]:
    """The headers every answer carries (docs/security.md)."""
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }
    if not path.startswith(_CACHEABLE_PREFIXES):
        headers.update({"Cache-Control": "no-store", "Pragma": "no-cache"})
    if secure:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


def _client(request: Request) -> str | None:
    """The client's address as the audit trail records it (the proxy's X-Forwarded-For where believed)."""
    return request.client.host if request.client else None


def error_page(request: Request, status: int, message: str, title: str | None = None) -> Response:
    """An error answer: a page of ``error.html`` (plain text for images and exports)."""
    title = title or HTTPStatus(status).phrase
    if request.url.path.endswith(_NON_PAGE_SUFFIXES):
        return PlainTextResponse(title.lower(), status_code=status)
    return render(request, "error.html", {"title": title, "message": message}, status)


class BodyTooLarge(Exception):
    """A request body went past its limit while it streamed in."""


class _SecurityHeaders:
    """Adds the security headers to every answer that passes through, whoever made it. A route
    may let the browser keep an answer for its user alone (``Cache-Control: private, ...``: the
    patient page's overlay JPEG, ``private, no-cache`` with an ETag); every other answer outside
    /static/ is ``no-store``."""

    def __init__(self, app: ASGIApp, secure: bool) -> None:
        self.app = app
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = security_headers(scope.get("path", ""), self.secure)

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                private = headers.get("cache-control", "").lower().startswith("private")
                for name, value in extra.items():
                    if not (private and name in ("Cache-Control", "Pragma")):
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_secured)


class _RequestLimits:
    """Refuses, before any route runs, what no route of this app takes (module docstring)."""

    def __init__(self, app: ASGIApp, max_body: int, max_login_body: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_login_body = max_login_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message, close = refusal
            await self._answer(request, status, message, close, scope, receive, send)
            return
        limit = self.max_login_body if scope["path"] == "/login" else self.max_body
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        async def noted_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, noted_send)
        except BodyTooLarge:
            if started:
                raise
            await self._answer(request, 413, _TOO_LARGE, True, scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, bool] | None:
        """(status, message, close the connection) for a request refused before routing."""
        raw = scope.get("headers", [])
        # every Content-Type: Starlette parses the first of several, a dict would see the last
        if any(v.strip().lower().startswith(b"multipart/") for k, v in raw if k == b"content-type"):
            return 415, "This site takes no uploads.", True
        headers = {k: v for k, v in raw if k == b"content-length"}
        limit = self.max_login_body if scope["path"] == "/login" else self.max_body
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return 400, "The request was not understood.", True
            if len(length.strip()) > 18 or int(length) > limit:
                return 413, _TOO_LARGE, True
        # every integer in a path is a row id: one past the id columns' range (PostgreSQL's
        # INTEGER, the same on SQLite) names no row
        if any(_beyond(part, MAX_ROW_ID) for part in scope["path"].split("/")):
            return 404, "There is no such page.", False
        query = scope.get("query_string", b"").decode("latin-1")
        if any(_beyond(value, SQLITE_MAX_INT) for _, value in parse_qsl(query, keep_blank_values=True)):
            return 422, "A number in the address is out of range.", False
        return None

    @staticmethod
    async def _answer(
        request: Request, status: int, message: str, close: bool, scope: Scope, receive: Receive, send: Send
    ) -> None:
        response = error_page(request, status, message)
        if close:  # the rest of the body is never read: end the connection after the answer
            response.headers["Connection"] = "close"
        await response(scope, receive, send)


_TOO_LARGE = "The request is larger than this site accepts."


def _beyond(text: str, limit: int) -> bool:
    """Whether ``text`` is a decimal integer beyond ``limit`` either way."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return False
    return len(text.lstrip("+-").lstrip("0")) > len(str(limit)) or abs(int(text)) > limit


def create_app(
    settings: Settings,
    db: Database,
    *,
    model_info: Callable[[], ModelInfo] | None = None,
    on_replay: Callable[[], None] | None = None,
    on_assessed: Callable[[int], object] | None = None,
) -> FastAPI:
    """The admin web application over ``db``.

    ``on_replay`` is called after dead letters are put back in the queue (the running sender's
    wake-up); ``model_info()`` tells the status page about the model loaded now.
    """
    web = settings.web
    app = FastAPI(title="strnet admin", docs_url=None, redoc_url=None, openapi_url=None)
    secure = bool(web.tls_cert_file) or web.behind_tls_proxy
    app.state.ctx = WebContext(
        db=db, idle_timeout_s=web.idle_timeout_s, secure_cookies=secure, max_form_fields=web.max_form_fields
    )
    app.state.settings = settings
    app.state.templates = templates()
    app.state.login_forms = LoginForms(load_secret(web.session_secret, settings.data_dir))
    app.state.login_gate = LoginGate(db, web, salt=settings.agent.site_salt)
    app.state.model_info = model_info or ModelInfo
    app.state.on_replay = on_replay or (lambda: None)
    # after a radiologist's verdict on a study's image: send it onward (FHIR send_assessments)
    app.state.on_assessed = on_assessed or (lambda study_id: 0)
    app.state.results_dir = settings.results_dir
    # the last added is the outermost: headers on everything, limits before everything else
    app.add_middleware(_RequestLimits, max_body=web.max_form_bytes, max_login_body=web.max_login_bytes)
    app.add_middleware(_SecurityHeaders, secure=secure)

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        if request.url.path.endswith(_NON_PAGE_SUFFIXES):
            return PlainTextResponse("login required", status_code=401)
        resp = RedirectResponse("/login?expired=1" if exc.expired else "/login", status_code=303)
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method in ("GET", "HEAD") and safe_next(asked):
            # the page to go to after the login (the login form carries it on as `next`); Lax, so
            # that it comes back with the redirect of a link followed from another site
            resp.set_cookie(
                NEXT_COOKIE,
                quote(asked, safe=""),
                max_age=600,
                httponly=True,
                samesite="lax",
                secure=secure,
                path="/login",
            )
        return resp

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        sess = getattr(request.state, "session", None)
        await run_in_threadpool(
            record_access,
            db,
            "security_alert",
            actor=sess.user.username if sess else "unknown",
            action="E",
            outcome=4,
            detail={"refused": "role", "path": request.url.path, "method": request.method, "client": _client(request)},
        )
        return error_page(request, 403, "Your role does not give access to this page.", "Not allowed")

    @app.exception_handler(CsrfFailed)
    async def _csrf(request: Request, exc: CsrfFailed) -> Response:
        sess = getattr(request.state, "session", None)
        await run_in_threadpool(
            record_access,
            db,
            "security_alert",
            actor=sess.user.username if sess else "unknown",
            action="E",
            outcome=4,
            detail={"refused": "csrf", "path": request.url.path, "client": _client(request)},
        )
        message = "The form was not valid any more. Reload the page and try again."
        return error_page(request, 403, message, "Form expired")

    @app.exception_handler(NulInForm)
    async def _nul(request: Request, exc: NulInForm) -> Response:
        return error_page(request, 400, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: "There is no such page.", 405: "This page does not take that method."}
        response = error_page(request, exc.status_code, messages.get(exc.status_code, "The request was refused."))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        # a path parameter that is not a row id names no page; anything else is a bad request
        if any(err.get("loc", ("",))[0] == "path" for err in exc.errors()):
            return error_page(request, 404, "There is no such page.")
        return error_page(request, 422, "The request was not understood.")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
        response = error_page(request, 413, _TOO_LARGE)
        response.headers["Connection"] = "close"
        return response

    @app.exception_handler(OverflowError)
    async def _overflow(request: Request, exc: OverflowError) -> Response:
        # a number from the request (a page far past the end) beyond what SQLite can compare
        log.warning("web_number_out_of_range", path=request.url.path)
        return error_page(request, 404, "There is no such page.")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody is left to read it

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> Response:
        # answered by Starlette's outermost middleware, past _SecurityHeaders: add them here
        try:
            response = error_page(request, 500, "Something went wrong on the server. Try again later.")
        except Exception:  # noqa: BLE001 - the error page itself failed: plain text then
            response = PlainTextResponse("internal server error", status_code=500)
        response.headers.update(security_headers(request.url.path, secure))
        return response

    app.include_router(ops.router)
    app.include_router(auth_routes.router)
    app.include_router(patients.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
