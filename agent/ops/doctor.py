"""``strnet doctor``: one line per check, exit 1 naming what failed.

Checks the configuration, the database and its migrations, the audit chain, spool space, the
model, and C-ECHO to every configured PACS destination.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _run(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except Exception as exc:  # noqa: BLE001 - each check reports its own failure and the rest still run
        return Check(name, False, str(exc) or exc.__class__.__name__)


def run_checks(settings: Settings, config_source: str) -> list[Check]:
    from agent.audit import trail
    from agent.db.engine import current_revision, head_revision, open_database
    from agent.pacs import dicomweb
    from agent.pacs.scu import echo, tls_args

    checks = [Check("configuration", True, f"loaded from {config_source}")]
    db_holder: list = []

    def database() -> str:
        db = open_database(settings, migrate=False)
        db_holder.append(db)
        current, head = current_revision(db), head_revision()
        if current != head:
            raise RuntimeError(f"schema at {current}, code expects {head}: run `strnet db upgrade`")
        return f"{settings.database_url.split('://')[0]} at revision {current}"

    checks.append(_run("database", database))

    def audit_chain() -> str:
        if not db_holder:
            raise RuntimeError("database unavailable")
        with db_holder[0].reading() as s:
            report = trail.verify(s)
        if not report.ok:
            raise RuntimeError(f"broken at event {report.first_bad_id}: {report.problem}")
        return f"{report.events} events verified"

    checks.append(_run("audit chain", audit_chain))

    def spool_space() -> str:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(settings.data_dir).free // (1024 * 1024)
        need = settings.agent.min_free_disk_mb
        if free_mb < need:
            raise RuntimeError(f"{free_mb} MB free, below the {need} MB watermark: instances are refused")
        return f"{free_mb} MB free (watermark {need} MB)"

    checks.append(_run("spool space", spool_space))

    def model() -> str:
        from agent.pipeline.models import served_threshold, served_weights, verify

        path = served_weights(settings)
        meta = verify(path)
        name, value = served_threshold(meta, settings.worker.threshold)
        return f"{meta.model_version} ({path.name}, sha256 {meta.weights_sha256[:12]}), threshold {name} {value:.4f}"

    if settings.worker.enabled:
        checks.append(_run("model", model))

    for dest in settings.pacs:

        def ping(d=dest) -> str:
            ok, detail = echo(
                d.host,
                d.port,
                d.ae_title,
                d.calling_ae_title or settings.scp.ae_title,
                timeout_s=settings.sender.timeout_s if settings.sender.timeout_s < 10 else 10,
                tls=tls_args(d),  # as the sender reaches it
            )
            if not ok:
                raise RuntimeError(f"C-ECHO {d.ae_title}@{d.host}:{d.port}: {detail}")
            return f"C-ECHO {d.ae_title}@{d.host}:{d.port}: {detail}"

        def web(d=dest) -> str:
            ok, detail = dicomweb.check(d, settings.sender.timeout_s if settings.sender.timeout_s < 10 else 10)
            if not ok:
                raise RuntimeError(f"DICOMweb {d.url}: {detail}")
            return f"DICOMweb {d.url}: {detail}"

        checks.append(_run(f"pacs {dest.name}", web if dest.kind == "dicomweb" else ping))
    for db in db_holder:
        db.dispose()
    return checks
