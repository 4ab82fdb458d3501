"""The ``strnet`` command. Every subcommand takes ``--config FILE``.

Exit codes: 0 success, 1 failure of the operation, 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.exc import OperationalError

from agent.clock import iso_z
from agent.config import Settings, load_settings
from agent.dicom_values import format_da
from agent.errors import ConfigError, redact
from agent.web.users_cli import users_app

app = typer.Typer(
    name="strnet",
    help="strnet-agent: bone-loss screening of knee radiographs beside PACS. NOT FOR DIAGNOSTIC USE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect and replay jobs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema and maintenance.", no_args_is_help=True)
config_app = typer.Typer(help="Show the configuration.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
flagged_app = typer.Typer(help="The flagged-patient registry.", no_args_is_help=True)
app.add_typer(flagged_app, name="flagged")
app.add_typer(users_app, name="users")
outbox_app = typer.Typer(help="The results being delivered to PACS, and what became of each.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file (default ./agent.toml when present)."),
]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    from agent.logging import configure_logging

    settings = load_settings(config, **overrides)
    configure_logging(settings.agent.log_level, settings.agent.log_format, settings.agent.site_salt)
    return settings


@app.command()
def serve(
    config: ConfigOpt = None,
    no_web: Annotated[bool, typer.Option("--no-web", help="Do not serve the admin web.")] = False,
) -> None:
    """Run the agent (and the admin web) until SIGINT or SIGTERM, then stop cleanly."""
    from agent.app import Agent

    settings = _settings(config)
    agent = Agent.build(settings, web=settings.web.enabled and not no_web)
    done = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    agent.start()
    done.wait()
    agent.stop()


@app.command()
def echo(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Peer address (default: the agent itself).")] = None,
    port: Annotated[int | None, typer.Option(help="Peer port (default: scp.port).")] = None,
    aet: Annotated[str | None, typer.Option(help="Called AE title (default: scp.ae_title).")] = None,
    calling_aet: Annotated[str | None, typer.Option(help="Our AE title (default: scp.ae_title).")] = None,
    timeout_s: Annotated[float, typer.Option(help="Network timeout in seconds.")] = 10.0,
) -> None:
    """Send C-ECHO and exit 0 only on success (to the agent itself: over TLS when [scp.tls] is on)."""
    from agent.pacs.scu import echo as send_echo
    from agent.pacs.scu import self_tls_args

    settings = _settings(config)
    target_host = host or ("127.0.0.1" if settings.scp.bind in ("0.0.0.0", "::") else settings.scp.bind)
    ok, detail = send_echo(
        target_host,
        port or settings.scp.port,
        aet or settings.scp.ae_title,
        calling_aet or settings.scp.ae_title,
        timeout_s=timeout_s,
        tls=None if host else self_tls_args(settings.scp.tls, target_host),
    )
    typer.echo(f"C-ECHO {target_host}:{port or settings.scp.port}: {detail}")
    raise typer.Exit(0 if ok else 1)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOpt = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 1000,
) -> None:
    """List jobs (no patient data is shown)."""
    from agent.db.engine import open_database
    from agent.domain import JobState
    from agent.queue.store import list_jobs

    settings = _settings(config)
    wanted = None
    if state:
        try:
            wanted = JobState(state.upper())
        except ValueError:
            raise ConfigError("--state", f"one of {', '.join(s.value for s in JobState)}") from None
    if fmt not in ("table", "json"):
        raise ConfigError("--format", "table or json")
    db = open_database(settings)
    jobs = list_jobs(db, wanted, limit)
    if fmt == "json":
        typer.echo(json.dumps([
            {
                "job_id": j.job_id, "sop_instance_uid": j.sop_instance_uid,
                "study_instance_uid": j.study_instance_uid, "state": j.state.value,
                "reason": j.reason, "received_at": iso_z(j.received_at),
                "calling_ae": j.calling_ae, "attempts": j.attempts,
            }
            for j in jobs
        ], indent=2))
        return
    typer.echo(f"{'JOB':>6}  {'STATE':<8}  {'RECEIVED (UTC)':<19}  {'FROM':<16}  SOP INSTANCE UID / REASON")
    for j in jobs:
        typer.echo(
            f"{j.job_id:>6}  {j.state.value:<8}  {j.received_at:%Y-%m-%d %H:%M:%S}  {j.calling_ae:<16}  "
            f"{j.sop_instance_uid}" + (f"  ({j.reason})" if j.reason else "")
        )
    typer.echo(f"{len(jobs)} job(s)")


@jobs_app.command("retry")
def jobs_retry(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids to replay.")] = None,
    config: ConfigOpt = None,
    dead: Annotated[
        bool, typer.Option("--dead", help="Replay every DEAD job, dead letter and SR given up.")
    ] = False,
) -> None:
    """Replay failed or dead jobs, their undelivered results and their studies' SRs that could not
    be built (the running agent picks them up)."""
    from agent.audit import trail
    from agent.db.engine import open_database
    from agent.queue import outbox, screening, store

    if not job_ids and not dead:
        raise ConfigError("jobs retry", "give job ids or --dead")
    db = open_database(_settings(config))
    if dead:
        jobs_n = store.replay(db, None)
        items_n = outbox.replay_dead(db, None)
        reports_n = screening.replay_failed_reports(db, None)
    else:
        ids = list(job_ids or [])
        jobs_n = store.replay(db, ids)
        study_ids = store.study_ids_of_jobs(db, ids)
        items_n = outbox.replay_dead(db, study_ids)
        reports_n = screening.replay_failed_reports(db, study_ids)
    with db.transaction() as s:
        trail.append(s, "application_activity", actor="strnet-cli", action="U",
                     detail={"activity": "replay", "jobs": jobs_n, "results": items_n, "reports": reports_n})
    typer.echo(f"requeued {jobs_n} job(s) and {items_n} undelivered result(s); {reports_n} SR(s) to build again")


def _utc(when: Any) -> str | None:
    """A stored time as ISO 8601 in UTC with Z."""
    return None if when is None else iso_z(when)


@outbox_app.command("list")
def outbox_list(
    config: ConfigOpt = None,
    state: Annotated[
        str | None,
        typer.Option(help="Only deliveries in this state (PENDING, SENDING, SENT, RETRY, DELIVERED, COMMITTED, "
                     "DEAD, DISCARDED, SHADOW)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    limit: Annotated[int | None, typer.Option(help="Only the newest this many (default: all).")] = None,
) -> None:
    """List every delivery of a result (SR, overlay, HL7 or FHIR message) to a destination: its state, attempts and last
    error (no patient data is shown)."""
    from agent.db.engine import open_database
    from agent.domain import OutboxState
    from agent.queue import outbox

    settings = _settings(config)
    wanted = None
    if state:
        try:
            wanted = OutboxState(state.upper())
        except ValueError:
            raise ConfigError("--state", f"one of {', '.join(s.value for s in OutboxState)}") from None
    if fmt not in ("table", "json"):
        raise ConfigError("--format", "table or json")
    rows = outbox.items(open_database(settings), wanted, limit)
    if fmt == "json":
        typer.echo(json.dumps([
            {
                "id": o.id, "kind": o.kind, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                "last_status": o.last_status, "last_error": o.last_error, "sop_class_uid": o.sop_class_uid,
                "sop_instance_uid": o.sop_instance_uid, "study_id": o.study_id,
                "created_at": _utc(o.created_at), "updated_at": _utc(o.updated_at),
                "delivered_at": _utc(o.delivered_at), "next_attempt_at": _utc(o.next_attempt_at),
                "commitment_uid": o.commitment_uid, "commitment_asked_at": _utc(o.commitment_asked_at),
            }
            for o in rows
        ], indent=2))
        return
    typer.echo(
        f"{'ID':>6}  {'KIND':<4}  {'DESTINATION':<16}  {'STATE':<9}  {'TRIES':>5}  {'UPDATED (UTC)':<19}  "
        "SOP INSTANCE UID / LAST ERROR"
    )
    for o in rows:
        typer.echo(
            f"{o.id:>6}  {o.kind:<4}  {o.destination[:16]:<16}  {o.state:<9}  {o.attempts:>5}  "
            f"{o.updated_at:%Y-%m-%d %H:%M:%S}  {o.sop_instance_uid}" + (f"  ({o.last_error})" if o.last_error else "")
        )
    counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(o.state for o in rows).items()))
    typer.echo(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}" + (f": {counts}" if counts else ""))


FLAGGED_FIELDS = (
    "patient_id", "patient_name", "first_flagged_at", "last_flagged_at", "last_study_date", "probability",
    "severity", "t_score", "status", "studies",
)


@flagged_app.command("list")
def flagged_list(
    config: ConfigOpt = None,
    status: Annotated[
        str | None,
        typer.Option(help="new, confirmed, rejected, dxa_ordered, dxa_done, treatment, no_treatment or closed."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Flagged (for the first time or again) on or after this date, UTC (YYYY-MM-DD)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """List flagged patients (PHI: every listing is an audit event)."""
    import csv
    from datetime import datetime

    from agent.audit import trail
    from agent.db.engine import open_database
    from agent.db.registry import FOLLOW_UP_STATUSES, list_flagged, spreadsheet_cell

    if status and status not in FOLLOW_UP_STATUSES:
        raise ConfigError("--status", f"one of {', '.join(FOLLOW_UP_STATUSES)}")
    if fmt not in ("table", "csv", "json"):
        raise ConfigError("--format", "table, csv or json")
    try:
        since_dt = datetime.strptime(since, "%Y-%m-%d") if since else None
    except ValueError:
        raise ConfigError("--since", "a date as YYYY-MM-DD") from None
    db = open_database(_settings(config))
    rows = list_flagged(db, status, since_dt)
    with db.transaction() as s:
        trail.append(s, "query", actor="strnet-cli", action="R", object_type="flagged_list",
                     detail={"rows": len(rows), "format": fmt})
    records = [
        {
            "patient_id": r.patient_id, "patient_name": r.patient_name,
            "first_flagged_at": iso_z(r.first_flagged_at),
            "last_flagged_at": iso_z(r.last_flagged_at),
            "last_study_date": r.last_study_date, "probability": round(r.probability, 4),
            "severity": r.severity, "t_score": round(r.t_score, 2), "status": r.status, "studies": r.studies,
        }
        for r in rows
    ]
    if fmt == "json":
        typer.echo(json.dumps(records, indent=2))
    elif fmt == "csv":  # for a spreadsheet: dates as YYYY-MM-DD, formulas neutralised (no BOM on stdout)
        writer = csv.DictWriter(sys.stdout, fieldnames=FLAGGED_FIELDS)  # the same columns when empty
        writer.writeheader()
        writer.writerows(
            {k: spreadsheet_cell(format_da(str(v or "")) if k == "last_study_date" else v) for k, v in r.items()}
            for r in records
        )
    else:
        typer.echo(
            f"{'PATIENT ID':<16} {'NAME':<24} {'STATUS':<12} {'P(LOSS)':>7} {'SEVERITY':<12} {'T':>5} "
            f"{'STUDIES':>7}  {'LAST STUDY':<10}  {'FIRST FLAGGED':<10}  {'LAST FLAGGED':<10}"
        )
        for r, row in zip(records, rows, strict=True):
            typer.echo(
                f"{str(r['patient_id'] or '')[:16]:<16} {str(r['patient_name'] or '')[:24]:<24} {r['status']:<12} "
                f"{r['probability']:>7.3f} {str(r['severity'] or ''):<12} {r['t_score']:>5.1f} {r['studies']:>7}  "
                f"{format_da(row.last_study_date):<10}  "
                f"{row.first_flagged_at:%Y-%m-%d}     {row.last_flagged_at:%Y-%m-%d}"
            )
        typer.echo(f"{len(records)} flagged patient(s)")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply the database migrations (Alembic) up to the newest."""
    from agent.db.engine import current_revision, open_database

    settings = _settings(config)
    db = open_database(settings, migrate=True)
    typer.echo(f"database at revision {current_revision(db)}")


@db_app.command("backup")
def db_backup(
    dest: Annotated[Path, typer.Argument(help="Backup file, or a folder for a dated file.")],
    config: ConfigOpt = None,
) -> None:
    """Consistent online backup of the SQLite database (safe while serving)."""
    from agent.audit import trail
    from agent.db.engine import open_database
    from agent.ops.backup import backup_sqlite

    settings = _settings(config)
    db = open_database(settings)
    out = backup_sqlite(settings.database_url, dest)
    with db.transaction() as s:
        trail.append(s, "export", actor="strnet-cli", action="R", object_type="database", detail={"backup": out.name})
    typer.echo(f"backup written: {out} ({out.stat().st_size} bytes)")


@db_app.command("verify-audit")
def db_verify_audit(config: ConfigOpt = None) -> None:
    """Verify the audit trail's hash chain; exit 1 when it is broken."""
    from agent.audit import trail
    from agent.db.engine import open_database

    db = open_database(_settings(config))
    with db.reading() as s:
        report = trail.verify(s)
    if report.ok:
        typer.echo(f"audit chain OK: {report.events} events")
        return
    typer.echo(f"audit chain BROKEN at event {report.first_bad_id}: {report.problem}")
    raise typer.Exit(1)


@db_app.command("export-audit")
def db_export_audit(config: ConfigOpt = None) -> None:
    """Send the audit events not yet delivered to the audit repository ([atna]) now, ignoring the
    backoff; exit 1 when a delivery fails (the cursor stays: they go at the next try)."""
    from agent.audit.export import Exporter
    from agent.db.engine import open_database

    settings = _settings(config)
    if not settings.atna.enabled:
        raise ConfigError("atna.enabled", "the audit export is off; set [atna] enabled = true")
    result = Exporter(open_database(settings), settings).run(ignore_backoff=True)
    typer.echo(f"sent {result.sent} audit event(s); {result.backlog} not yet delivered")
    if result.error is not None:
        typer.echo(f"delivery failed: {result.error}")
        raise typer.Exit(1)


@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective settings as JSON."""
    settings = _settings(config)
    typer.echo(settings.model_dump_json(indent=2))


@config_app.command("docs")
def config_docs(out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None) -> None:
    """Generate docs/configuration.md from the settings model."""
    from agent.config_docs import render

    text = render()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")


@app.command()
def doctor(config: ConfigOpt = None) -> None:
    """Check configuration, database, audit chain, spool space, model and every PACS (C-ECHO)."""
    from agent.ops.doctor import run_checks

    settings = _settings(config)
    source = str(config) if config else ("agent.toml" if Path("agent.toml").is_file() else "built-in defaults")
    checks = run_checks(settings, source)
    for c in checks:
        typer.echo(f"{'OK  ' if c.ok else 'FAIL'}  {c.name:<16} {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        typer.echo(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")
        raise typer.Exit(1)
    typer.echo(f"doctor: all {len(checks)} checks OK")


@app.command()
def sweep(
    date_from: Annotated[str, typer.Option("--from", help="First study date, YYYY-MM-DD.")],
    date_to: Annotated[str, typer.Option("--to", help="Last study date, YYYY-MM-DD (inclusive).")],
    config: ConfigOpt = None,
    pacs: Annotated[
        str | None, typer.Option("--pacs", help="The [[pacs]] to sweep (default: every one with query = true).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Query and print what would be retrieved; retrieve nothing.")
    ] = False,
) -> None:
    """Screen the archive: find the knee studies of a date range the agent has not screened and
    retrieve them (C-MOVE to the running agent, C-GET, or WADO-RS for a dicomweb [[pacs]]), within
    sweep.max_studies_per_hour.
    Resumes where an interrupted sweep of the same range stopped."""
    from datetime import datetime

    from agent.db.engine import open_database
    from agent.ingest.eligibility import Rules
    from agent.ingest.handlers import Ingestor
    from agent.ingest.sweep import Sweeper, archive_for
    from agent.pacs.archive import ArchiveError
    from agent.spool import Spool

    settings = _settings(config)
    try:
        first = datetime.strptime(date_from, "%Y-%m-%d").date()
        last = datetime.strptime(date_to, "%Y-%m-%d").date()
    except ValueError:
        raise ConfigError("--from/--to", "dates as YYYY-MM-DD") from None
    if last < first:
        raise ConfigError("--to", "the range ends before it starts")
    targets = [p for p in settings.pacs if p.query and (pacs is None or p.name == pacs)]
    if not targets:
        raise ConfigError("--pacs", f"no [[pacs]] {'named ' + pacs + ' ' if pacs else ''}with query = true")
    db = open_database(settings)
    rules = Rules.from_section(settings.eligibility)
    ingestor = None
    brought_here = settings.sweep.retrieve == "get" or any(p.kind == "dicomweb" for p in targets)
    if brought_here and not dry_run:  # C-GET, WADO-RS: the instances come to this process
        spool = Spool(settings.spool_dir, min_free_bytes=settings.agent.min_free_disk_mb * 1024 * 1024,
                      node_dir=settings.node if settings.shared_storage else "")  # fmt: skip
        ingestor = Ingestor(db, spool, rules, settings.scp.max_instance_mb * 1024 * 1024, node=settings.node)
    sweeper = Sweeper(settings, db, rules, archive_for(settings), ingestor)
    signal.signal(signal.SIGTERM, lambda *_: sweeper.stop())
    failed = False
    for target in targets:
        try:
            report = sweeper.sweep(target, first, last, dry_run=dry_run, echo=typer.echo)
        except ArchiveError as exc:
            typer.echo(f"{target.name}: query failed: {exc}")
            failed = True
            continue
        if dry_run:
            typer.echo(f"{'STUDY INSTANCE UID':<64}  {'DATE':<10}  {'MODALITIES':<10}  SERIES  INSTANCES  ACTION")
            for p in report.planned:
                typer.echo(
                    f"{p.study_instance_uid:<64}  {format_da(p.study_date or ''):<10}  "
                    f"{'/'.join(p.modalities):<10}  {len(p.series):>6}  {p.instances:>9}  "
                    + ("skip (screened)" if p.screened else "retrieve")
                )
            todo = [p for p in report.planned if not p.screened]
            typer.echo(
                f"{target.name}: dry run, {report.days} day(s), {report.studies_found} studies found, "
                f"{len(report.planned)} with knee series, would retrieve {len(todo)} "
                f"({sum(p.instances for p in todo)} instances); nothing retrieved"
            )
            continue
        for line in report.failed:
            typer.echo(f"failed: {line}")
        typer.echo(
            f"{target.name}: {report.days} day(s), {report.studies_found} studies found, "
            f"{len(report.planned)} with knee series, {report.retrieved} retrieved, "
            f"{report.already_screened} already screened"
            + ("" if report.finished else f"; stopped ({report.paused}), run again to resume")
        )
        failed = failed or bool(report.failed)
    raise typer.Exit(1 if failed else 0)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the temporary folder for inspection.")] = False,
    weights: Annotated[Path | None, typer.Option(help="STR-Net checkpoint (default: the shipped one).")] = None,
) -> None:
    """Start Orthanc and the agent on free ports, route synthetic knee studies, show the results."""
    from agent.demo.run import run_demo

    raise typer.Exit(run_demo(keep=keep, weights=weights, echo=typer.echo))


def model_install(
    path: Annotated[Path, typer.Argument(help="Checkpoint metadata JSON (its .safetensors beside it).")],
    config: ConfigOpt = None,
) -> None:
    """Verify a checkpoint and make it the served model (a running agent swaps before its next batch)."""
    from agent.audit import trail
    from agent.db.engine import open_database
    from agent.pipeline.models import install

    settings = _settings(config)
    meta = install(settings, path)
    db = open_database(settings)
    with db.transaction() as s:
        trail.append(s, "application_activity", actor="strnet-cli", action="U", object_type="model",
                     object_id=str(meta.model_version),
                     detail={"activity": "model_install", "weights_sha256": meta.weights_sha256})
    typer.echo(f"installed {meta.model_version} (sha256 {meta.weights_sha256})")


def model_info(config: ConfigOpt = None) -> None:
    """Show the checkpoint the agent serves: version, hash, thresholds, preprocessing."""
    from agent.pipeline.models import describe, served_weights

    settings = _settings(config)
    typer.echo(json.dumps(describe(served_weights(settings)), indent=2))


def _mount_model_commands() -> None:
    from model.cli import app as model_app

    # agent-side commands (audit, data_dir) join the model group; model/ never imports agent
    model_app.command("install")(model_install)
    model_app.command("info")(model_info)
    app.add_typer(
        model_app, name="model", help="STR-Net: synthesise, train, evaluate, calibrate, predict, install, info."
    )


_DOUBLE_QUOTED = re.compile(r'"[^"]*"')


def main() -> None:
    # model/ imports torch (seconds): mount its commands only when they can be asked for
    argv = sys.argv[1:]
    if not argv or argv[0] in ("model", "--help", "-h"):
        _mount_model_commands()
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    except OperationalError as exc:
        # the database cannot be reached or used (refused, wrong password, unreadable file): the
        # driver's first line says why; SQLAlchemy's own text (the statement, its parameters) is left out
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else exc.orig.__class__.__name__
        # libpq quotes the host and the user: each quoted span goes, the reason after it stays
        typer.echo("database error: " + redact(_DOUBLE_QUOTED.sub("[value]", first)), err=True)
        sys.exit(1)
