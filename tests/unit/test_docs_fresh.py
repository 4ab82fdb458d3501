"""Documentation that is generated from code must match the code."""

from __future__ import annotations

from pathlib import Path

from agent.config_docs import render

ROOT = Path(__file__).parents[2]


def test_configuration_md_is_current() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert current == render(), "docs/configuration.md is stale: run `strnet config docs --out docs/configuration.md`"


def test_conformance_statement_lists_every_accepted_sop_class_and_syntax() -> None:
    from agent.ingest.scp import KEPT_NOT_SCREENED_SOP_CLASSES, STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES

    text = (ROOT / "docs" / "dicom-conformance.md").read_text(encoding="utf-8")
    for uid in [*STORAGE_SOP_CLASSES, *KEPT_NOT_SCREENED_SOP_CLASSES, *TRANSFER_SYNTAXES, "1.2.840.10008.1.1"]:
        assert str(uid) in text, f"{uid} ({getattr(uid, 'name', '')}) missing from docs/dicom-conformance.md"
