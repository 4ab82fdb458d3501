"""Passwords, sessions, roles and CSRF for the admin web.

- Passwords: argon2id (argon2-cffi defaults); a dummy hash is verified for unknown users so a
  wrong name and a wrong password take the same time.
- Sessions: server side (table ``web_sessions``); the cookie holds a random token, the database
  its SHA-256; idle for ``web.idle_timeout_s`` and the session is gone.
- CSRF: a per-session token in every form, compared in constant time. The login form, which has
  no session yet, carries a signed nonce that must match a cookie (double submit).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Depends, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from agent.db import users
from agent.db.engine import Database
from agent.db.users import SessionView

SESSION_COOKIE = "strnet_session"
LOGIN_COOKIE = "strnet_login"
MAX_FAILURES = 5
LOCK_S = 15 * 60
LOGIN_FORM_MAX_AGE_S = 3600

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("a password has at least 8 characters")
    return _hasher.hash(password)


def password_checker(password: str) -> Callable[[str | None], bool]:
    """A ``verify(hash)`` callable for :func:`agent.db.users.login`."""

    def verify(stored: str | None) -> bool:
        try:
            return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return verify


def load_secret(configured: str | None, data_dir: Path) -> str:
    """The configured key, else a random one kept (mode 0600) in data_dir/web_secret."""
    if configured:
        return configured
    path = data_dir / "web_secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


class LoginForms:
    """Signed nonces for the login form (CSRF before there is a session)."""

    def __init__(self, secret: str) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="strnet-login-form")

    def issue(self) -> tuple[str, str]:
        """(cookie value, form token)."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._s.dumps(nonce)

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        try:
            nonce = self._s.loads(token, max_age=LOGIN_FORM_MAX_AGE_S)
        except BadSignature:
            return False
        return hmac.compare_digest(str(nonce), cookie)


class NotLoggedIn(Exception):
    def __init__(self, expired: bool = False) -> None:
        self.expired = expired


class Forbidden(Exception):
    pass


class CsrfFailed(Exception):
    pass


@dataclass(frozen=True)
class WebContext:
    db: Database
    idle_timeout_s: float
    secure_cookies: bool


def current_session(request: Request) -> SessionView:
    ctx: WebContext = request.app.state.ctx
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise NotLoggedIn()
    sess, expired = users.touch_session(ctx.db, token, ctx.idle_timeout_s)
    if sess is None:
        raise NotLoggedIn(expired)
    request.state.session = sess
    return sess


def require(*roles: str) -> Callable[[Request], SessionView]:
    """A dependency: the live session, whose user holds one of ``roles``."""

    def dep(request: Request) -> SessionView:
        sess = current_session(request)
        if sess.user.role not in roles:
            raise Forbidden()
        return sess

    return dep


PHI_ROLES = ("viewer", "admin")
ALL_ROLES = ("viewer", "admin", "auditor")


async def check_csrf(request: Request, sess: SessionView) -> dict[str, str]:
    """The submitted form, once its CSRF token matches the session's; else CsrfFailed."""
    form = await request.form()
    token = form.get("csrf_token")
    if not isinstance(token, str) or not hmac.compare_digest(token, sess.csrf_token):
        raise CsrfFailed()
    return {k: v for k, v in form.items() if isinstance(v, str)}


# the session a route needs, by who may use it (FastAPI dependencies as annotated types)
PhiSession = Annotated[SessionView, Depends(require(*PHI_ROLES))]
AnySession = Annotated[SessionView, Depends(require(*ALL_ROLES))]
AdminSession = Annotated[SessionView, Depends(require("admin"))]
AuditorSession = Annotated[SessionView, Depends(require("auditor"))]
