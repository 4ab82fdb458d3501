"""Screen and report on loopback: agent (tiny STR-Net) -> SR + overlays -> a pynetdicom PACS.

The tiny model has random weights: these tests check the worker, reporting, outbox and sender
plumbing and status handling. The shipped model's accuracy is tested in tests/unit, and the
whole chain with a real Orthanc in tests/integration.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy
import structlog
from dicom_factory import SECONDARY_CAPTURE, knee_dx
from pacs_peer import PACS_AET, PacsPeer
from pydicom.uid import ExplicitVRLittleEndian
from screening_helpers import bilateral_study, send_study, wait_for

from agent.app import Agent
from agent.db.registry import list_flagged
from agent.domain import JobState, OutboxState
from agent.ingest.eligibility import BODY_PART_REASON
from agent.pacs import status
from agent.pacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from agent.queue import outbox, screening
from agent.queue.store import list_jobs

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def screening_agent(make_agent: Any, weights: Path, peer_port: int, **over: Any) -> Agent:
    settings: dict[str, Any] = {
        "worker": {"enabled": True, "weights": str(weights), "device": "cpu", "max_wait_ms": 0},
        "reporting": {"quiet_period_s": 0.5},
        "sender": {"backoff_base_s": 0.2, "backoff_max_s": 1.0, "poll_s": 0.2, "timeout_s": 5, "max_attempts": 4},
        "pacs": [{"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": peer_port}],
    }
    for k, v in over.items():
        settings[k] = {**settings.get(k, {}), **v} if isinstance(v, dict) else v
    return make_agent(**settings)


def test_study_is_screened_and_sr_plus_overlays_delivered(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        study = bilateral_study()
        send_study(agent, study)
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5)
        assert len(pacs.received) == 5  # 4 overlays + 1 SR
        classes = sorted(str(d.SOPClassUID) for d in pacs.received)
        assert classes.count(SECONDARY_CAPTURE) == 4 and classes.count(COMPREHENSIVE_3D_SR) == 1
        assert {str(d.StudyInstanceUID) for d in pacs.received} == {study[0].StudyInstanceUID}
        assert all(j.state == JobState.DONE for j in list_jobs(agent.db))
        # the tiny model flags everybody at its 0.45 threshold: one row per patient, not per image
        flagged = list_flagged(agent.db)
        assert len(flagged) == 1 and flagged[0].patient_id == study[0].PatientID and flagged[0].studies == 1
        assert {i.state for i in outbox.items(agent.db)} == {OutboxState.DELIVERED.value}
        # conformance statement 2.1 and 3.1: the sender names itself as the agent and proposes
        # Explicit VR Little Endian only
        assert pacs.requestors and all(
            (uid, name, syntaxes) == (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, {ExplicitVRLittleEndian})
            for uid, name, syntaxes in pacs.requestors
        ), pacs.requestors


def test_late_instance_yields_a_new_sr_referencing_its_predecessor(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        study = bilateral_study(1)
        send_study(agent, study)
        wait_for(lambda: sum(str(d.SOPClassUID) == COMPREHENSIVE_3D_SR for d in pacs.received) == 1)
        late = knee_dx(study_uid=study[0].StudyInstanceUID, laterality="L", seed=7, rows=320, cols=256)
        send_study(agent, [late])
        wait_for(lambda: sum(str(d.SOPClassUID) == COMPREHENSIVE_3D_SR for d in pacs.received) == 2)
        first, second = [d for d in pacs.received if str(d.SOPClassUID) == COMPREHENSIVE_3D_SR]
        assert first.SOPInstanceUID != second.SOPInstanceUID
        pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
        # once reported, a study costs the completion sweep nothing: one statement, no rows
        statements: list[str] = []

        me = threading.get_ident()  # the agent's own threads use the same engine meanwhile

        def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if threading.get_ident() == me:
                statements.append(statement)

        sqlalchemy.event.listen(agent.db.engine, "before_cursor_execute", count)
        try:
            assert screening.ready_studies(agent.db, 0.0) == []
        finally:
            sqlalchemy.event.remove(agent.db.engine, "before_cursor_execute", count)
        assert len([st for st in statements if st.lstrip().upper().startswith("SELECT")]) == 1


def test_non_knee_is_skipped_and_nothing_is_sent(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        send_study(agent, [knee_dx(body_part="CHEST")])
        time.sleep(2.5)  # quiet period and sweeps pass
        assert pacs.received == []
        (job,) = list_jobs(agent.db)
        assert job.state == JobState.SKIPPED and BODY_PART_REASON in (job.reason or "")
        assert outbox.items(agent.db) == []


def test_shadow_mode_records_everything_and_sends_nothing(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"send": False})
        send_study(agent, bilateral_study(1))
        wait_for(lambda: len(outbox.items(agent.db)) == 3)
        time.sleep(1.0)
        assert pacs.received == []
        assert {i.state for i in outbox.items(agent.db)} == {OutboxState.SHADOW.value}
        assert len(list_flagged(agent.db)) == 1
        for item in outbox.items(agent.db):  # the objects were built and kept
            assert agent.results.path(item.path).stat().st_size > 0


def test_warning_status_counts_as_delivered(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer(answer=lambda ds: status.WARNING_COERCION) as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        send_study(agent, bilateral_study(1)[:1])
        wait_for(
            lambda: (
                {i.state for i in outbox.items(agent.db)} == {OutboxState.DELIVERED.value}
                and len(outbox.items(agent.db)) == 2
            )
        )
        assert {i.last_status for i in outbox.items(agent.db)} == {"warning_coercion"}


def test_permanent_refusal_is_dead_at_once_and_replay_delivers(make_agent: Any, tiny_weights: Path) -> None:
    answers = {"code": status.CANNOT_UNDERSTAND}
    with PacsPeer(answer=lambda ds: answers["code"]) as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        with structlog.testing.capture_logs() as logs:
            send_study(agent, bilateral_study(1)[:1])
            wait_for(
                lambda: (
                    len(outbox.items(agent.db)) == 2
                    and {i.state for i in outbox.items(agent.db)} == {OutboxState.DEAD.value}
                )
            )
        assert all(i.attempts == 1 for i in outbox.items(agent.db))  # no retry storm
        # the log event docs/operations.md names, an error for each item
        dead = sorted((e["log_level"], e["outbox_id"]) for e in logs if e["event"] == "result_dead")
        assert dead == sorted(("error", i.id) for i in outbox.items(agent.db))
        time.sleep(1.0)
        assert len(pacs.statuses) == 2
        answers["code"] = status.SUCCESS
        assert outbox.replay_dead(agent.db) == 2
        agent.sender.wake.set()
        wait_for(lambda: {i.state for i in outbox.items(agent.db)} == {OutboxState.DELIVERED.value})


def test_the_status_classes_of_the_conformance_statement() -> None:
    """Conformance statement 3.2: warnings are delivered, out of resources and resource
    limitation retried, every other failure permanent."""
    classes = {
        status.StatusClass.SUCCESS: [0x0000],
        status.StatusClass.WARNING: [0xB000, 0xB006, 0xB007, 0xB123],
        status.StatusClass.TRANSIENT: [0xA700, 0xA7FF, 0x0213],
        status.StatusClass.PERMANENT: [0xA900, 0xA9FF, 0xC000, 0xC210, 0x0110, 0x0122, 0x0124, 0x0211],
    }
    assert {code: status.classify(code) for cls, codes in classes.items() for code in codes} == {
        code: cls for cls, codes in classes.items() for code in codes
    }


def test_a_sop_class_the_pacs_does_not_accept_is_dead_at_once_and_the_others_delivered(
    make_agent: Any, tiny_weights: Path
) -> None:
    """Conformance statement 3.2: "SOP class not accepted: permanent, DEAD at once"."""
    with PacsPeer(sop_classes=[SECONDARY_CAPTURE]) as pacs:  # no Comprehensive 3D SR
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        send_study(agent, bilateral_study(1)[:1])
        wait_for(
            lambda: (
                sorted((i.kind, i.state) for i in outbox.items(agent.db))
                == [("sc", OutboxState.DELIVERED.value), ("sr", OutboxState.DEAD.value)]
            )
        )
        (sr,) = [i for i in outbox.items(agent.db) if i.kind == "sr"]
        assert sr.attempts == 1 and "did not accept the SOP class" in (sr.last_error or "")
        assert [str(d.SOPClassUID) for d in pacs.received] == [SECONDARY_CAPTURE]


def test_out_of_resources_is_retried_with_backoff(make_agent: Any, tiny_weights: Path) -> None:
    calls = {"n": 0}

    def answer(ds: Any) -> int:
        calls["n"] += 1
        return status.OUT_OF_RESOURCES if calls["n"] <= 2 else status.SUCCESS

    with PacsPeer(answer=answer) as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, reporting={"overlay": False})
        with structlog.testing.capture_logs() as logs:
            send_study(agent, bilateral_study(1)[:1])
            wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value])
        assert len(pacs.received) == 1
        (item,) = outbox.items(agent.db)
        assert item.state == OutboxState.DELIVERED.value and item.attempts == 3
        # the log event docs/operations.md names, a warning for each try that is to be repeated
        retries = [(e["log_level"], e["outbox_id"], e["attempt"]) for e in logs if e["event"] == "result_retry"]
        assert retries == [("warning", item.id, 1), ("warning", item.id, 2)]
        assert not [e for e in logs if e["event"] == "result_dead"]


def test_pacs_down_then_back_delivers(make_agent: Any, tiny_weights: Path) -> None:
    pacs = PacsPeer()  # not started: connection refused
    agent = screening_agent(
        make_agent, tiny_weights, pacs.port, reporting={"overlay": False}, sender={"max_attempts": 50}
    )
    send_study(agent, bilateral_study(1)[:1])
    wait_for(lambda: any(i.state == OutboxState.RETRY.value for i in outbox.items(agent.db)))
    with pacs:
        wait_for(lambda: len(pacs.received) == 1, timeout_s=30)


def test_rejected_association_goes_dead(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer(allowed_calling=["SOMEONE_ELSE"]) as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, reporting={"overlay": False})
        send_study(agent, bilateral_study(1)[:1])
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DEAD.value])
        assert outbox.items(agent.db)[0].attempts == 1


def test_results_are_sent_when_recorded_not_at_the_next_poll(make_agent: Any, tiny_weights: Path) -> None:
    # The sender polls once a minute and the scheduler nudges it every 15 s: delivery within 10 s
    # needs the worker to wake it when it commits an overlay or an SR to the outbox.
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"poll_s": 60.0})
        send_study(agent, bilateral_study())
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5, 10.0)
        assert len(pacs.received) == 5


def test_one_association_carries_a_study_and_is_released_when_idle(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"keep_open_s": 30.0, "connections": 1})
        send_study(agent, bilateral_study())
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5)
        # four overlays as they were screened, the SR seconds later: all on the one kept open
        assert (pacs.associations, pacs.open) == (1, 1)
        agent.sender.cfg = agent.sender.cfg.model_copy(update={"keep_open_s": 0.3})
        agent.sender.wake.set()
        wait_for(lambda: pacs.open == 0, timeout_s=10)  # released once idle, not held for good
        assert pacs.associations == 1


@pytest.mark.parametrize("connections", [1, 2])
def test_connections_send_at_the_same_time(make_agent: Any, tiny_weights: Path, connections: int) -> None:
    """``sender.connections`` lanes store in parallel, each over its own association; one lane
    stores one object at a time. The peer takes 0.4 s per C-STORE, as a PACS writing to disk.
    Lanes poll once a minute here: each outbox commit must wake every one of them."""

    def slow(ds: Any) -> int:
        time.sleep(0.4)
        return 0x0000

    with PacsPeer(answer=slow) as pacs:
        agent = screening_agent(
            make_agent,
            tiny_weights,
            pacs.port,
            sender={"keep_open_s": 30.0, "connections": connections, "poll_s": 60.0},
        )
        send_study(agent, bilateral_study())
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5, timeout_s=30)
        assert pacs.most_storing == connections
        assert pacs.associations == connections
        assert sorted(pacs.uids()) == sorted(i.sop_instance_uid for i in outbox.items(agent.db))  # each once


def test_a_held_association_the_pacs_aborted_is_replaced(make_agent: Any, tiny_weights: Path) -> None:
    """Between sends a held association's reactor is paused (sender.quiet); an abort from the
    PACS meanwhile must still be noticed, and the next object go over a new association."""
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"keep_open_s": 60.0, "connections": 1})
        send_study(agent, bilateral_study(1)[:1])
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 2)
        assert pacs.open == 1
        [held] = pacs.server.active_associations
        held.abort()
        wait_for(lambda: pacs.open == 0)
        send_study(agent, bilateral_study(2)[:1])
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 4, timeout_s=15)
        assert pacs.associations == 2
        assert [i.attempts for i in outbox.items(agent.db)] == [1] * 4  # not tried on the dead one first


def test_a_held_association_the_pacs_releases_is_released_and_replaced(make_agent: Any, tiny_weights: Path) -> None:
    """An A-RELEASE-RQ from the PACS while the held association's reactor is paused: the agent
    answers it (a release, not an abort) and sends the next study over a new association."""
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"keep_open_s": 60.0, "connections": 1})
        send_study(agent, bilateral_study(1)[:1])
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 2)
        [held] = pacs.server.active_associations
        held.release()  # returns once the agent answered, or after the peer's ACSE timeout
        wait_for(lambda: pacs.open == 0)
        assert (pacs.released, pacs.aborted) == (1, 0)
        send_study(agent, bilateral_study(2)[:1])
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 4, timeout_s=15)
        assert pacs.associations == 2
        assert [i.attempts for i in outbox.items(agent.db)] == [1] * 4


def test_a_pacs_that_allows_one_association_gets_everything_over_it(make_agent: Any, tiny_weights: Path) -> None:
    """Two lanes, a PACS that accepts one association per AE: the refused lane hands its objects
    to the connected one without counting attempts; nothing goes DEAD or waits for a backoff."""

    def slow(ds: Any) -> int:
        time.sleep(0.3)
        return 0x0000

    with PacsPeer(answer=slow, max_associations=1) as pacs:
        agent = screening_agent(
            make_agent, tiny_weights, pacs.port,
            sender={"keep_open_s": 30.0, "connections": 2, "backoff_base_s": 60.0},
        )  # fmt: skip
        send_study(agent, bilateral_study())
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5, timeout_s=30)
        # A refusal counts an attempt only when no lane held an association to hand over to: the
        # PACS refused both lanes at once (its limit counts requests still being negotiated; seen
        # on a loaded machine). Each such refusal may count one attempt, never more.
        extra = sum(i.attempts - 1 for i in outbox.items(agent.db))
        assert all(i.attempts <= 2 for i in outbox.items(agent.db)) and extra <= pacs.refused_none_open, (
            [i.attempts for i in outbox.items(agent.db)], pacs.refused_none_open
        )
        assert pacs.most_storing == 1
        assert sorted(pacs.uids()) == sorted(i.sop_instance_uid for i in outbox.items(agent.db))


def test_keep_open_zero_releases_after_each_batch(make_agent: Any, tiny_weights: Path) -> None:
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, sender={"keep_open_s": 0.0, "connections": 1})
        send_study(agent, bilateral_study())
        wait_for(lambda: [i.state for i in outbox.items(agent.db)] == [OutboxState.DELIVERED.value] * 5)
        wait_for(lambda: pacs.open == 0, timeout_s=10)
        assert pacs.associations >= 2  # the SR came after the overlays, on an association of its own


def test_an_association_lost_before_a_send_is_retried_not_dead(make_agent: Any, tiny_weights: Path) -> None:
    """pynetdicom raises RuntimeError when the association is gone (the PACS released or aborted
    the one kept open between our check and the send): transient, unlike a refused SOP class."""
    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port, reporting={"overlay": False})
        agent.sender.stop()  # this test drives the sender itself
        send_study(agent, bilateral_study(1)[:1])
        wait_for(lambda: len(outbox.items(agent.db)) == 1)  # the SR
        [item] = outbox.lease_due(agent.db)

        class Gone:  # stands in for an association that ended between the check and the send
            is_established = True

            def send_c_store(self, path: Any) -> None:
                raise RuntimeError("The association with a peer SCP must be established")

        agent.sender._send_one(Gone(), agent.settings.pacs[0], item)
        [after] = outbox.items(agent.db)
        assert after.state == OutboxState.RETRY.value and "association lost" in (after.last_error or "")


def test_two_films_of_the_left_knee_and_one_of_the_right_make_two_knees(make_agent: Any, tiny_weights: Path) -> None:
    """Issue 24: the SR's commit records one knee row per knee with the films' figures combined
    (model/knee.py, checked here against the recorded image results), the SR the PACS receives
    states each knee in its study summary, and the flagged row shows the most probable knee."""
    import pydicom.uid

    from agent.db import worklist
    from agent.db.models import KneeResult, Result
    from agent.pipeline.knees import study_knees
    from agent.reporting import codes
    from model.knee import logit

    with PacsPeer() as pacs:
        agent = screening_agent(make_agent, tiny_weights, pacs.port)
        study_uid, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        films = [
            knee_dx(study_uid=study_uid, series_uid=series, laterality=side, seed=k, rows=320, cols=256)
            for k, side in enumerate(("L", "L", "R"))
        ]
        for ds in films:
            ds.ViewPosition = "AP"
        send_study(agent, films)
        wait_for(lambda: any(str(d.SOPClassUID) == COMPREHENSIVE_3D_SR for d in pacs.received))
        with agent.db.reading() as s:
            results = s.query(Result).order_by(Result.instance_id).all()
            knees = s.query(KneeResult).order_by(KneeResult.id).all()
        assert len(results) == 3 and [(k.laterality, k.n_images) for k in knees] == [("L", 2), ("R", 1)]
        left, right = knees
        assert left.result_ids == [results[0].id, results[1].id] and right.result_ids == [results[2].id]
        p0, p1 = results[0].probability, results[1].probability
        assert left.probability == pytest.approx(1 / (1 + np.exp(-(logit(p0) + logit(p1)) / 2)), rel=1e-9)
        assert left.t_score == pytest.approx((results[0].t_score + results[1].t_score) / 2)
        assert left.t_score_high - left.t_score == pytest.approx(results[0].t_score_high - results[0].t_score)
        assert (right.probability, right.t_score) == (results[2].probability, results[2].t_score)
        assert left.bone_loss == (left.probability >= left.threshold)
        # the SR as the PACS got it: one Knee result container per knee in the study summary
        sr = next(d for d in pacs.received if str(d.SOPClassUID) == COMPREHENSIVE_3D_SR)
        [summary] = [i for i in sr.ContentSequence
                     if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value]  # fmt: skip
        items = [i for i in summary.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == codes.KNEE_RESULT.value]  # fmt: skip
        assert len(items) == 2
        for item, knee in zip(items, knees, strict=True):
            by_code = {i.ConceptNameCodeSequence[0].CodeValue: i for i in item.ContentSequence}
            p = float(by_code[codes.PROBABILITY.value].MeasuredValueSequence[0].NumericValue)
            assert p == pytest.approx(knee.probability * 100, abs=1e-3)
            n = float(by_code[codes.KNEE_IMAGES.value].MeasuredValueSequence[0].NumericValue)
            assert n == knee.n_images
        words = {i.ConceptNameCodeSequence[0].CodeValue: i for i in items[0].ContentSequence}[codes.IMPRESSION.value]
        assert words.TextValue.startswith("Left knee, 2 images: ")
        # the flagged row: the positive knee of the highest probability (the tiny model flags all)
        assert left.bone_loss and right.bone_loss
        top = max(knees, key=lambda k: k.probability)
        rows, total = worklist.flagged_page(agent.db, worklist.FlaggedFilter())
        assert total == 1
        (row,) = rows
        assert (row.knee_laterality, row.knee_images) == (top.laterality, top.n_images)
        assert (row.probability, row.t_score) == (top.probability, top.t_score)
        assert row.knee == ("Left knee, 2 images" if top.laterality == "L" else "Right knee, 1 image")
        # what the reporter gave the SR is what the rule gives on the recorded results
        served = [screening.findings_of(r, agent.reporter.served_model()) for r in results]
        again = study_knees(["L", "L", "R"], served)
        assert [k.probability for k in again] == pytest.approx([k.probability for k in knees])
