"""Settings: file < environment < CLI, and bad settings named with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.errors import ConfigError

TOML = """
[agent]
data_dir = "{data}"
[scp]
ae_title = "FROMFILE"
port = 2000
[[scp.peers]]
ae_title = "PACSA"
host = "10.1.2.3"
[[pacs]]
name = "main"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 5104
[web]
bind = "127.0.0.1"
port = 8081
"""


@pytest.fixture()
def toml_file(tmp_path: Path) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(TOML.format(data=tmp_path / "var"))
    return p


def test_file_values_are_read(toml_file: Path) -> None:
    s = load_settings(toml_file)
    assert s.scp.ae_title == "FROMFILE"
    assert s.scp.port == 2000
    assert [(p.ae_title, p.host) for p in s.scp.peers] == [("PACSA", "10.1.2.3")]
    assert s.pacs[0].name == "main" and s.pacs[0].port == 5104
    assert s.web.port == 8081
    assert s.database_url.endswith("/var/strnet.db")


def test_agent_toml_in_the_working_folder_is_read_when_no_config_is_given(
    toml_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(toml_file.parent)  # holds agent.toml
    assert load_settings().scp.ae_title == "FROMFILE"
    assert load_settings(search_default=False).scp.ae_title == "STRNET"
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)  # none here: the built-in defaults
    assert load_settings().scp.ae_title == "STRNET"


def test_environment_overrides_file_and_cli_overrides_environment(
    toml_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRNET_SCP__PORT", "11113")
    s = load_settings(toml_file)
    assert s.scp.port == 11113
    assert s.scp.ae_title == "FROMFILE"  # untouched keys keep the file's value
    s = load_settings(toml_file, scp={"port": 3000})
    assert s.scp.port == 3000


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("STRNET_SCP__PORT", "70000", "scp.port"),
        ("STRNET_SCP__AE_TITLE", "A" * 17, "scp.ae_title"),
        ("STRNET_AGENT__LOG_LEVEL", "loud", "agent.log_level"),
        ("STRNET_SCP__MAX_ASSOCIATIONS", "0", "scp.max_associations"),
        ("STRNET_WORKER__THRESHOLD", "banana", "worker.threshold"),
        ("STRNET_WORKER__THRESHOLD", "1.5", "worker.threshold"),  # nothing could ever be flagged
        ("STRNET_WORKER__THRESHOLD", "0", "worker.threshold"),  # everything would be
    ],
)
def test_bad_setting_is_named(
    toml_file: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_settings(toml_file)
    assert err.value.setting == named


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[scp]\nprot = 5\n")
    with pytest.raises(ConfigError) as err:
        load_settings(p)
    assert "scp.prot" in str(err.value)


def test_tls_without_key_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("[scp.tls]\nenabled = true\n")
    with pytest.raises(ConfigError) as err:
        load_settings(p)
    assert err.value.setting == "scp.tls.cert_file"


def test_cli_exits_2_naming_the_setting(toml_file: Path) -> None:
    env = {"STRNET_SCP__PORT": "not-a-port", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "jobs", "list", "--config", str(toml_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "scp.port" in proc.stderr


def test_example_config_is_valid_and_complete() -> None:
    example = Path(__file__).parents[2] / "deploy" / "agent.example.toml"
    s = load_settings(example)
    text = example.read_text()
    # every setting of every section appears in the example
    for section in type(s).model_fields:
        model = getattr(s, section)
        if isinstance(model, list):
            model = model[0]
        for key in type(model).model_fields:
            assert f"{key} =" in text or f"[{section}.{key}]" in text or f"[[{section}.{key}]]" in text, (section, key)


def test_the_web_and_atna_defaults_are_those_the_docs_state() -> None:
    """docs/security.md (Limits on requests, Sessions, TLS) and docs/atna.md (APP-NAME)."""
    from agent.config import AtnaSection, WebSection

    w = WebSection()
    assert (w.bind, w.port, w.idle_timeout_s) == ("127.0.0.1", 8080, 900.0)
    assert (w.max_form_bytes, w.max_login_bytes, w.max_form_fields, w.request_timeout_s) == (32768, 8192, 16, 30.0)
    assert (w.login_concurrency, w.login_queue) == (1, 8)
    assert (w.login_free_failures, w.login_free_failures_per_client) == (5, 20)
    assert (w.login_backoff_s, w.login_backoff_max_s) == (1.0, 900.0)
    assert (w.trusted_proxies, w.behind_tls_proxy) == ([], False)
    assert (AtnaSection().app_name, AtnaSection().transport) == ("strnet", "tls")
