"""Login and logout.

A login attempt goes through ``LoginGate`` (``agent/web/auth.py``): one answer, 401 with one
message, for a wrong password, an unknown name, a disabled user and a throttled attempt; 503 when
every password-check slot is taken. After the login the browser goes to the page it asked for
(``next``: a hidden field of the form, filled from ``?next=`` or from the cookie that the redirect
to the login page set), when that is a local path; else to the user's home page.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agent.db import users
from agent.web.auth import (
    LOGIN_COOKIE,
    MAX_USERNAME,
    NEXT_COOKIE,
    SESSION_COOKIE,
    AnySession,
    LoginGate,
    check_csrf,
    read_form,
    safe_next,
)
from agent.web.render import render

router = APIRouter()

LOGIN_FAILED = (
    "Login failed: the user name or password is wrong, or there were too many failed attempts. "
    "Wait a moment and try again."
)
LOGIN_BUSY = "The server is busy checking other logins. Try again in a moment."
LOGIN_NUL = "A user name never holds a NUL character (%00). Type it again."


def _login_page(request: Request, next_path: str | None, error: str | None = None, status_code: int = 200) -> Response:
    cookie, token = request.app.state.login_forms.issue()
    expired = request.query_params.get("expired") == "1"
    context = {"login_token": token, "error": error, "expired": expired, "next": next_path or ""}
    resp = render(request, "login.html", context, status_code)
    resp.set_cookie(
        LOGIN_COOKIE,
        cookie,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=request.app.state.ctx.secure_cookies,
        path="/login",
    )
    return resp


@router.get("/login")
def login_form(request: Request) -> Response:
    asked = request.query_params.get("next")
    if asked is None:
        asked = unquote(request.cookies.get(NEXT_COOKIE, ""))
    return _login_page(request, safe_next(asked))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await read_form(request)
    token, username, password = (form.get(k) for k in ("login_token", "username", "password"))
    next_path = safe_next(form.get("next"))
    if not request.app.state.login_forms.check(request.cookies.get(LOGIN_COOKIE), token):
        return _login_page(request, next_path, "The login form expired. Please try again.", 403)
    if not username or not password or not username.strip():
        return _login_page(request, next_path, "Enter your user name and password.", 400)
    if "\x00" in username:  # no user has such a name, and PostgreSQL cannot even look it up
        return _login_page(request, next_path, LOGIN_NUL, 400)
    ctx = request.app.state.ctx
    gate: LoginGate = request.app.state.login_gate
    client = request.client.host if request.client else None
    outcome = await gate.attempt(username.strip()[:MAX_USERNAME], password, client)
    if outcome.busy:
        resp = _login_page(request, next_path, LOGIN_BUSY, 503)
        resp.headers["Retry-After"] = "2"
        return resp
    if outcome.user is None:
        return _login_page(request, next_path, LOGIN_FAILED, 401)
    session_token = await run_in_threadpool(users.open_session, ctx.db, outcome.user.id)
    home = "/status" if outcome.user.role == "auditor" else "/flagged"
    resp = RedirectResponse(next_path or home, status_code=303)
    resp.set_cookie(
        SESSION_COOKIE, session_token, httponly=True, samesite="strict", secure=ctx.secure_cookies, path="/"
    )
    resp.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict")
    resp.delete_cookie(NEXT_COOKIE, path="/login", httponly=True, samesite="lax")
    return resp


@router.post("/logout")
async def logout(request: Request, sess: AnySession) -> Response:
    await check_csrf(request, sess)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await run_in_threadpool(users.close_session, request.app.state.ctx.db, token)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return resp


@router.get("/")
def home(sess: AnySession) -> Response:
    return RedirectResponse("/status" if sess.user.role == "auditor" else "/flagged", status_code=303)
