"""Login and logout."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from agent.db import users
from agent.web.auth import (
    LOCK_S,
    LOGIN_COOKIE,
    MAX_FAILURES,
    SESSION_COOKIE,
    AnySession,
    check_csrf,
    password_checker,
)
from agent.web.render import render

router = APIRouter()


def _login_page(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    cookie, token = request.app.state.login_forms.issue()
    expired = request.query_params.get("expired") == "1"
    resp = render(request, "login.html", {"login_token": token, "error": error, "expired": expired}, status_code)
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
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    token, username, password = (form.get(k) for k in ("login_token", "username", "password"))
    offered = token if isinstance(token, str) else None
    if not request.app.state.login_forms.check(request.cookies.get(LOGIN_COOKIE), offered):
        return _login_page(request, "The login form expired. Please try again.", 403)
    if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
        return _login_page(request, "Enter your user name and password.", 400)
    ctx = request.app.state.ctx
    result = users.login(
        ctx.db,
        username.strip()[:64],
        password_checker(password),
        max_failures=MAX_FAILURES,
        lock_s=LOCK_S,
        client=request.client.host if request.client else None,
    )
    if not result.ok or result.user is None:
        msg = "User name or password is wrong."
        if result.reason in ("locked", "locked_now"):
            msg = "Too many failed attempts: this account is locked for 15 minutes."
        return _login_page(request, msg, 401)
    session_token = users.open_session(ctx.db, result.user.id)
    resp = RedirectResponse("/status" if result.user.role == "auditor" else "/flagged", status_code=303)
    resp.set_cookie(
        SESSION_COOKIE, session_token, httponly=True, samesite="strict", secure=ctx.secure_cookies, path="/"
    )
    resp.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict")
    return resp


@router.post("/logout")
async def logout(request: Request, sess: AnySession) -> Response:
    await check_csrf(request, sess)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        users.close_session(request.app.state.ctx.db, token)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return resp


@router.get("/")
def home(sess: AnySession) -> Response:
    return RedirectResponse("/status" if sess.user.role == "auditor" else "/flagged", status_code=303)
