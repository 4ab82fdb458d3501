"""Issue 22: STOW-RS to Orthanc's DICOMweb plugin delivers the same objects as C-STORE.

A study is routed from one Orthanc (the source, and the agent's C-STORE destination) to the agent,
which sends its results to that Orthanc by C-STORE and to a second Orthanc, with the DICOMweb
plugin, by STOW-RS (``[[pacs]] kind = "dicomweb"``). Both must hold the same SOP Instances with
the same dataset bytes and the same attributes as Orthanc reports them. What the sender does with
answers Orthanc cannot be made to give (202, 409, 5xx ...) is in tests/unit/test_dicomweb.py.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from test_screen_report_orthanc import (
    SC_CLASS,
    SR_CLASS,
    agent_overrides,
    count_classes,
    knee_study,
    results_in,
    start_orthanc,
    upload_and_route,
    wait_for,
)

from agent.demo.orthanc import LocalOrthanc
from agent.domain import OutboxState
from agent.queue import outbox

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def dataset_bytes(part10: bytes) -> bytes:
    """A Part 10 file's dataset, as stored, after its preamble and file meta (group 0002, explicit
    VR little endian): each PACS writes a file meta of its own."""
    assert part10[128:132] == b"DICM"
    pos = 132
    while struct.unpack_from("<H", part10, pos)[0] == 0x0002:
        vr = part10[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack_from("<I", part10, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", part10, pos + 6)[0]
    return part10[pos:]


def test_stow_rs_to_orthanc_dicomweb_delivers_the_same_objects_as_c_store(
    make_agent: Any, tiny_weights: Path, tmp_path: Path
) -> None:
    study_uid, files = knee_study(tmp_path, sides=("L", "R"), patient="PAT-WEB")
    agent_port = free_port()
    source = start_orthanc(agent_port, tmp_path)
    web = LocalOrthanc("WEBPACS", dicomweb=True, work_dir=tmp_path / "web").start()
    try:
        settings = agent_overrides(tiny_weights, source, agent_port)
        settings["pacs"] = [
            *settings["pacs"],  # "orthanc": C-STORE to the source
            {"name": "web", "kind": "dicomweb", "url": web.dicomweb_url},
        ]
        agent = make_agent(**settings)
        upload_and_route(source, files, [study_uid])
        want = Counter({SC_CLASS: 2, SR_CLASS: 1})
        wait_for(lambda: count_classes(results_in(source, study_uid)) == want, 120, "results by C-STORE")
        wait_for(lambda: count_classes(web.instances_of_study(study_uid)) == want, 60, "results by STOW-RS")
        rows = outbox.items(agent.db)
        assert Counter((r.destination, r.state) for r in rows) == Counter(
            {("orthanc", OutboxState.DELIVERED.value): 3, ("web", OutboxState.DELIVERED.value): 3}
        )
        assert {r.last_status for r in rows if r.destination == "web"} == {"HTTP 200 OK"}

        by_cstore = {i["SOPInstanceUID"]: i for i in results_in(source, study_uid)}
        by_stow = {i["SOPInstanceUID"]: i for i in web.instances_of_study(study_uid)}
        assert by_cstore.keys() == by_stow.keys()  # the same SOP Instances, and nothing else in the study
        for uid, c in by_cstore.items():
            s = by_stow[uid]
            assert (c["SOPClassUID"], c["SeriesInstanceUID"], c["TransferSyntaxUID"]) == (
                s["SOPClassUID"], s["SeriesInstanceUID"], s["TransferSyntaxUID"],
            )  # fmt: skip
            assert dataset_bytes(source.instance_file(c["ID"])) == dataset_bytes(web.instance_file(s["ID"]))
            assert source.get(f"/instances/{c['ID']}/tags") == web.get(f"/instances/{s['ID']}/tags")
            # and what the agent keeps on disk is what both hold
            row = next(r for r in rows if r.sop_instance_uid == uid and r.destination == "web")
            kept = (agent.settings.results_dir / row.path).read_bytes()
            assert dataset_bytes(kept) == dataset_bytes(web.instance_file(s["ID"]))
    finally:
        web.stop()
        source.stop()
