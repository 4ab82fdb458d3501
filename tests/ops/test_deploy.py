"""Deployment files: the systemd unit verifies, Orthanc's auto-routing scripts route knees, and the
two-agent compose file (deploy/compose.cluster.yaml) holds together.

The compose stacks themselves are not started here: no Docker engine runs on the project's build
and test machines (the docker CLI is there, `docker compose` and a daemon are not). What can be
checked for real is: the YAML parses, every file it mounts exists, each agent's TOML loads with the
agent's own loader under the compose environment, Orthanc's modalities and the routing script's
AGENTS agree, images are pinned, the schema upgrade runs before the agents; and the same topology
runs without Docker: two `strnet serve` on the compose's agent TOML files, on one throwaway
PostgreSQL database, behind a real Orthanc (Debian's package) loading the same by-study script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from conftest import free_port, require_tool
from dicom_factory import DX_PRESENTATION, knee_dx, write
from pg_cluster import PgCluster, engine_under_test
from psycopg import sql
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, make_url, select
from study_routing import study_agent

from agent.config import Settings, load_settings
from agent.db.engine import Database
from agent.db.models import Instance, OutboxItem, Study, StudyReport
from agent.demo.orthanc import LocalOrthanc
from agent.queue.store import list_jobs

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER = DEPLOY / "compose.cluster.yaml"
CLUSTER_AGENTS = ("strnet1", "strnet2")
# on PostgreSQL whatever the engine under test: the PostgreSQL pass (Makefile PG_TESTS) would repeat it
ONCE = pytest.mark.skipif(engine_under_test() == "postgresql", reason="runs on PostgreSQL in the SQLite pass")


def test_systemd_unit_verifies() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not on this machine")
    unit = ROOT / "deploy" / "systemd" / "strnet-agent.service"
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


@pytest.mark.integration
def test_orthanc_lua_script_routes_knees_and_not_other_films(make_agent: Any, tmp_path: Path) -> None:
    require_tool("Orthanc")
    agent = make_agent(scp={"ae_title": "STRNET"})
    script = ROOT / "deploy" / "orthanc" / "route-knees.lua"
    with LocalOrthanc(
        "ORTHANC",
        modalities={"strnet": ("STRNET", "127.0.0.1", agent.scp.port)},
        extra_config={"LuaScripts": [str(script)]},
    ) as orthanc:
        knee = write(knee_dx(), tmp_path / "knee.dcm")
        chest = write(knee_dx(body_part="CHEST"), tmp_path / "chest.dcm")
        orthanc.upload(chest)
        orthanc.upload(knee)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list_jobs(agent.db):
            time.sleep(0.2)
        time.sleep(1.0)  # give a wrongly routed chest film the time to arrive too
        jobs = list_jobs(agent.db)
        assert [j.sop_instance_uid for j in jobs] == [str(dcmread(knee).SOPInstanceUID)]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation, the forms the compose files use: ${VAR}, ${VAR:?error},
    ${VAR:-default} and $$ (a literal $). An unset ${VAR:?...} fails as compose does."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op == ":?" and not value:
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not value:
            return arg
        return value

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:\?|:-)([^}]*))?\}", one, text)


def cluster(env: dict[str, str] | None = None) -> dict[str, Any]:
    """deploy/compose.cluster.yaml as compose reads it with deploy/cluster.env.example's values."""
    values = env_file(DEPLOY / "cluster.env.example") if env is None else env
    doc = yaml.safe_load(interpolate(CLUSTER.read_text(encoding="utf-8"), values))
    assert isinstance(doc, dict)
    return doc


def mounted(service: dict[str, Any], target: str) -> Path:
    """The host file a service mounts at ``target`` (bind mounts are relative to deploy/)."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            assert source.startswith("./"), volume
            return DEPLOY / source
    raise AssertionError(f"nothing is mounted at {target}")


def agent_config(service: dict[str, Any]) -> Path:
    """The config file the agent's command names (the Dockerfile's CMD unless the service has one)."""
    command = service.get("command") or ["serve", "--config", "/etc/strnet/agent.toml"]
    return mounted(service, command[command.index("--config") + 1])


def load_agent(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The agent's own settings loader on the mounted TOML, with the service's environment applied."""
    with monkeypatch.context() as m:
        for key, value in (service.get("environment") or {}).items():
            m.setenv(key, str(value))
        return load_settings(agent_config(service))


def lua_agents(script: Path) -> list[str]:
    """The ``AGENTS`` table of an Orthanc routing script, in its order."""
    m = re.search(r"^local AGENTS = \{([^}]*)\}", script.read_text(encoding="utf-8"), re.MULTILINE)
    assert m is not None, "no AGENTS table"
    return re.findall(r'"([^"]+)"', m.group(1))


def test_cluster_compose_parses_and_every_mounted_file_exists() -> None:
    doc = cluster()
    assert set(doc["services"]) == {"db", "migrate", "orthanc", *CLUSTER_AGENTS}
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    # each agent its own data volume; the database its own
    data = [
        next(v.split(":")[0] for v in doc["services"][a]["volumes"] if v.endswith(":/var/lib/strnet"))
        for a in CLUSTER_AGENTS
    ]
    assert len(set(data)) == len(CLUSTER_AGENTS)
    assert any(v.endswith(":/var/lib/postgresql/data") for v in doc["services"]["db"]["volumes"])


def test_cluster_password_comes_from_an_uncommitted_env_file() -> None:
    with pytest.raises(KeyError, match="STRNET_DB_PASSWORD"):
        cluster(env={})  # compose refuses to start without it
    assert "cluster.env" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").split()
    doc = cluster(env={"STRNET_DB_PASSWORD": "s3cret"})
    assert doc["services"]["db"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    for name in ("migrate", *CLUSTER_AGENTS):
        assert doc["services"][name]["environment"]["PGPASSWORD"] == "s3cret"  # libpq's
    for name in CLUSTER_AGENTS:
        assert "s3cret" not in agent_config(doc["services"][name]).read_text(encoding="utf-8")


def test_cluster_agents_load_with_distinct_nodes_node_storage_and_one_postgresql_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = cluster()
    services = doc["services"]
    loaded = {name: load_agent(services[name], monkeypatch) for name in CLUSTER_AGENTS}
    assert [s.node for s in loaded.values()] == list(CLUSTER_AGENTS)
    assert {s.agent.storage for s in loaded.values()} == {"node"}
    urls = {s.database_url for s in loaded.values()}
    assert len(urls) == 1
    url = make_url(urls.pop())
    assert (url.drivername, url.host) == ("postgresql", "db")  # the compose's database service
    assert len({s.scp.ae_title for s in loaded.values()}) == len(CLUSTER_AGENTS)
    for s in loaded.values():  # what Orthanc and the agents call each other
        assert [(p.ae_title, p.host) for p in s.scp.peers] == [("ORTHANC", "orthanc")]
        # Orthanc's DICOM port: the container port it publishes first
        assert [(p.ae_title, p.host, p.port) for p in s.pacs] == [("ORTHANC", "orthanc", container_ports("orthanc")[0])]
    # the one-shot upgrade works on the same database
    assert load_agent(services["migrate"], monkeypatch).database_url == loaded["strnet1"].database_url
    db_env = services["db"]["environment"]
    assert (db_env["POSTGRES_USER"], db_env["POSTGRES_DB"]) == (url.username, url.database)


def test_cluster_orthanc_declares_the_agents_the_script_routes_to_in_its_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = cluster()
    orthanc = doc["services"]["orthanc"]
    scripts = json.loads(orthanc["environment"]["ORTHANC__LUA_SCRIPTS"])
    assert len(scripts) == 1
    script = mounted(orthanc, scripts[0])
    assert script.name == "route-knees-by-study.lua"
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert lua_agents(script) == list(CLUSTER_AGENTS) == list(modalities)
    for name in CLUSTER_AGENTS:
        settings = load_agent(doc["services"][name], monkeypatch)
        assert modalities[name] == [settings.scp.ae_title, name, settings.scp.port]  # its host: the service
    assert orthanc["environment"]["ORTHANC__DICOM_AET"] == "ORTHANC"


def test_cluster_images_are_pinned() -> None:
    doc = cluster()
    for name, service in doc["services"].items():
        image = service.get("image", "")
        if "build" in service:
            continue  # built here from deploy/Dockerfile, whose bases are checked below
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    assert doc["services"]["db"]["image"].startswith("postgres:15.")
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("FROM ") and " AS " in line and ":" in line.split()[1]:
            tag = line.split()[1].rpartition(":")[2]
            assert tag != "latest" and re.search(r"\d", tag), line


def test_cluster_schema_upgrade_runs_once_before_both_agents() -> None:
    services = cluster()["services"]
    migrate = services["migrate"]
    assert migrate["command"][:2] == ["db", "upgrade"]
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert "pg_isready" in services["db"]["healthcheck"]["test"]
    assert migrate.get("restart", "no") == "no"
    for name in CLUSTER_AGENTS:
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        assert "command" not in services[name]  # the image's `strnet serve`
    # the agents' own image has the PostgreSQL driver, in both targets
    installs = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if "pip install" in line]
    project = [line for line in installs if "torch" not in line]
    assert len(project) == 2 and all('pip install ".[postgres]"' in line for line in project), project


def container_ports(service: str) -> list[int]:
    """The container side of each port the cluster's ``service`` publishes ("ip:host:container")."""
    return [int(p.rsplit(":", 1)[1]) for p in cluster()["services"][service].get("ports", [])]


def test_cluster_publishes_ports_on_this_host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    services = cluster()["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {*CLUSTER_AGENTS, "orthanc"}  # not the database, not the upgrade
    mappings = [p.split(":") for ports in published.values() for p in ports]
    assert all(len(m) == 3 and m[0] == "127.0.0.1" for m in mappings)  # on this host only
    assert len({m[1] for m in mappings}) == len(mappings)  # no host port twice
    for name in CLUSTER_AGENTS:  # each agent publishes its admin web, on the port it listens on
        assert container_ports(name) == [load_agent(services[name], monkeypatch).web.port]
    # Orthanc as the single-agent compose file publishes it (DICOM, then HTTP)
    single = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))["services"]["orthanc"]
    assert published["orthanc"] == single["ports"]


@ONCE
def test_cluster_migrate_reaches_postgresql_with_the_password_from_the_env_file(tmp_path: Path) -> None:
    """The compose's `migrate` command, its TOML and its environment (PGPASSWORD from the example env
    file) against a PostgreSQL 15 of its own that asks for passwords (scram-sha-256): the schema is
    created; with a wrong password it is refused."""
    service = cluster()["services"]["migrate"]
    env = {k: str(v) for k, v in service["environment"].items()}
    pg = PgCluster(free_port()).start()
    try:
        admin = f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE strnet LOGIN PASSWORD {}").format(sql.Literal(env["PGPASSWORD"])))
            conn.execute("CREATE DATABASE strnet OWNER strnet")
        hba = pg.dir / "data" / "pg_hba.conf"
        hba.write_text("host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        config = agent_config(service)
        url = make_url(load_settings(config).database_url).set(host="127.0.0.1", port=pg.port)
        url = url.render_as_string(hide_password=False)
        argv = [sys.executable, "-m", "agent", *service["command"][:2], "--config", str(config)]
        base = {**os.environ, "STRNET_AGENT__DATA_DIR": str(tmp_path), "STRNET_AGENT__DATABASE_URL": url}
        ok = subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "database at revision" in ok.stdout, ok.stdout + ok.stderr
        wrong = subprocess.run(argv, env={**base, "PGPASSWORD": "not-it"}, capture_output=True, text=True, timeout=120)
        # refused, in one line that keeps libpq's reason
        assert wrong.returncode == 1 and 'password authentication failed for user [value]' in wrong.stderr
    finally:
        pg.stop()


def store_as(ae_title: str, port: int, path: Path) -> int:
    """C-STORE one file into Orthanc calling as ``ae_title``; the status."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


class ComposeAgent:
    """``strnet serve`` on a compose agent's own TOML file, as its container runs it, with the
    compose environment plus what differs on loopback (addresses, ports, data directory, database)."""

    def __init__(self, service: dict[str, Any], loopback: dict[str, str], log: Path) -> None:
        self.config = agent_config(service)
        self.port = int(loopback["STRNET_SCP__PORT"])
        env = {**os.environ, **{k: str(v) for k, v in (service.get("environment") or {}).items()}, **loopback}
        self._log = log.open("wb")
        argv = [sys.executable, "-m", "agent", "serve", "--config", str(self.config)]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, env=env)
        self.log = log

    def wait_listening(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"strnet serve exited: {self.log.read_text()[-2000:]}"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("strnet serve did not start listening")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.mark.integration
@ONCE
def test_the_clusters_two_agents_on_postgresql_behind_orthanc_each_screen_the_studies_routed_to_them(
    pg_cluster: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    """The compose cluster's topology without Docker: two `strnet serve` on their compose TOML files
    (node, node storage, AE title as in the compose), one PostgreSQL database, Orthanc (Debian's
    package) with the by-study script and the compose's modality names. Loopback differences come
    by STRNET_* variables; screening inline with a tiny model (worker.process = false) to keep the
    test short. Each study reaches one agent whole, is screened and reported by it, and what the
    agents send back (SR, overlays: knee DX) is not routed to them again."""
    require_tool("Orthanc")
    services = cluster()["services"]
    url = pg_cluster.fresh_database()  # at the newest schema: the compose's `migrate` step
    ports = {name: free_port() for name in CLUSTER_AGENTS}
    modalities = json.loads(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    script = mounted(services["orthanc"], json.loads(services["orthanc"]["environment"]["ORTHANC__LUA_SCRIPTS"])[0])
    studies = [f"1.2.826.0.1.3680043.8.498.{7000 + i}" for i in range(8)]
    assert {study_agent(uid, 2) for uid in studies} == {0, 1}  # both agents get studies
    agents: list[ComposeAgent] = []
    with LocalOrthanc(
        "ORTHANC",
        modalities={name: (modalities[name][0], "127.0.0.1", ports[name]) for name in modalities},
        extra_config={"LuaScripts": [str(script)]},
    ) as orthanc:
        try:
            for name in CLUSTER_AGENTS:
                loopback = {
                    "STRNET_AGENT__DATA_DIR": str(tmp_path / name),
                    "STRNET_AGENT__DATABASE_URL": url,
                    "STRNET_AGENT__MIN_FREE_DISK_MB": "0",
                    "STRNET_SCP__BIND": "127.0.0.1",
                    "STRNET_SCP__PORT": str(ports[name]),
                    "STRNET_SCP__PEERS": json.dumps([{"ae_title": "ORTHANC", "host": "127.0.0.1"}]),
                    "STRNET_PACS": json.dumps(
                        [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}]
                    ),
                    "STRNET_WEB__BIND": "127.0.0.1",
                    "STRNET_WEB__PORT": str(free_port()),
                    "STRNET_WORKER__WEIGHTS": str(tiny_weights),
                    "STRNET_WORKER__PROCESS": "false",
                    "STRNET_WORKER__DEVICE": "cpu",
                    "STRNET_REPORTING__QUIET_PERIOD_S": "0.5",
                    "STRNET_REPORTING__BUILD_PROCESSES": "0",
                    "STRNET_SENDER__POLL_S": "0.2",
                }
                agents.append(ComposeAgent(services[name], loopback, tmp_path / f"{name}.log"))
            for agent in agents:
                agent.wait_listening()
            sent: dict[str, set[str]] = {}
            for n, uid in enumerate(studies):
                for view in range(2):
                    ds = knee_dx(study_uid=uid, seed=n * 2 + view, rows=320, cols=256)
                    sent.setdefault(uid, set()).add(str(ds.SOPInstanceUID))
                    orthanc.upload(write(ds, tmp_path / f"{n}-{view}.dcm"))
            orthanc.upload(write(knee_dx(body_part="CHEST"), tmp_path / "chest.dcm"))
            # a knee DX coming from an agent's AE title (as its overlays do) is not routed again
            back = write(knee_dx(), tmp_path / "back.dcm")
            assert store_as(modalities[CLUSTER_AGENTS[0]][0], orthanc.dicom_port, back) == 0
            db = Database(url)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and delivered(db) != {"sr": len(studies), "sc": 2 * len(studies)}:
                time.sleep(0.3)
            time.sleep(1.0)  # a film routed back to an agent, or a wrong copy, would arrive meanwhile
            assert delivered(db) == {"sr": len(studies), "sc": 2 * len(studies)}
            expected = {
                name: {uid: sent[uid] for uid in studies if study_agent(uid, 2) == i}
                for i, name in enumerate(CLUSTER_AGENTS)
            }
            assert received_by_node(db) == expected
            assert reported_by_node(db) == {name: set(by_study) for name, by_study in expected.items()}
            db.dispose()
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                agent.wait_stopped()


def delivered(db: Database) -> dict[str, int]:
    """Outbox rows delivered, by kind (the rest still on their way are not counted)."""
    with db.reading() as s:
        rows = s.execute(
            select(OutboxItem.kind, func.count()).where(OutboxItem.state == "DELIVERED").group_by(OutboxItem.kind)
        ).all()
    return {kind: n for kind, n in rows}


def reported_by_node(db: Database) -> dict[str, set[str]]:
    """node -> the studies it built an SR of."""
    out: dict[str, set[str]] = {}
    with db.reading() as s:
        rows = s.execute(select(StudyReport.node, Study.study_instance_uid).join(Study)).all()
    for node, study in rows:
        out.setdefault(str(node), set()).add(study)
    return out


def received_by_node(db: Any) -> dict[str, dict[str, set[str]]]:
    """node -> study UID -> SOP Instance UIDs it received, from the shared database."""
    out: dict[str, dict[str, set[str]]] = {}
    with db.reading() as s:
        rows = s.execute(
            select(Instance.node, Study.study_instance_uid, Instance.sop_instance_uid).join(
                Study, Instance.study_id == Study.id
            )
        ).all()
    for node, study, sop in rows:
        out.setdefault(str(node), {}).setdefault(study, set()).add(sop)
    return out
