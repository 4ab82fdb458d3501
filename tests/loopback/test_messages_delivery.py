"""HL7 results through the outbox, end to end on loopback: an agent (tiny STR-Net) screens a study,
builds its SR and its ORU^R01, and the sender delivers the message to a real MLLP listener
(python-hl7's server, tests/mllp_listener.py) that answers as each test scripts. What the outbox
promises for DICOM results holds for messages: AE is retried and delivered once accepted, with the
same control id; AR is a dead letter that an operator replays; shadow mode sends nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from mllp_listener import Listener
from pacs_peer import PACS_AET, PacsPeer
from screening_helpers import bilateral_study, send_study, wait_for

from agent.domain import OutboxState
from agent.ehr.messages import HL7
from agent.queue import outbox


@pytest.fixture()
def listener() -> Iterator[Listener]:
    lst = Listener().start()
    yield lst
    lst.stop()


def _agent(make_agent: Any, weights: Path, pacs_port: int, hl7_port: int, **over: Any) -> Any:
    settings: dict[str, Any] = {
        "worker": {"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0},
        "reporting": {"quiet_period_s": 0.5, "overlay": False},
        "sender": {"backoff_base_s": 0.2, "backoff_max_s": 0.5, "poll_s": 0.2, "timeout_s": 5, "max_attempts": 4},
        "pacs": [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}],
        "hl7": [{"name": "ehr", "host": "127.0.0.1", "port": hl7_port, "timeout_s": 5,
                 "receiving_application": "EHR", "receiving_facility": "HOSP"}],
    }  # fmt: skip
    for k, v in over.items():
        settings[k] = {**settings.get(k, {}), **v} if isinstance(v, dict) else v
    return make_agent(**settings)


def _message_rows(agent: Any) -> list[Any]:
    return [o for o in outbox.items(agent.db) if o.kind == HL7]


def _states(agent: Any) -> list[str]:
    return [o.state for o in _message_rows(agent)]


def test_one_oru_per_study_reaches_the_listener_and_an_ae_is_retried_then_delivered_once(
    make_agent: Any, tiny_weights: Path, listener: Listener
) -> None:
    listener.reset("AE")  # the first answer is an application error, then AA
    with PacsPeer() as pacs:
        agent = _agent(make_agent, tiny_weights, pacs.port, listener.port)
        study = bilateral_study()
        send_study(agent, study)
        wait_for(lambda: _states(agent) == [OutboxState.DELIVERED.value], timeout_s=90)
    (row,) = _message_rows(agent)
    assert row.attempts == 2 and row.last_status == "AA"
    assert len(listener.received) == 2  # the AE'd one and its resend, nothing after AA
    first, second = (hl7.parse(str(m)) for m in listener.received)
    assert str(first.segment("MSH")[10]) == str(second.segment("MSH")[10])  # the same control id
    msg = second
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[5]) == "EHR"
    assert str(msg.segment("PID")[3]).split("^")[0] == str(study[0].PatientID)
    assert str(msg.segment("OBR")[3]).split("^")[0] == str(study[0].AccessionNumber)
    assert str(study[0].StudyInstanceUID) in str(msg)
    assert str(msg.segment("OBR")[25]) == "P"


def test_an_ar_is_dead_and_a_replay_delivers_it(make_agent: Any, tiny_weights: Path, listener: Listener) -> None:
    listener.reset("AR")
    with PacsPeer() as pacs:
        agent = _agent(make_agent, tiny_weights, pacs.port, listener.port)
        send_study(agent, bilateral_study(1))
        wait_for(lambda: _states(agent) == [OutboxState.DEAD.value], timeout_s=90)
        (row,) = _message_rows(agent)
        assert row.attempts == 1 and row.last_status == "AR" and "rejected" in (row.last_error or "")
        assert outbox.replay_dead(agent.db, None) == 1
        agent.sender.wake.set()
        wait_for(lambda: _states(agent) == [OutboxState.DELIVERED.value], timeout_s=30)
    assert len(listener.received) == 2


def test_shadow_mode_sends_no_message(make_agent: Any, tiny_weights: Path, listener: Listener) -> None:
    with PacsPeer() as pacs:
        agent = _agent(make_agent, tiny_weights, pacs.port, listener.port, sender={"send": False})
        send_study(agent, bilateral_study(1))
        wait_for(lambda: _states(agent) == [OutboxState.SHADOW.value], timeout_s=90)
    assert listener.received == []
