"""docs/fhir.md's example bundle is what agent/ehr/fhir_bundle.py builds for its synthetic study:
the spec cannot drift from the code. Regenerate with `python tests/unit/test_fhir_doc.py`."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from ehr_sample import study  # noqa: E402

from agent.config import FhirSection  # noqa: E402
from agent.ehr.fhir_bundle import build_bundle  # noqa: E402

DOC = ROOT / "docs" / "fhir.md"
_BLOCK = re.compile(r"(<!-- example-bundle -->\n```json\n)(.*?)(```)", re.S)


def example() -> str:
    result = dataclasses.replace(
        study(),
        study_instance_uid="2.25.31415926535897932384626433832795028841",
        report_sop_instance_uid="2.25.27182818284590452353602874713526624977",
        report_series_instance_uid="2.25.16180339887498948482045868343656381177",
    )
    dest = FhirSection(name="ehr", base_url="https://ehr.example.org/fhir")
    return json.dumps(json.loads(build_bundle(result, dest)), indent=2, ensure_ascii=False) + "\n"


def test_the_example_bundle_in_the_doc_is_what_the_builder_builds() -> None:
    found = _BLOCK.search(DOC.read_text(encoding="utf-8"))
    assert found, "docs/fhir.md has no example-bundle block"
    assert found.group(2) == example(), "docs/fhir.md example is stale: run python tests/unit/test_fhir_doc.py"


if __name__ == "__main__":
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(_BLOCK.sub(lambda m: m.group(1) + example() + m.group(3), text), encoding="utf-8")
