"""[[scp.peers]] hosts given as names: resolved, re-resolved, and failing closed (a fake resolver
stands in for DNS, which this machine does not have for made-up names)."""

from __future__ import annotations

import socket

import structlog

from agent.ingest.peers import PeerPolicy, normal_address


class Dns:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups = 0

    def __call__(self, name: str) -> list[str]:
        self.lookups += 1
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return self.table[name]


def test_addresses_and_names_both_admit_their_caller_and_nobody_else() -> None:
    dns = Dns({"orthanc": ["172.18.0.5"]})
    policy = PeerPolicy({"ORTHANC": {"orthanc"}, "MODALITY": {"10.0.0.7"}}, dns)
    assert policy.allows("ORTHANC", "172.18.0.5")
    assert policy.allows("ORTHANC", "::ffff:172.18.0.5")  # IPv4 on a dual-stack socket
    assert policy.allows("MODALITY", "10.0.0.7")
    assert not policy.allows("ORTHANC", "10.0.0.7")  # the other peer's address
    assert not policy.allows("INTRUDER", "172.18.0.5")
    assert policy.known("10.0.0.7") and policy.known("172.18.0.5") and not policy.known("10.0.0.8")


def test_a_recreated_container_is_admitted_at_its_new_address_without_a_restart() -> None:
    dns = Dns({"orthanc": ["172.18.0.5"]})
    policy = PeerPolicy({"ORTHANC": {"orthanc"}}, dns, ttl_s=3600, retry_s=0)
    assert policy.allows("ORTHANC", "172.18.0.5")
    dns.table["orthanc"] = ["172.18.0.9"]
    assert policy.allows("ORTHANC", "172.18.0.9")  # a miss looks the name up again
    assert not policy.allows("ORTHANC", "172.18.0.5")


def test_misses_do_not_flood_the_resolver() -> None:
    dns = Dns({"orthanc": ["172.18.0.5"]})
    policy = PeerPolicy({"ORTHANC": {"orthanc"}}, dns, ttl_s=3600, retry_s=60)
    for _ in range(20):
        assert not policy.allows("ORTHANC", "10.9.9.9")
    assert dns.lookups == 1


def test_a_name_that_stops_resolving_keeps_its_addresses_and_one_never_resolved_admits_nobody() -> None:
    dns = Dns({"orthanc": ["172.18.0.5"]})
    policy = PeerPolicy({"ORTHANC": {"orthanc"}, "GONE": {"no-such-host"}}, dns, ttl_s=0, retry_s=0)
    assert policy.allows("ORTHANC", "172.18.0.5")
    del dns.table["orthanc"]  # DNS down
    with structlog.testing.capture_logs() as logs:
        assert policy.allows("ORTHANC", "172.18.0.5")
    # the log event docs/operations.md names: the name, the error, the addresses kept
    unresolved = [(e["host"], e["error"], e["kept"]) for e in logs if e["event"] == "peer_host_unresolved"]
    assert unresolved == [("orthanc", "gaierror", 1)]
    assert not policy.allows("GONE", "172.18.0.5") and not policy.known("10.1.1.1")


def test_a_name_the_resolver_cannot_even_encode_admits_nobody() -> None:
    def idna_error(name: str) -> list[str]:
        raise UnicodeError("label empty or too long")  # what getaddrinfo raises for 'pacs..local'

    policy = PeerPolicy({"ORTHANC": {"pacs-local"}}, idna_error)
    assert not policy.allows("ORTHANC", "10.6.6.6") and not policy.known("10.6.6.6")


def test_config_refuses_host_names_no_resolver_could_take() -> None:
    import pytest

    from agent.config import load_settings
    from agent.errors import ConfigError

    for bad in ("pacs..local", ".orthanc", "-pacs", "a" * 64 + ".local", "pacs_1"):
        with pytest.raises(ConfigError):
            load_settings(None, search_default=False, scp={"peers": [{"ae_title": "ORTHANC", "host": bad}]})
    fqdn = "pacs-1.hospital.local."
    ok = load_settings(None, search_default=False, scp={"peers": [{"ae_title": "ORTHANC", "host": fqdn}]})
    assert ok.scp.peers[0].host == "pacs-1.hospital.local."


def test_normal_address() -> None:
    assert normal_address("::ffff:127.0.0.1") == "127.0.0.1"
    assert normal_address("0:0:0:0:0:0:0:1") == "::1"
    assert normal_address("fe80::1%eth0") == "fe80::1"
    assert normal_address("orthanc") == "orthanc"
