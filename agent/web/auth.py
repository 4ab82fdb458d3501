"""Passwords, login attempts, sessions, roles and CSRF for the admin web.

- Passwords: argon2id (argon2-cffi defaults), checked in a small pool of threads of their own
  (``web.login_concurrency``; ``web.login_queue`` more may wait, the rest get 503 at once), never
  on the event loop and never inside a database transaction: the user is read, the hash verified,
  then the outcome written in one short transaction (``agent/db/users.py``).
- Login attempts (``LoginGate``): an unknown name is verified against a dummy hash, so a wrong
  name, a wrong password and a disabled user take the same time and get the same answer.
  Failures are throttled in memory by user name and client address, and by client address alone,
  with an exponential back-off (``LoginThrottle``); a throttled attempt is refused unchecked after
  the time a check takes. No hard lock: the right password from another address still logs in.
- Sessions: server side (table ``web_sessions``); the cookie holds a random token, the database
  its SHA-256; idle for ``web.idle_timeout_s`` and the session is gone. A cookie that is not such
  a token is no session.
- CSRF: a per-session token in every form, compared in constant time. The login form, which has
  no session yet, carries a signed nonce that must match a cookie (double submit).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from fastapi import Depends, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.concurrency import run_in_threadpool

from agent.config import WebSection
from agent.db import users
from agent.db.engine import Database
from agent.db.users import SessionView, ThrottleAlert, UserView

SESSION_COOKIE = "strnet_session"
LOGIN_COOKIE = "strnet_login"
NEXT_COOKIE = "strnet_next"  # the page asked for before the login (a local path)
LOGIN_FORM_MAX_AGE_S = 3600
MAX_USERNAME = 64
MAX_NEXT = 2048
# what secrets.token_urlsafe(32) gives; anything else in the session cookie is no session
_SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,128}")

_hasher = PasswordHasher()
_started = time.perf_counter()
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
_DUMMY_HASH_S = time.perf_counter() - _started  # about what one verification takes here


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ValueError("a password has at least 8 characters")
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``; with None (no such user) a dummy hash is verified
    all the same, so that the answer takes as long, and is False."""
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


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
        return hmac.compare_digest(str(nonce).encode(), cookie.encode())


def safe_next(value: object) -> str | None:
    """``value`` when it is a path on this site to go to after the login, else None.

    Accepted: a path of printable ASCII that starts with a single ``/``, without backslash,
    scheme or host (``//evil.example``, ``https://evil.example`` and ``/\\evil`` are refused:
    browsers take each for another site), and not the login page itself.
    """
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_NEXT:
        return None
    if value.startswith("//") or "\\" in value or any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or parts.path.startswith("/login"):
        return None
    return value


# --- login attempts -----------------------------------------------------------------------------


@dataclass
class _Failures:
    failures: int = 0
    last: float = 0.0  # monotonic time of the last failure
    until: float = 0.0  # attempts are refused unchecked before this
    refused: int = 0


class LoginThrottle:
    """Failed logins by (user name, client address) and by client address, in memory.

    ``free`` failures of a key are free; each further one makes the key wait ``backoff_s``,
    doubled per failure, at most ``backoff_max_s``, before an attempt is checked again. Attempts
    refused meanwhile do not lengthen the wait. A key quiet ``backoff_max_s`` after its wait is
    forgotten; at most ``max_keys`` are kept (the least recently failed go first). Names are keyed
    whether or not a user has them, so known and unknown names are throttled alike.
    """

    def __init__(
        self,
        free_per_account: int,
        free_per_client: int,
        backoff_s: float,
        backoff_max_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.free = {"account": free_per_account, "client": free_per_client}
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.max_keys = max_keys
        self._keys: OrderedDict[tuple[str, ...], _Failures] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _keys_of(username: str, client: str | None) -> dict[str, tuple[str, ...]]:
        where = client or "-"
        return {"account": ("account", username.casefold(), where), "client": ("client", where)}

    def _live(self, key: tuple[str, ...], now: float) -> _Failures | None:
        entry = self._keys.get(key)
        if entry is not None and now > max(entry.until, entry.last) + self.backoff_max_s:
            del self._keys[key]
            return None
        return entry

    def wait_s(self, username: str, client: str | None) -> float:
        """Seconds before an attempt for ``username`` from ``client`` is checked again (0: now)."""
        now = self.clock()
        with self._lock:
            entries = [self._live(k, now) for k in self._keys_of(username, client).values()]
            return max([e.until - now for e in entries if e is not None] + [0.0])

    def refused(self, username: str, client: str | None) -> int:
        """Count an attempt refused unchecked; returns how many its throttled keys have refused."""
        now = self.clock()
        with self._lock:
            counts = [0]
            for key in self._keys_of(username, client).values():
                entry = self._live(key, now)
                if entry is not None and entry.until > now:
                    entry.refused += 1
                    counts.append(entry.refused)
            return max(counts)

    def failed(self, username: str, client: str | None) -> list[ThrottleAlert]:
        """Count a failure; returns the throttling it started (at the first failure past the free ones)."""
        now = self.clock()
        started = []
        with self._lock:
            for scope, key in self._keys_of(username, client).items():
                entry = self._live(key, now) or _Failures()
                entry.failures += 1
                entry.last = now
                over = entry.failures - self.free[scope]
                if over >= 0:
                    backoff = min(self.backoff_s * 2.0**over, self.backoff_max_s)
                    entry.until = now + backoff
                    if over == 0:
                        started.append(ThrottleAlert(scope, backoff))
                self._keys[key] = entry
                self._keys.move_to_end(key)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        return started

    def succeeded(self, username: str, client: str | None) -> None:
        """A right password from ``client``: the (name, address) pair starts afresh."""
        with self._lock:
            self._keys.pop(self._keys_of(username, client)["account"], None)


@dataclass(frozen=True)
class LoginOutcome:
    """A login attempt's answer: the user when it succeeded; ``busy`` when it was not checked for
    want of a free password-check slot (nothing was recorded)."""

    user: UserView | None = None
    busy: bool = False


class LoginGate:
    """Checks login attempts: throttle, password check in the bounded pool, outcome recorded."""

    def __init__(self, db: Database, web: WebSection, salt: str = "strnet") -> None:
        self.db = db
        self.salt = salt  # agent.site_salt: hashes a user name that no user has, in the audit trail
        self.throttle = LoginThrottle(
            web.login_free_failures, web.login_free_failures_per_client, web.login_backoff_s, web.login_backoff_max_s
        )
        self._pool = ThreadPoolExecutor(max_workers=web.login_concurrency, thread_name_prefix="strnet-login")
        self._max_pending = web.login_concurrency + web.login_queue
        self._pending = 0
        self._lock = threading.Lock()
        self._check_s = max(_DUMMY_HASH_S, 0.01)  # moving average of a password check's duration

    async def attempt(self, username: str, password: str, client: str | None) -> LoginOutcome:
        if self.throttle.wait_s(username, client) > 0:
            await asyncio.sleep(self._check_s)  # as long as a check would take, without its CPU
            refused = self.throttle.refused(username, client)
            if refused & (refused - 1) == 0:  # audit the 1st, 2nd, 4th, 8th ... refusal of a key
                record = partial(
                    users.record_login,
                    verified_hash=None,
                    throttled=True,
                    client=client,
                    refused=refused,
                    salt=self.salt,
                )
                await run_in_threadpool(record, self.db, username)
            return LoginOutcome()
        checked = await self._check(username, password)
        if checked is None:
            return LoginOutcome(busy=True)
        verified_hash, disabled = checked
        alerts = [] if verified_hash is not None and not disabled else self.throttle.failed(username, client)
        record = partial(users.record_login, verified_hash=verified_hash, client=client, alerts=alerts, salt=self.salt)
        result = await run_in_threadpool(record, self.db, username)
        if result.ok:
            self.throttle.succeeded(username, client)
        return LoginOutcome(result.user if result.ok else None)

    async def _check(self, username: str, password: str) -> tuple[str | None, bool] | None:
        """(the hash the password matched or None, whether the user is disabled), computed in the
        pool; None when the pool and its queue are full."""
        with self._lock:
            if self._pending >= self._max_pending:
                return None
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._check_now, username, password)
        finally:
            with self._lock:
                self._pending -= 1

    def _check_now(self, username: str, password: str) -> tuple[str | None, bool]:
        started = time.perf_counter()
        candidate = users.login_candidate(self.db, username)
        ok = verify_password(candidate.password_hash, password)
        self._check_s = 0.8 * self._check_s + 0.2 * (time.perf_counter() - started)
        disabled = candidate.user is not None and candidate.user.disabled
        return (candidate.password_hash if ok else None), disabled

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- sessions, roles, forms ---------------------------------------------------------------------


class NotLoggedIn(Exception):
    def __init__(self, expired: bool = False) -> None:
        self.expired = expired


class Forbidden(Exception):
    pass


class CsrfFailed(Exception):
    pass


class NulInForm(Exception):
    """A form field holds a NUL character (%00): no text column takes it (PostgreSQL refuses it)."""

    message = "A field of the form holds a NUL character (%00), which cannot be stored. Remove it and send again."


def holds_nul(form: dict[str, str]) -> bool:
    """Whether a value of ``form`` holds a NUL character."""
    return any("\x00" in value for value in form.values())


@dataclass(frozen=True)
class WebContext:
    db: Database
    idle_timeout_s: float
    secure_cookies: bool
    max_form_fields: int = 16


def current_session(request: Request) -> SessionView:
    ctx: WebContext = request.app.state.ctx
    token = request.cookies.get(SESSION_COOKIE)
    if not token or not _SESSION_TOKEN.fullmatch(token):
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


PHI_ROLES = ("viewer", "admin", "radiologist")
ALL_ROLES = ("viewer", "admin", "auditor", "radiologist")


async def read_form(request: Request) -> dict[str, str]:
    """The submitted form's text fields (uploads are none of ours): at most ``web.max_form_fields``
    of them (more: 400), its body already bounded by the size limits of ``agent/web/app.py``."""
    ctx: WebContext = request.app.state.ctx
    form = await request.form(max_files=0, max_fields=ctx.max_form_fields)
    return {k: v for k, v in form.multi_items() if isinstance(v, str)}


async def check_csrf(request: Request, sess: SessionView) -> dict[str, str]:
    """The submitted form, once its CSRF token matches the session's; else CsrfFailed. Then
    NulInForm (400) if a field holds a NUL character."""
    form = await read_form(request)
    token = form.get("csrf_token")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), sess.csrf_token.encode()):
        raise CsrfFailed()
    if holds_nul(form):
        raise NulInForm()
    return form


# the session a route needs, by who may use it (FastAPI dependencies as annotated types)
PhiSession = Annotated[SessionView, Depends(require(*PHI_ROLES))]
AnySession = Annotated[SessionView, Depends(require(*ALL_ROLES))]
AdminSession = Annotated[SessionView, Depends(require("admin"))]
AuditorSession = Annotated[SessionView, Depends(require("auditor"))]
# confirms or rejects a flagged image (the FLS pathway's first step)
RadiologistSession = Annotated[SessionView, Depends(require("radiologist"))]
