"""Run the admin web in a thread of ``strnet serve`` (uvicorn), start and stop on demand."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from agent.config import WebSection
from agent.errors import ConfigError
from agent.logging import get_logger

log = get_logger(__name__)


class WebServer:
    """uvicorn serving ``app`` on web.bind:web.port (HTTPS when a certificate is configured)."""

    def __init__(self, app: Any, web: WebSection) -> None:
        self.web = web
        kwargs: dict[str, Any] = {}
        if web.tls_cert_file and web.tls_key_file:
            kwargs = {"ssl_certfile": str(web.tls_cert_file), "ssl_keyfile": str(web.tls_key_file)}
        if web.behind_tls_proxy:
            kwargs.update(proxy_headers=True, forwarded_allow_ips="127.0.0.1")
        config = uvicorn.Config(
            app,
            host=web.bind,
            port=web.port,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="off",
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
        log.info("web_started", bind=self.web.bind, port=self.web.port, scheme=self.scheme)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
