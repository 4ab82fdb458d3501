"""Server-rendered pages: the Jinja2 environment (templates, filters) and ``render``.

Below both ``agent/web/app.py`` (which builds the environment into ``app.state.templates``) and
the route modules (which render pages with it); it imports neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from agent.dicom_values import format_da

TEMPLATES_DIR = Path(__file__).parent / "templates"


def templates() -> jinja2.Environment:
    """The environment for ``templates/``: every template autoescaped, undefined names an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
    )
    env.filters["dt"] = lambda v: v.strftime("%Y-%m-%d %H:%M") if v else ""
    env.filters["dicom_date"] = format_da
    env.filters["pname"] = lambda n: (n or "").replace("^", " ").strip()
    return env


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """Render a page; the session (if any) gives the user and the CSRF token for its forms."""
    sess = getattr(request.state, "session", None)
    env: jinja2.Environment = request.app.state.templates
    html = env.get_template(template).render(
        user=sess.user if sess else None,
        csrf_token=sess.csrf_token if sess else "",
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)
