"""The SR and the overlay: built, written, validated by dciodvfy and dsrdump, re-read and checked.

Both objects pass dciodvfy with zero errors, dsrdump renders the SR, they
land in the source study with deterministic UIDs, and a later report names its predecessor.
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import require_tool
from dicom_factory import BAD_VALUES, PHI_ID, PHI_NAME, RESULT_TYPE2, as_received, knee_dx, set_raw, write
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from agent.domain import AlgorithmInfo, Findings
from agent.pipeline.knees import study_knees
from agent.reporting import codes
from agent.reporting.overlay import MAX_SIDE_PX, build_overlay
from agent.reporting.sr import build_sr
from agent.reporting.uids import result_uid

ALGO = AlgorithmInfo(name="STR-Net", version="0.3.1-test", checkpoint_sha256="c0ffee" * 10 + "abcd")
VIEWS = [("L", "AP"), ("L", "LL"), ("R", "AP"), ("R", "LL")]


def _findings(rng: np.random.Generator) -> list[Findings]:
    common: dict[str, Any] = {"threshold": 0.4217, "interval_coverage": 0.9, "algorithm": ALGO}

    def saliency() -> np.ndarray:
        return (rng.random((24, 24)) * 0.8).astype(np.float32)  # the model's input grid

    return [
        Findings(0.8731, bone_loss=True, p_osteoporosis_given_bone_loss=0.71, severity="osteoporosis",
                 t_score=-2.73, t_score_low=-3.41, t_score_high=-1.96, saliency=saliency(),
                 region=(48, 18, 252, 222), **common),
        Findings(0.6402, bone_loss=True, p_osteoporosis_given_bone_loss=0.22, severity="osteopenia",
                 t_score=-1.62, t_score_low=-2.35, t_score_high=-0.88, saliency=saliency(),
                 region=(0, -30, 300, 270), **common),
        Findings(0.1523, bone_loss=False, p_osteoporosis_given_bone_loss=0.05, severity=None,
                 t_score=-0.41, t_score_low=-1.12, t_score_high=0.33, saliency=saliency(),
                 **common),
        Findings(0.2089, bone_loss=False, p_osteoporosis_given_bone_loss=0.07, severity=None,
                 t_score=0.12, t_score_low=-0.61, t_score_high=0.86, saliency=None,
                 region=(48, 18, 252, 222), **common),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bilateral two-view knee study, its findings and knees (as the reporter gives them), and the
    SR and overlays written to disk."""
    out = tmp_path_factory.mktemp("reporting")
    study_uid = generate_uid()
    sources = []
    for i, (laterality, view) in enumerate(VIEWS):
        ds = knee_dx(study_uid=study_uid, laterality=laterality, seed=i, rows=300, cols=240)
        ds.ViewPosition = view
        ds.InstanceNumber = i + 1
        sources.append(ds)
    findings = _findings(np.random.default_rng(7))
    knees = study_knees([lat for lat, _ in VIEWS], findings)
    sr = build_sr(sources, findings, knees=knees)
    sr_path = out / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    overlays, overlay_paths = [], []
    for i, (ds, f) in enumerate(zip(sources, findings, strict=True)):
        image = ds.pixel_array.astype(np.float32) / 4095.0
        sc = build_overlay(ds, image, f, instance_number=i + 1)
        overlays.append(sc)
        overlay_paths.append(out / f"sc{i}.dcm")
        sc.save_as(overlay_paths[-1], enforce_file_format=True)
    return {
        "dir": out,
        "sources": sources,
        "findings": findings,
        "knees": knees,
        "sr": sr,
        "sr_path": sr_path,
        "overlays": overlays,
        "overlay_paths": overlay_paths,
    }


def _dciodvfy(path: Path) -> tuple[int, str]:
    """(number of Error/Abort lines, full output); its exit code is not reliable."""
    tool = require_tool("dciodvfy")
    proc = subprocess.run(
        [tool, str(path)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    text = proc.stdout + proc.stderr
    return len(re.findall(r"^(?:Error|Abort)", text, flags=re.MULTILINE)), text


def _dsrdump(path: Path) -> str:
    tool = require_tool("dsrdump")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---- validators ---------------------------------------------------------------------------------


def test_sr_passes_dciodvfy(study: dict[str, Any]) -> None:
    errors, text = _dciodvfy(study["sr_path"])
    assert errors == 0, text
    # Only the expected warnings: our private coding scheme designator, nothing else.
    warnings = [line for line in text.splitlines() if line.startswith("Warning")]
    assert all("99STRNET" in line for line in warnings), warnings


def test_overlays_pass_dciodvfy(study: dict[str, Any]) -> None:
    for path in study["overlay_paths"]:
        errors, text = _dciodvfy(path)
        assert errors == 0, f"{path.name}:\n{text}"


def test_dciodvfy_counts_errors(tmp_path: Path) -> None:
    """The gate can fail: an SR stripped of a Type 1 attribute is reported."""
    ds = pydicom.dcmread(_one_image_sr(tmp_path))
    del ds.ValueType
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    errors, _ = _dciodvfy(broken)
    assert errors > 0


def _one_image_sr(tmp_path: Path) -> Path:
    sources = [knee_dx(laterality="L")]
    path = tmp_path / "one.dcm"
    build_sr(sources, _findings(np.random.default_rng(1))[:1]).save_as(
        path, enforce_file_format=True
    )
    return path


def test_dsrdump_renders_findings(study: dict[str, Any]) -> None:
    text = _dsrdump(study["sr_path"])
    for expected in (
        '(64859006,SCT,"Osteoporosis")',
        '(312894000,SCT,"Osteopenia")',
        '(17621005,SCT,"Normal")',
        '(BONE-LOSS,99STRNET,"Bone loss suspected")',
        '"Probability")="87.31" (%,UCUM,"percent")',
        # what it is the probability of, beside a Finding that names a severity
        '"Measurement Method")=(P-BONE-LOSS,99STRNET,"Calibrated probability of bone loss (screening head)")',
        '"Threshold Value")="42.17" (%,UCUM,"percent")',
        '"Estimated T-score")="-2.73" ({T-score},UCUM,"T-score")',
        '"Estimated T-score lower bound")="-3.41"',
        # TID 310's uncertainty range in the T-score's unit (highdicom would write "no units")
        '"+, range of upper measurement uncertainty")="0.77" ({T-score},UCUM,"T-score")',
        '"-, range of lower measurement uncertainty")="0.68" ({T-score},UCUM,"T-score")',
        '"Estimated T-score upper bound")="-1.96"',
        '"Algorithm Name")="STR-Net"',
        '"Algorithm Version")="0.3.1-test"',
        '(7771000,SCT,"Left")',
        '(24028007,SCT,"Right")',
        '"Tracking Identifier")="Left knee AP"',
        '"Tracking Identifier")="Right knee LL"',
        # the assessed region, drawn by viewers; the probability is inferred from it
        '<contains SCOORD:(,,"Image Region")=(POLYLINE,',
        '<inferred from SCOORD:(,,"Source")=(POLYLINE,',
        '<contains CONTAINER:(,,"Qualitative Evaluations")=SEPARATE>',
        '<contains TEXT:(,,"Impression")="Bone loss suspected in 2 of',
        "NOT FOR DIAGNOSTIC USE",
        "UNVERIFIED",
    ):
        assert expected in text, expected
    # One planar ROI group per image; the summary is in Qualitative Evaluations, not a group
    # (a group without an image region stops OHIF v3 loading the whole report).
    assert text.count('CONTAINER:(,,"Measurement Group")') == len(VIEWS)
    # every container SEPARATE: text renderers then print each value with its name
    assert "=CONTINUOUS>" not in text and text.count("=SEPARATE>") == len(VIEWS) + 3 + len(study["knees"])


def _text_of_html(path: Path) -> str:
    html_text = path.read_text(encoding="utf-8", errors="replace")
    text = html.unescape(re.sub(r"<[^>]+>", " ", html_text))
    return re.sub(r"\s+", " ", text)


def test_dsr2html_shows_names_beside_values_and_the_disclaimer(study: dict[str, Any], tmp_path: Path) -> None:
    """What a text-rendering viewer shows (DCMTK dsr2html): each number after its name."""
    tool = require_tool("dsr2html")
    out = tmp_path / "sr.html"
    proc = subprocess.run([tool, str(study["sr_path"]), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = _text_of_html(out)
    assert re.search(r"Probability: 87\.31 %", text), text[:3000]
    assert re.search(r"Estimated T-score: -2\.73 \{T-score\}", text), text[:3000]
    assert re.search(r"Threshold Value: 42\.17 %", text)
    assert "Impression: Bone loss suspected in 2 of 4 screened images. Highest probability of bone loss 0.87" in text
    assert "its estimated T-score -2.7, 90% interval -3.4 to -2.0" in text
    assert "NOT FOR DIAGNOSTIC USE" in text.split("Impression:")[1]


def test_the_drawn_region_is_the_assessed_square_and_the_probability_is_inferred_from_it(
    study: dict[str, Any],
) -> None:
    """What OHIF v3 needs to draw and track a group: a group-level SCOORD on the source image,
    and the same SCOORD INFERRED FROM under the group's first NUM (tests/viewer shows it drawn)."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(study["sr_path"]))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(VIEWS)
    for src, f, group in zip(study["sources"], study["findings"], groups, strict=True):
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value.tolist()
        rows, cols = int(src.Rows), int(src.Columns)
        r0, c0, r1, c1 = f.region if f.region is not None else (0, 0, rows, cols)
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, rows), min(c1, cols)
        assert points == [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]  # closed, (column, row)
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        first_num = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
        assert first_num.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
        [inferred] = [i for i in first_num.ContentSequence if i.ValueType == "SCOORD"]
        assert inferred.RelationshipType == "INFERRED FROM"
        assert list(inferred.GraphicData) == [v for p in points for v in p]
        assert inferred.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_ihe_air_identity_dates_and_evidence(study: dict[str, Any]) -> None:
    """IHE AI Results items: the model in Contributing Equipment and General Equipment, the same
    device as the observer, a Device UID that changes with the checkpoint, Series Date/Time, every
    source image in the evidence, and no VOI LUT Function (OHIF 3.13 refuses "LINEAR")."""
    sr = pydicom.dcmread(study["sr_path"])
    [ours] = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102" and e.Manufacturer == "strnet-agent"
    ]
    assert ours.ManufacturerModelName == "STR-Net 0.3.1-test" and ours.SoftwareVersions == "0.3.1-test"
    assert sr.ManufacturerModelName == "STR-Net 0.3.1-test" and sr.SoftwareVersions == "0.3.1-test"
    observer = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert observer[0].UID == sr.DeviceUID
    assert re.fullmatch(r"\d{8}", sr.SeriesDate) and re.fullmatch(r"\d{6}", sr.SeriesTime)
    assert (sr.SeriesDate, sr.SeriesTime) <= (sr.ContentDate, sr.ContentTime)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(src.SOPInstanceUID) for src in study["sources"]}
    assert "VOILUTFunction" not in sr
    # new weights (same name and version): a new device
    other = dataclasses.replace(ALGO, checkpoint_sha256="ab" * 32)
    findings = [dataclasses.replace(f, algorithm=other) for f in study["findings"]]
    rebuilt = build_sr(study["sources"], findings)
    assert rebuilt.DeviceUID != sr.DeviceUID


# ---- identity and placement -------------------------------------------------------------------


def test_same_inputs_same_uids(study: dict[str, Any]) -> None:
    sources, findings = study["sources"], study["findings"]
    again = build_sr(sources, findings)
    assert again.SOPInstanceUID == study["sr"].SOPInstanceUID
    assert again.SeriesInstanceUID == study["sr"].SeriesInstanceUID
    for ds, f, sc in zip(sources, findings, study["overlays"], strict=True):
        image = ds.pixel_array.astype(np.float32) / 4095.0
        rebuilt = build_overlay(ds, image, f)
        assert rebuilt.SOPInstanceUID == sc.SOPInstanceUID
        assert rebuilt.SeriesInstanceUID == sc.SeriesInstanceUID
    assert len({sc.SOPInstanceUID for sc in study["overlays"]}) == len(VIEWS)
    assert len({sc.SeriesInstanceUID for sc in study["overlays"]}) == 1
    # A new revision or another model version is a new instance.
    assert build_sr(sources, findings, revision=2).SOPInstanceUID != again.SOPInstanceUID
    other = [
        dataclasses.replace(f, algorithm=dataclasses.replace(ALGO, version="9")) for f in findings
    ]
    assert build_sr(sources, other).SOPInstanceUID != again.SOPInstanceUID


def test_result_uid_shape() -> None:
    uid = result_uid("1.2.3.4", "1.0", "sc")
    assert uid == result_uid("1.2.3.4", "1.0", "sc")
    assert uid.startswith("2.25.") and len(uid) <= 64
    # "2.25." and a 128-bit integer: at most 44 characters (docs/sr-content.md section 5)
    assert max(len(result_uid(f"1.2.{i}", "1.0", "sc")) for i in range(2000)) == 44
    assert re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid)
    assert (
        len({result_uid("1.2.3.4", "1.0", k) for k in ("sr", "sr-series", "sc", "sc-series")}) == 4
    )
    with pytest.raises(ValueError, match="kind"):
        result_uid("1.2.3.4", "1.0", "srr")


def test_results_in_source_study_with_patient(study: dict[str, Any]) -> None:
    src = study["sources"][0]
    for ds in [study["sr"], *study["overlays"]]:
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "StudyDate", "StudyTime", "StudyID"):  # fmt: skip
            assert str(ds.get(keyword)) == str(src.get(keyword)), keyword
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.SeriesDescription == "STR-Net bone-loss screening (research, NOT FOR DIAGNOSTIC USE)"
        assert ds.SeriesNumber == (9901 if ds.Modality == "SR" else 9902)  # docs/sr-content.md
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    sr = study["sr"]
    assert (sr.Modality, sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == (
        "SR",
        "UNVERIFIED",
        "PRELIMINARY",
        "PARTIAL",
    )
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in study["sources"]}
    assert "PredecessorDocumentsSequence" not in sr


def test_predecessor_is_referenced(study: dict[str, Any]) -> None:
    sources, findings, first = study["sources"], study["findings"], study["sr"]
    previous = (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    late = build_sr(sources, findings, revision=2, predecessor=previous)
    assert late.SOPInstanceUID != first.SOPInstanceUID
    assert late.SeriesInstanceUID == first.SeriesInstanceUID
    item = late.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == first.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    path = study["dir"] / "sr2.dcm"
    late.save_as(path, enforce_file_format=True)
    errors, text = _dciodvfy(path)
    assert errors == 0, text
    assert "Predecessor Docs    : 1" in _dsrdump(path)
    with pytest.raises(ValueError, match="predecessor"):
        build_sr(sources, findings, predecessor=("1.2.3", "1.2.3.4", "1.2.3.4.5"))


def test_bad_inputs_are_refused(study: dict[str, Any]) -> None:
    sources, findings = study["sources"], study["findings"]
    with pytest.raises(ValueError, match="findings"):
        build_sr(sources, findings[:2])
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_sr([sources[0], knee_dx(laterality="R")], findings[:2])
    with pytest.raises(ValueError, match="t_score is not finite"):
        build_sr(sources[:1], [dataclasses.replace(findings[0], t_score=float("nan"))])
    with pytest.raises(ValueError, match="severity"):
        build_sr(sources[:1], [dataclasses.replace(findings[0], severity="mild")])


# ---- re-read --------------------------------------------------------------------------------


def test_sr_round_trips(study: dict[str, Any]) -> None:
    """highdicom's reader gives back the findings: per image (probabilities in %), and the study."""
    ds = pydicom.dcmread(study["sr_path"])
    assert ds.SOPInstanceUID == study["sr"].SOPInstanceUID
    [scheme] = ds.CodingSchemeIdentificationSequence
    assert (scheme.CodingSchemeDesignator, scheme.CodingSchemeName) == (
        "99STRNET",
        "strnet-agent private codes (see docs/sr-content.md)",
    )
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(VIEWS)
    by_image = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID: g for g in groups}
    for src, f in zip(study["sources"], study["findings"], strict=True):
        group = by_image[src.SOPInstanceUID]
        (probability,) = group.get_measurements(name=codes.PROBABILITY)
        assert probability.value == pytest.approx(f.probability * 100, abs=1e-2)
        assert probability.unit == codes.UNIT_PERCENT
        (threshold,) = group.get_measurements(name=codes.THRESHOLD)
        assert threshold.value == pytest.approx(f.threshold * 100, abs=1e-2)
        (p_osteoporosis,) = group.get_measurements(name=codes.P_OSTEOPOROSIS)
        assert p_osteoporosis.value == pytest.approx(f.p_osteoporosis_given_bone_loss * 100, abs=1e-2)
        (t_score,) = group.get_measurements(name=codes.ESTIMATED_T_SCORE)
        assert t_score.value == pytest.approx(f.t_score, abs=1e-2)
        assert t_score.unit == codes.UNIT_T_SCORE
        (low,) = group.get_measurements(name=codes.T_SCORE_LOWER)
        (high,) = group.get_measurements(name=codes.T_SCORE_UPPER)
        assert (low.value, high.value) == pytest.approx((f.t_score_low, f.t_score_high), abs=1e-2)
        (coverage,) = group.get_measurements(name=codes.INTERVAL_COVERAGE)
        assert coverage.value == pytest.approx(f.interval_coverage * 100)
        (result,) = group.get_qualitative_evaluations(name=codes.SCREENING_RESULT)
        assert result.value == (codes.BONE_LOSS_SUSPECTED if f.bone_loss else codes.NORMAL)
        severity = [q.value for q in group.get_qualitative_evaluations(name=codes.SEVERITY)]
        expected = codes.OSTEOPOROSIS if f.severity == "osteoporosis" else codes.OSTEOPENIA
        assert severity == ([expected] if f.bone_loss else [])
        assert group.finding_type == (severity[0] if severity else codes.NORMAL)
        (site,) = group.finding_sites
        assert site.value == codes.KNEE
        assert site.laterality == codes.LATERALITY[src.ImageLaterality]
    # the study: Qualitative Evaluations with the result, the worst severity and the impression
    [summary] = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    by_name = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in summary.ContentSequence}
    assert by_name["Bone loss screening result"].ConceptCodeSequence[0].CodeValue == codes.BONE_LOSS_SUSPECTED.value
    # the worst severity of the positive knees: the left knee's films say osteoporosis (0.71) and
    # osteopenia (0.22); the knee's mean severity logit says osteopenia (0.45)
    assert by_name["Severity"].ConceptCodeSequence[0].CodeValue == codes.OSTEOPENIA.value
    assert by_name["Impression"].TextValue.startswith("Bone loss suspected in 2 of 4 screened images")


def test_sr_parsed_in_place_is_the_same_to_the_byte(study: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """build_sr lets highdicom parse the content tree in place instead of a deep copy of it (a
    third of the build): the SR must not change. Only the clock's stamps may differ."""
    from io import BytesIO

    from agent.reporting import sr as sr_module

    def encoded() -> bytes:
        ds = build_sr(study["sources"], study["findings"], now=datetime(2026, 1, 1))
        ds.ContentDate, ds.ContentTime = "20260101", "000000"
        ds.InstanceCreationDate, ds.InstanceCreationTime = "20260101", "000000"
        for item in ds.get("ContributingEquipmentSequence", []):
            item.ContributionDateTime = "20260101000000"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    in_place = encoded()
    monkeypatch.setattr(sr_module, "PARSE_IN_PLACE", False)
    assert encoded() == in_place
    assert b"Osteoporosis" in in_place  # a real SR with its findings, not an empty one


def test_overlay_round_trips(study: dict[str, Any]) -> None:
    for src, path in zip(study["sources"], study["overlay_paths"], strict=True):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.BurnedInAnnotation == "YES"
        assert ds.Laterality == src.ImageLaterality
        assert ds.PhotometricInterpretation == "RGB"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        pixels = ds.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        assert pixels.shape[0] > src.Rows  # the banner sits above the radiograph


def test_overlay_heat_map_only_where_salient(study: dict[str, Any]) -> None:
    overlays = study["overlays"]
    banner_rows = overlays[0].Rows - study["sources"][0].Rows
    tinted = overlays[0].pixel_array[banner_rows:].astype(int)
    plain = overlays[3].pixel_array[banner_rows:].astype(int)  # saliency None
    assert np.abs(plain[..., 0] - plain[..., 2]).max() == 0  # pure grey
    assert np.abs(tinted[..., 0] - tinted[..., 2]).max() > 30  # warm where salient
    assert (tinted[..., 0] == tinted[..., 2]).mean() > 0.05  # ...and grey where it is not


def test_overlay_is_downscaled(study: dict[str, Any]) -> None:
    src = study["sources"][0]
    big = np.random.default_rng(3).random((2600, 2100)).astype(np.float32)
    sc = build_overlay(src, big, study["findings"][0])
    assert max(sc.Rows, sc.Columns) <= MAX_SIDE_PX
    assert min(sc.Rows, sc.Columns) > 500
    path = study["dir"] / "big.dcm"
    write(sc, path)
    errors, text = _dciodvfy(path)
    assert errors == 0, text


@pytest.mark.parametrize(
    ("probability", "threshold", "t_score", "expected"),
    [
        # two decimals would print both alike: more, until they differ
        (0.4195, 0.4217, -1.0, ("P(bone loss) 0.419 (threshold 0.422)", "Est. T-score -1.0")),
        (0.8731, 0.3778, -2.73, ("P(bone loss) 0.87 (threshold 0.38)", "Est. T-score -2.7")),
        # no certainty the model does not claim, and no negative zero
        (0.9962, 0.3778, -0.04, ("P(bone loss) > 0.99 (threshold 0.38)", "Est. T-score +0.0")),
        (0.0031, 0.3778, 1.2, ("P(bone loss) < 0.01 (threshold 0.38)", "Est. T-score +1.2")),
        # alike even at four decimals (the shipped conservative point): the side of the threshold
        (0.37781, 0.3778246, -1.0, ("P(bone loss) < 0.3778 (threshold 0.3778)", "Est. T-score -1.0")),
        (0.37785, 0.3778246, -1.0, ("P(bone loss) 0.3779 (threshold 0.3778)", "Est. T-score -1.0")),
    ],
)
def test_banner_says_what_the_numbers_are(probability: float, threshold: float, t_score: float, expected: Any) -> None:
    from dataclasses import replace

    from agent.reporting.overlay import banner_lines

    base = _findings(np.random.default_rng(0))[0]
    f = replace(base, probability=probability, threshold=threshold, bone_loss=probability >= threshold,
                t_score=t_score, t_score_low=t_score - 0.04, t_score_high=t_score + 1.0)
    lines = banner_lines(f)
    assert lines[1] == expected[0]
    assert lines[2].startswith(expected[1])
    assert "-0.0" not in lines[2]


# ---- what hospitals send: bad and missing values never make a result invalid -----------------------------

# what each bad value becomes in the results ("" where it cannot be read: Type 2, present and empty)
_READ_AS = {("PatientBirthDate", "1945-03-25"): "19450325", ("PatientSex", "male"): "M", ("PatientSex", "f"): "F"}
#: the Type 2 attributes docs/dicom-values.md promises present (empty) in the results when the source lacks them
_TYPE2 = (*RESULT_TYPE2, "ReferringPhysicianName")
_CASES = [pytest.param({k: v}, id=f"{k}={v}") for k, v in BAD_VALUES] + [
    pytest.param({k: None}, id=f"no-{k}") for k in _TYPE2
]


def _built(source: pydicom.Dataset, out: Path) -> tuple[Path, Path]:
    """The SR and overlay of ``source``, written; each checked by dciodvfy (0 errors) and re-read
    by highdicom."""
    finding = _findings(np.random.default_rng(5))[0]
    image = np.random.default_rng(2).random((int(source.Rows), int(source.Columns))).astype(np.float32)
    sr_path, sc_path = out / "sr.dcm", out / "sc.dcm"
    build_sr([source], [finding]).save_as(sr_path, enforce_file_format=True)
    build_overlay(source, image, finding).save_as(sc_path, enforce_file_format=True)
    for path in (sr_path, sc_path):
        errors, text = _dciodvfy(path)
        assert errors == 0, f"{path.name}:\n{text}"
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_path))
    [group] = sr.content.get_planar_roi_measurement_groups()
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    hd.Image.from_dataset(pydicom.dcmread(sc_path))
    return sr_path, sc_path


@pytest.mark.parametrize("raw", _CASES)
def test_results_of_a_source_with_a_bad_or_missing_value_are_valid(raw: dict[str, Any], tmp_path: Path) -> None:
    source = as_received(knee_dx(rows=64, cols=64), **raw)
    [(keyword, value)] = raw.items()
    for path in _built(source, tmp_path):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"  # the decoded text, always UTF-8
        for type2 in _TYPE2:
            assert type2 in ds, type2  # present, empty where the source has no valid value
        if keyword != "SpecificCharacterSet":
            assert str(ds[keyword].value or "") == _READ_AS.get((keyword, value), ""), keyword
        # the values the source had right are still there
        assert str(ds.PatientName) == (PHI_NAME if keyword != "PatientName" else "")
        assert ds.PatientID == (PHI_ID if keyword != "PatientID" else "")
        assert ds.StudyInstanceUID == source.StudyInstanceUID


@pytest.mark.parametrize(
    ("charset", "name"),
    [(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"), ("ISO-8859-1", "Müller^Jürgen"),
     ("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 6", "Doe^Jane")],
)  # fmt: skip
def test_names_are_decoded_from_the_source_character_set_and_written_as_utf8(
    charset: Any, name: str, tmp_path: Path
) -> None:
    source = knee_dx(rows=64, cols=64)
    set_raw(source, "SpecificCharacterSet", charset)
    source.PatientName = name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's word on a misspelt character set
        received = as_received(source)
        paths = _built(received, tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert (ds.SpecificCharacterSet, str(ds.PatientName)) == ("ISO_IR 192", name)


def test_values_that_cannot_be_read_are_left_empty_or_out_never_cut(tmp_path: Path) -> None:
    source = as_received(
        knee_dx(rows=64, cols=64),
        PatientID="P" * 65,  # LO holds 64: a cut ID could name another patient
        AccessionNumber="A" * 17,
        PatientName="A^B^C^D^E^F",
        ReferringPhysicianName="Dr\tWho",
        StudyDescription="x" * 70,
        InstitutionName="Hospital\\Annex",
        Manufacturer="M" * 80,
        PatientAge="8",
        PatientOrientation=["L", "Feet"],
        BodyPartExamined="knee ",
        ViewPosition="ap",
        ImageLaterality="l",
        Laterality="l",
        AcquisitionDateTime="2023-02-11 10:15",
    )
    sr_path, sc_path = _built(source, tmp_path)
    for path in (sr_path, sc_path):
        ds = pydicom.dcmread(path)
        names = str(ds.PatientName), str(ds.ReferringPhysicianName)
        assert (ds.PatientID, ds.AccessionNumber, *names) == ("", "", "", "")
        for keyword in ("StudyDescription", "InstitutionName", "PatientAge"):
            assert keyword not in ds, keyword
    sc = pydicom.dcmread(sc_path)
    assert (sc.BodyPartExamined, sc.Laterality, sc.PatientOrientation) == ("KNEE", "L", "")
    text = _dsrdump(sr_path)
    assert '(7771000,SCT,"Left")' in text and '"Tracking Identifier")="Left knee AP"' in text


def test_other_patient_attributes_of_the_source_are_not_copied(tmp_path: Path) -> None:
    """docs/dicom-values.md: only the attributes of its table reach the results."""
    source = knee_dx(rows=64, cols=64)
    source.OtherPatientIDs = "OTHER-PID-7"
    source.PatientComments = "ZZCOMMENT"
    source.PatientWeight, source.PatientSize = "81.5", "1.82"
    source.EthnicGroup = "ZZGROUP"
    for path in _built(as_received(source), tmp_path):
        ds = pydicom.dcmread(path)
        for keyword in ("OtherPatientIDs", "PatientComments", "PatientWeight", "PatientSize", "EthnicGroup"):
            assert keyword not in ds, keyword
        assert ds.PatientID == PHI_ID  # what the table copies still is


def test_contradicting_lateralities_are_left_out_and_logged_without_values(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    source = as_received(knee_dx(rows=64, cols=64), ImageLaterality="R", Laterality="L")
    with capture_logs() as logs:
        sr_path, sc_path = _built(source, tmp_path)
    conflicts = [e for e in logs if e["event"] == "laterality_conflict"]
    assert conflicts and all(e["log_level"] == "warning" for e in conflicts)
    assert all(set(e) <= {"event", "log_level", "sop_instance_uid"} for e in conflicts), conflicts
    text = _dsrdump(sr_path)
    assert '"Left")' not in text and '"Right")' not in text and "Laterality" not in text
    assert pydicom.dcmread(sc_path).Laterality == ""  # Type 2C for a knee: present, empty


def test_a_build_error_names_no_value() -> None:
    from agent.errors import BuildError
    from agent.reporting.builder import build_overlay_bytes

    finding = _findings(np.random.default_rng(3))[0]
    with pytest.raises(BuildError) as err:
        build_overlay_bytes(knee_dx(patient_name="Doe^Jane"), np.zeros((2, 2, 2), np.float32), finding, 1)
    assert str(err.value).startswith("overlay could not be built: ValueError") and "Doe" not in str(err.value)


# ---- the Impression and edge cases (review of issue 20) ------------------------------------------


def test_impression_reads_like_the_banner_and_never_rounds_a_probability_onto_the_threshold() -> None:
    from agent.reporting.sr import impression

    source = knee_dx(laterality="R")
    source.ViewPosition = "AP"
    base = _findings(np.random.default_rng(3))[2]
    just_below = dataclasses.replace(base, probability=0.37781, threshold=0.3778246, bone_loss=False)
    text = impression([source], [just_below])
    assert text.startswith("No bone loss detected in 1 screened image. Highest probability of bone loss < 0.3778")
    assert "(Right knee AP), threshold 0.3778;" in text
    certain = dataclasses.replace(base, probability=0.9999991, threshold=0.42, bone_loss=True, severity="osteoporosis")
    assert "probability of bone loss > 0.99 " in impression([source], [certain])
    # the NUMs keep 4 decimals of a percentage: 37.781 % and 37.7825 % are not the same number
    sr = build_sr([source], [just_below])
    text = _dsrdump_ds(sr)
    assert '"Probability")="37.781"' in text and '"Threshold Value")="37.7825"' in text


def _dsrdump_ds(ds: pydicom.Dataset) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sr.dcm"
        ds.save_as(path, enforce_file_format=True)
        return _dsrdump(path)


def test_a_long_study_lists_every_positive_image_and_counts_the_normal_ones_left_out() -> None:
    from agent.reporting.sr import IMPRESSION_IMAGES, impression

    n = IMPRESSION_IMAGES + 3
    study_uid = generate_uid()
    sources = [knee_dx(study_uid=study_uid, laterality="LR"[i % 2], seed=i, rows=32, cols=32) for i in range(n)]
    negative = _findings(np.random.default_rng(4))[2]
    positive = _findings(np.random.default_rng(4))[0]
    findings = [negative] * n
    findings[n - 1] = positive  # the positive is the last film: it must still be listed
    text = impression(sources, findings)
    assert text.count("bone loss suspected (osteoporosis)") == 1
    assert text.splitlines()[1].endswith("[-3.4, -2.0].") and "bone loss suspected" in text.splitlines()[1]
    assert f"{n - IMPRESSION_IMAGES} more normal images not listed." in text
    assert text.endswith("NOT FOR DIAGNOSTIC USE.")


def test_new_weights_under_the_same_version_make_new_objects() -> None:
    """PACS deduplicates by SOP Instance UID: a new checkpoint must not reuse the old UIDs."""
    source = knee_dx(laterality="L")
    f = _findings(np.random.default_rng(6))[0]
    other = dataclasses.replace(f, algorithm=dataclasses.replace(ALGO, checkpoint_sha256="ab" * 32))
    a, b = build_sr([source], [f]), build_sr([source], [other])
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    image = np.zeros((int(source.Rows), int(source.Columns)), np.float32)
    assert build_overlay(source, image, f).SOPInstanceUID != build_overlay(source, image, other).SOPInstanceUID
    assert build_sr([source], [f]).SOPInstanceUID == a.SOPInstanceUID  # and the same weights, the same UID


def test_a_multiframe_source_gets_its_region_without_a_frame_number() -> None:
    """DX and CR are single-frame SOP classes: dciodvfy refuses a Referenced Frame Number for them,
    so a source with several frames (screened on its first) gets none (docs/sr-content.md)."""
    source = knee_dx(laterality="L")
    source.NumberOfFrames = 2
    sr = build_sr([source], _findings(np.random.default_rng(1))[:1])

    def references(items: Any) -> list[Any]:
        found = []
        for item in items:
            found += list(item.get("ReferencedSOPSequence", []))
            found += references(item.get("ContentSequence", []))
        return found

    refs = references(sr.ContentSequence)
    assert refs and all(r.ReferencedSOPInstanceUID == source.SOPInstanceUID for r in refs)
    assert not any("ReferencedFrameNumber" in r for r in refs)


def test_a_source_without_a_size_gets_no_square() -> None:
    source = knee_dx(laterality="L")
    f = _findings(np.random.default_rng(6))[0]
    del source.Rows
    with pytest.raises(ValueError, match="Rows and Columns"):
        build_sr([source], [f])


def test_the_study_summary_states_each_knee_and_follows_the_knee_rule(study: dict[str, Any]) -> None:
    """Two films of each knee: the left knee's P is the sigmoid of the mean of its films' logits,
    and its items (site and side, films, result, severity, P, P(osteoporosis | bone loss),
    T-score and interval, in words) sit in a Knee result container of the study summary."""
    left, right = study["knees"]
    assert (left.laterality, left.images, right.laterality, right.images) == ("L", (0, 1), "R", (2, 3))
    z = (np.log(0.8731 / 0.1269) + np.log(0.6402 / 0.3598)) / 2
    assert left.probability == pytest.approx(1 / (1 + np.exp(-z)))  # 0.7818
    assert left.t_score == pytest.approx((-2.73 - 1.62) / 2)
    ds = pydicom.dcmread(study["sr_path"])
    [summary] = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    knees = [i for i in summary.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == codes.KNEE_RESULT.value]
    assert len(knees) == 2
    for item, knee in zip(knees, study["knees"], strict=True):
        assert item.ValueType == "CONTAINER" and item.ContinuityOfContent == "SEPARATE"
        by_value = {i.ConceptNameCodeSequence[0].CodeValue: i for i in item.ContentSequence}
        site = by_value["363698007"]
        assert site.ConceptCodeSequence[0].CodeValue == codes.KNEE.value
        assert site.ContentSequence[0].ConceptCodeSequence[0].CodeValue == codes.LATERALITY[knee.laterality].value

        def num(code: Any, by_value: dict[str, Any] = by_value) -> float:
            return float(by_value[code.value].MeasuredValueSequence[0].NumericValue)

        assert num(codes.KNEE_IMAGES) == 2
        assert num(codes.PROBABILITY) == pytest.approx(knee.probability * 100, abs=1e-3)
        method = by_value[codes.PROBABILITY.value].ContentSequence[0]
        assert method.ConceptCodeSequence[0].CodeValue == codes.P_BONE_LOSS_METHOD.value
        assert num(codes.P_OSTEOPOROSIS) == pytest.approx(knee.p_osteoporosis_given_bone_loss * 100, abs=1e-3)
        assert num(codes.ESTIMATED_T_SCORE) == pytest.approx(knee.t_score, abs=0.01)
        assert (num(codes.T_SCORE_LOWER), num(codes.T_SCORE_UPPER)) == pytest.approx(
            (knee.t_score_low, knee.t_score_high), abs=0.01
        )
        result = by_value[codes.SCREENING_RESULT.value].ConceptCodeSequence[0].CodeValue
        assert result == (codes.BONE_LOSS_SUSPECTED if knee.bone_loss else codes.NORMAL).value
    assert left.bone_loss and left.severity == "osteopenia"  # mean severity logit of 0.71 and 0.22: q 0.45
    assert not right.bone_loss
    words = {i.ConceptNameCodeSequence[0].CodeValue: i for i in knees[0].ContentSequence}[codes.IMPRESSION.value]
    assert words.TextValue == (
        "Left knee, 2 images: bone loss suspected (osteopenia), probability of bone loss 78 %, osteoporosis "
        "given bone loss 45 %, estimated T-score -2.2 (90% interval -2.9 to -1.4)."
    )
    impression = next(i for i in summary.ContentSequence if i.ValueType == "TEXT").TextValue
    assert "\nPer knee: bone loss suspected in 1 of 2 knees.\nLeft knee, 2 images: bone loss suspected" in impression
    assert "\nRight knee, 2 images: normal, probability of bone loss 18 %" in impression
    text = _dsrdump(study["sr_path"])
    assert text.count('<contains CONTAINER:(,,"Knee result")=SEPARATE>') == 2
    assert '"Number of screened images of the knee")="2.0" ({images},UCUM,"images")' in text


def test_the_study_result_is_the_knees_not_the_images(tmp_path: Path) -> None:
    """One positive film (0.64) and a negative repeat (0.30) of the left knee: the knee's P, from
    the mean logit, is below the threshold, so the study is normal though an image is positive;
    image-level items stay as they were."""
    uid = generate_uid()
    sources = [knee_dx(study_uid=uid, laterality="L", seed=i, rows=300, cols=240) for i in range(2)]
    common: dict[str, Any] = {"threshold": 0.5, "interval_coverage": 0.9, "algorithm": ALGO}
    findings = [
        Findings(0.64, bone_loss=True, p_osteoporosis_given_bone_loss=0.3, severity="osteopenia",
                 t_score=-1.8, t_score_low=-2.6, t_score_high=-1.0, **common),
        Findings(0.30, bone_loss=False, p_osteoporosis_given_bone_loss=0.2, severity=None,
                 t_score=-1.0, t_score_low=-1.8, t_score_high=-0.2, **common),
    ]  # fmt: skip
    knees = study_knees(["L", "L"], findings)
    assert len(knees) == 1 and not knees[0].bone_loss and knees[0].probability < 0.5
    sr = build_sr(sources, findings, knees=knees)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, text = _dciodvfy(path)
    assert errors == 0, text
    [summary] = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
    ]
    assert summary.ContentSequence[0].ConceptCodeSequence[0].CodeValue == codes.NORMAL.value
    assert not any(i.ConceptNameCodeSequence[0].CodeValue == codes.SEVERITY.value for i in summary.ContentSequence)
    groups = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content.get_planar_roi_measurement_groups()
    results = sorted(g.get_qualitative_evaluations(name=codes.SCREENING_RESULT)[0].value.value for g in groups)
    assert results == sorted([codes.BONE_LOSS_SUSPECTED.value, codes.NORMAL.value])  # the images keep theirs
    # without knees (a caller of before) the study is the images': positive
    plain = build_sr(sources, findings)
    qualitative = codes.QUALITATIVE_EVALUATIONS.value
    [summary] = [i for i in plain.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == qualitative]
    assert summary.ContentSequence[0].ConceptCodeSequence[0].CodeValue == codes.BONE_LOSS_SUSPECTED.value
    with pytest.raises(ValueError, match="every image once"):
        build_sr(sources, findings, knees=knees[:0] + [dataclasses.replace(knees[0], images=(0,))])
