"""Run the admin web in a thread of ``strnet serve`` (uvicorn), start and stop on demand.

uvicorn speaks HTTP/1.1 through its h11 protocol with a deadline on each request's arrival
(``web.request_timeout_s``, ``agent/compat/uvicorn_internals.py``), keeps idle connections
``KEEP_ALIVE_S``, bounds a request's line and headers to ``MAX_HEADER_BYTES``, and believes
X-Forwarded-For and X-Forwarded-Proto only from ``trusted_proxies(web)``: ``web.trusted_proxies``,
or 127.0.0.1 (a TLS proxy on the same machine) when ``web.behind_tls_proxy`` is set and that list is
empty, else none.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from agent.compat import PatchMissing, uvicorn_internals, warn_once
from agent.config import WebSection
from agent.errors import ConfigError
from agent.logging import get_logger

log = get_logger(__name__)

KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default)
MAX_HEADER_BYTES = 16 * 1024  # a request head arriving in pieces; more: 400, closed (docs/security.md)


def trusted_proxies(web: WebSection) -> list[str]:
    """The addresses whose X-Forwarded-For and X-Forwarded-Proto are believed: ``web.trusted_proxies``;
    when that is empty and ``web.behind_tls_proxy`` is set, 127.0.0.1 (a TLS proxy on this machine:
    without it every browser would have the proxy's address, and the login throttle's per-address
    counts would be shared by all users); else none."""
    if web.trusted_proxies:
        return list(web.trusted_proxies)
    return ["127.0.0.1"] if web.behind_tls_proxy else []


def _timed_out(client: tuple[str, int] | None) -> None:
    log.debug("web_request_timed_out", client=client[0] if client else None)


class WebServer:
    """uvicorn serving ``app`` on web.bind:web.port (HTTPS when a certificate is configured)."""

    def __init__(self, app: Any, web: WebSection) -> None:
        self.web = web
        kwargs: dict[str, Any] = {}
        if web.tls_cert_file and web.tls_key_file:
            kwargs = {"ssl_certfile": str(web.tls_cert_file), "ssl_keyfile": str(web.tls_key_file)}
        trusted = trusted_proxies(web)
        if trusted:
            kwargs.update(proxy_headers=True, forwarded_allow_ips=trusted)
        else:  # uvicorn would believe 127.0.0.1 by default: any local process could name the client
            kwargs.update(proxy_headers=False)
        self.trusted = trusted
        http: Any = uvicorn_internals.request_timeout_protocol(web.request_timeout_s, on_timeout=_timed_out)
        if isinstance(http, PatchMissing):
            warn_once(log, http)
            http = "h11"
        config = uvicorn.Config(
            app,
            host=web.bind,
            port=web.port,
            http=http,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="off",
            timeout_keep_alive=KEEP_ALIVE_S,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            **kwargs,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.web.tls_cert_file else "http"

    def start(self, timeout_s: float = 15.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="strnet-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("web.port", f"the admin web could not listen on {self.web.bind}:{self.web.port}")
            time.sleep(0.02)
        log.info(
            "web_started",
            bind=self.web.bind,
            port=self.web.port,
            scheme=self.scheme,
            forwarded_headers_from=self.trusted or "nobody",
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
