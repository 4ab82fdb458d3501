"""``strnet users add|list|disable``: the people who may use the admin web."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.db.engine import Database

users_app = typer.Typer(help="Admin-web users (roles: viewer, admin, auditor, radiologist).", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (default ./agent.toml when present)."),
]


def _db(config: Path | None) -> Database:
    from agent.config import load_settings
    from agent.db.engine import open_database

    return open_database(load_settings(config))


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (log-in name).")],
    role: Annotated[str, typer.Option(help="viewer, admin, auditor or radiologist.")] = "viewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Add a user; the password is asked for (or read from stdin) and stored as an argon2 hash."""
    from agent.db.users import ROLES, add_user
    from agent.web.auth import hash_password

    if role not in ROLES:
        raise ConfigError("--role", f"one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
        raise ConfigError("NAME", "1 to 64 printable characters without surrounding spaces")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise ConfigError("password", str(exc)) from None
    try:
        user = add_user(_db(config), name, role, hashed)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"added {user.username} ({user.role})")


@users_app.command("list")
def users_list(config: ConfigOpt = None) -> None:
    """List users, their role and whether they are disabled (failed logins are throttled per client
    address, never locked: docs/security.md)."""
    from agent.db.users import list_users

    rows = list_users(_db(config))
    typer.echo(f"{'USER':<24} {'ROLE':<8} {'STATE':<10} CREATED (UTC)")
    for u in rows:
        state = "disabled" if u.disabled else "active"
        typer.echo(f"{u.username:<24} {u.role:<8} {state:<10} {u.created_at:%Y-%m-%d %H:%M}")
    typer.echo(f"{len(rows)} user(s)")


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="User name.")], config: ConfigOpt = None) -> None:
    """Disable a user and end their sessions (the row stays, for the audit trail)."""
    from agent.db.users import disable_user

    if not disable_user(_db(config), name):
        typer.echo(f"no such user: {name}", err=True)
        raise typer.Exit(1)
    typer.echo(f"disabled {name}")
