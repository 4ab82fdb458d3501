"""Admin-web users and server-side sessions (the web and ``strnet users`` go through here).

Passwords arrive already hashed: this module knows no hashing scheme. A login attempt is read
(``login_candidate``, no write lock), checked by the caller outside any transaction, and its
outcome written in one short transaction (``record_login``) with its audit events. There is no
hard lock: the web throttles failed attempts per client address (``agent/web/auth.py``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import User, WebSession

ROLES = ("viewer", "admin", "auditor", "radiologist")


@dataclass(frozen=True)
class UserView:
    id: int
    username: str
    role: str
    disabled: bool
    locked_until: datetime | None
    created_at: datetime


def _view(u: User) -> UserView:
    return UserView(u.id, u.username, u.role, u.disabled, u.locked_until, u.created_at)


def add_user(db: Database, username: str, role: str, password_hash: str, actor: str = "strnet-cli") -> UserView:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    with db.transaction() as s:
        if s.execute(select(User.id).where(User.username == username)).first():
            raise ValueError(f"user {username!r} exists")
        u = User(
            username=username,
            password_hash=password_hash,
            role=role,
            disabled=False,
            failed_logins=0,
            created_at=utcnow(),
        )
        s.add(u)
        s.flush()
        trail.append(
            s,
            "security_alert",
            actor=actor,
            action="C",
            object_type="user",
            object_id=str(u.id),
            detail={"change": "user_added", "username": username, "role": role},
        )
        return _view(u)


def list_users(db: Database) -> list[UserView]:
    with db.reading() as s:
        return [_view(u) for u in s.execute(select(User).order_by(User.username)).scalars()]


def disable_user(db: Database, username: str, actor: str = "strnet-cli") -> bool:
    with db.transaction() as s:
        u = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if u is None:
            return False
        u.disabled = True
        s.execute(delete(WebSession).where(WebSession.user_id == u.id))
        trail.append(
            s,
            "security_alert",
            actor=actor,
            action="U",
            object_type="user",
            object_id=str(u.id),
            detail={"change": "user_disabled", "username": username},
        )
        return True


@dataclass(frozen=True)
class LoginCandidate:
    """What a login attempt is checked against, read outside any write transaction: the user (None
    when no user has that name) and the stored password hash."""

    user: UserView | None
    password_hash: str | None


def login_candidate(db: Database, username: str) -> LoginCandidate:
    """The user named ``username`` and their password hash (a read: takes no write lock)."""
    with db.reading() as s:
        u = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
        return LoginCandidate(None, None) if u is None else LoginCandidate(_view(u), u.password_hash)


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    user: UserView | None = None
    reason: str | None = None  # "unknown", "disabled", "bad_password", "throttled"


@dataclass(frozen=True)
class ThrottleAlert:
    """Throttling of failed logins started: for the user name from one client address
    (``scope="account"``) or for the client address whatever the names (``scope="client"``)."""

    scope: str
    backoff_s: float


def typed_name_hash(username: str, salt: str) -> str:
    """A short salted SHA-256 of a user name that no user has (16 hex digits): attempts with the
    same typed name can be correlated in the audit trail, and a password typed into the name
    field is not kept."""
    return hashlib.sha256(salt.encode("utf-8") + b"\0" + username.encode("utf-8", "replace")).hexdigest()[:16]


def record_login(
    db: Database,
    username: str,
    *,
    verified_hash: str | None,
    throttled: bool = False,
    client: str | None = None,
    refused: int | None = None,
    alerts: Sequence[ThrottleAlert] = (),
    salt: str = "strnet",
) -> LoginResult:
    """Write the outcome of a login attempt in one short transaction, audited either way.

    ``verified_hash`` is the stored hash that the offered password was verified against outside
    any transaction (None: it did not match, or there was no user); the attempt succeeds only if
    the user still has that hash and is not disabled. ``throttled``: the attempt was refused
    unchecked (``refused``: how many were, so far, for its throttled pair or address).
    ``alerts``: throttling that this failure started, each a ``Security Alert``. No hard lock: a
    user's ``failed_logins`` counts consecutive failures for the record only. A name no user has
    is audited only as ``username_sha256`` (:func:`typed_name_hash` with ``salt``, the site salt).
    """
    with db.transaction() as s:
        u = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if throttled:
            result = LoginResult(False, _view(u) if u else None, "throttled")
        elif u is None:
            result = LoginResult(False, None, "unknown")
        elif u.disabled:
            result = LoginResult(False, _view(u), "disabled")
        elif verified_hash is not None and verified_hash == u.password_hash:
            u.failed_logins = 0
            u.locked_until = None
            result = LoginResult(True, _view(u))
        else:
            u.failed_logins += 1
            result = LoginResult(False, _view(u), "bad_password")
        actor = username[:64] if u is not None else "unknown-user"
        detail: dict[str, object] = {"client": client, "reason": result.reason}
        if refused is not None:
            detail["refused_so_far"] = refused
        if not result.ok and u is None:  # often a password typed into the name field: never kept
            detail["username_sha256"] = typed_name_hash(username, salt)
        trail.append(
            s,
            "login",
            actor=actor,
            action="E",
            outcome=0 if result.ok else 4,
            object_type="user",
            object_id=str(u.id) if u else None,
            detail=detail,
        )
        for alert in alerts:
            trail.append(
                s,
                "security_alert",
                actor=actor,
                action="E",
                outcome=8,
                object_type="user",
                object_id=str(u.id) if u else None,
                detail={
                    "alert": "login_throttled",
                    "scope": alert.scope,
                    "backoff_s": alert.backoff_s,
                    "client": client,
                },
            )
        return result


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def open_session(db: Database, user_id: int) -> str:
    """A new session; returns the cookie token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with db.transaction() as s:
        s.add(
            WebSession(
                token_sha256=_sha(token),
                user_id=user_id,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                last_seen_at=now,
            )
        )
    return token


@dataclass(frozen=True)
class SessionView:
    id: int
    user: UserView
    csrf_token: str


def touch_session(db: Database, token: str, idle_s: float) -> tuple[SessionView | None, bool]:
    """The live session for ``token`` (its idle clock restarted), else None.

    The second value is True when the session existed but had been idle too long (it is removed
    and the logoff audited).
    """
    now = utcnow()
    with db.transaction() as s:
        row = s.execute(
            select(WebSession, User)
            .join(User, User.id == WebSession.user_id)
            .where(WebSession.token_sha256 == _sha(token))
        ).first()
        if row is None:
            return None, False
        sess, u = row
        if u.disabled:
            s.delete(sess)
            return None, False
        if now - sess.last_seen_at > timedelta(seconds=idle_s):
            s.delete(sess)
            trail.append(
                s,
                "logout",
                actor=u.username,
                object_type="user",
                object_id=str(u.id),
                detail={"reason": "idle_timeout"},
            )
            return None, True
        sess.last_seen_at = now
        return SessionView(sess.id, _view(u), sess.csrf_token), False


def close_session(db: Database, token: str) -> None:
    with db.transaction() as s:
        row = s.execute(
            select(WebSession, User)
            .join(User, User.id == WebSession.user_id)
            .where(WebSession.token_sha256 == _sha(token))
        ).first()
        if row is None:
            return
        sess, u = row
        s.delete(sess)
        trail.append(s, "logout", actor=u.username, object_type="user", object_id=str(u.id), detail={"reason": "user"})
