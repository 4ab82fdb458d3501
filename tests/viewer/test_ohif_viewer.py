"""The screening SR in a real viewer: OHIF v3 (npm @ohif/app 3.13.2) on Orthanc's DICOMweb, in
Debian's Chromium driven by Playwright (never `playwright install`). No agent: the study is made by
model/synth (what the demo sends), the SR by agent.reporting.sr.build_sr on made-up findings.

OHIF lists the study's series, draws the films (not black: 16-bit synthetic DX), and opens the SR
in its SR viewport without crashing. tests/viewer/ohif.py has the server and the driver;
tests/viewer/try_sr.py runs the same on any files. Each run leaves srview.json and screenshots in
the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ohif import OHIF_DIST, SR_SERIES_PREFIX, OhifServer, SrView, launch_chromium, open_sr

from agent.demo.orthanc import DICOMWEB_PLUGIN, LocalOrthanc
from agent.domain import AlgorithmInfo, Findings

pytestmark = [pytest.mark.browser, pytest.mark.viewer]

ALGO = AlgorithmInfo(name="STR-Net", version="0.3.1-test", checkpoint_sha256="c0ffee" * 10 + "abcd")


def _findings(n: int) -> list[Findings]:
    common: dict[str, Any] = {"threshold": 0.4217, "interval_coverage": 0.9, "algorithm": ALGO}
    made_up = [
        Findings(0.8731, bone_loss=True, p_osteoporosis_given_bone_loss=0.71, severity="osteoporosis",
                 t_score=-2.73, t_score_low=-3.41, t_score_high=-1.96, **common),
        Findings(0.1523, bone_loss=False, p_osteoporosis_given_bone_loss=0.05, severity=None,
                 t_score=-0.41, t_score_low=-1.12, t_score_high=0.33, **common),
    ]  # fmt: skip
    return [made_up[i % 2] for i in range(n)]


def _knee_study(out: Path) -> tuple[str, list[Path]]:
    """The first study of a synthetic patient (two films, 16-bit DX) and its SR, written to ``out``."""
    from agent.reporting.sr import build_sr
    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import build_dataset
    from model.synth.generate import patient_images

    _patient, records = patient_images(7, 0)
    sources, paths = [], []
    for i, rec in enumerate(r for r in records if r.study_index == 0):
        ds = build_dataset(rec.image.stored, rec.header, VENDOR_PROFILES[rec.image.profile])
        assert "VOILUTFunction" not in ds  # OHIF 3.13 refuses to draw an image that names one
        paths.append(out / f"film{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        sources.append(ds)
    from agent.dicom_values import read_laterality
    from agent.pipeline.knees import study_knees

    findings = _findings(len(sources))  # with its knees, as the agent builds it (issue 24)
    sr = build_sr(sources, findings, knees=study_knees([read_laterality(ds)[0] for ds in sources], findings))
    paths.append(out / "sr.dcm")
    sr.save_as(paths[-1], enforce_file_format=True)
    return str(sources[0].StudyInstanceUID), paths


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, int, Any]]:
    """(OHIF's URL, the study UID, number of films, a Chromium browser): all stopped at the end."""
    from playwright.sync_api import sync_playwright

    # `make test` installs these; a missing one is a set-up error, not a skip
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail(f"no OHIF at {OHIF_DIST}: run `make test` (its `ohif` step unpacks @ohif/app)")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.fail("Orthanc's DICOMweb plugin is missing: run `make test` (it installs orthanc-dicomweb)")
    study_uid, paths = _knee_study(tmp_path_factory.mktemp("viewer-study"))
    with LocalOrthanc(aet="VIEWERPACS", dicomweb=True) as orthanc:
        for path in paths:
            orthanc.upload(path)
        with OhifServer(OHIF_DIST, orthanc.url) as ohif, sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                yield ohif.url, study_uid, len(paths) - 1, browser
            finally:
                browser.close()


def _open(viewer: tuple[str, str, int, Any], tmp_path: Path) -> SrView:
    base, study_uid, _films, browser = viewer
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        view = open_sr(context.new_page(), base, study_uid, screenshot=tmp_path / "sr.png")
    finally:
        context.close()
    (tmp_path / "srview.json").write_text(view.to_json() + "\n", encoding="utf-8")
    return view


def test_ohif_shows_the_study_and_opens_the_sr(viewer: tuple[str, str, int, Any], tmp_path: Path) -> None:
    films = viewer[2]
    view = _open(viewer, tmp_path)
    report = f"\n{view.to_json()}\n(screenshots in {tmp_path})"

    # the study: every film and the SR listed in the study browser, the first film drawn
    assert view.study_loaded, report
    assert len([s for s in view.series if s.startswith("DX ")]) == films, report
    assert view.sr_series is not None and view.sr_series.startswith(f"SR {SR_SERIES_PREFIX}"), report
    assert view.image_rendered, report
    assert view.image_mean is not None and 10 < view.image_mean < 245, f"film drawn black or white{report}"

    # the SR: OHIF parsed it as a measurement report and its SR viewport shows it, no crash
    assert view.sr_display_set is not None and view.sr_display_set["isImagingMeasurementReport"], report
    assert view.sr_opened and view.error is None, report
    assert not [c for c in view.console if c.startswith("pageerror:") or "Error Boundary" in c], report
    assert view.external_requests == [], report  # nothing leaves the machine
    # TODO(lead): measurements: view.sr_display_set["measurements"], view.svg_texts, view.has_shape,
    # view.measurement_count / measurement_rows (after hydration), view.hydrate_error
