"""Admin-web users and server-side sessions (the web and ``strnet users`` go through here).

Passwords arrive already hashed or are checked by a ``verify`` callable: this module knows no
hashing scheme. Lockout: ``max_failures`` wrong passwords in a row lock the account for
``lock_s`` seconds; every outcome is written to the audit trail by the caller's transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from agent.audit import trail
from agent.clock import utcnow
from agent.db.engine import Database
from agent.db.models import User, WebSession

ROLES = ("viewer", "admin", "auditor")


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
class LoginResult:
    ok: bool
    user: UserView | None = None
    reason: str | None = None  # "unknown", "disabled", "locked", "bad_password", "locked_now"


def login(
    db: Database,
    username: str,
    verify: Callable[[str | None], bool],
    *,
    max_failures: int,
    lock_s: float,
    client: str | None = None,
) -> LoginResult:
    """Check a login attempt, count failures, lock after ``max_failures``; audited either way.

    ``verify(hash)`` checks the offered password against the stored hash (``None``: no such user,
    verify against a dummy to keep timing alike).
    """
    now = utcnow()
    with db.transaction() as s:
        u = s.execute(select(User).where(User.username == username)).scalar_one_or_none()
        if u is None:
            verify(None)
            result = LoginResult(False, None, "unknown")
        elif u.disabled:
            verify(u.password_hash)
            result = LoginResult(False, _view(u), "disabled")
        elif u.locked_until is not None and u.locked_until > now:
            result = LoginResult(False, _view(u), "locked")
        elif verify(u.password_hash):
            u.failed_logins = 0
            u.locked_until = None
            result = LoginResult(True, _view(u))
        else:
            u.failed_logins += 1
            if u.failed_logins >= max_failures:
                u.locked_until = now + timedelta(seconds=lock_s)
                u.failed_logins = 0
                result = LoginResult(False, _view(u), "locked_now")
            else:
                result = LoginResult(False, _view(u), "bad_password")
        actor = username[:64] if u is not None else "unknown-user"
        detail = {"client": client, "reason": result.reason}
        if not result.ok and u is None:
            detail["username"] = username[:64]
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
        if result.reason == "locked_now":
            trail.append(
                s,
                "security_alert",
                actor=actor,
                action="E",
                outcome=8,
                object_type="user",
                object_id=str(u.id) if u else None,
                detail={"alert": "account_locked", "for_s": lock_s, "client": client},
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
