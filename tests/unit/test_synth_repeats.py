"""Retakes in the synthetic generator (issue 24): a share of the single-knee films retaken in the
same study, drawn from generators of their own, so that with retakes off every seed gives the
files it gave before retakes existed; and the knee grouping of the evaluation puts a retake with
its film."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from model.cli import app
from model.data import read_manifest, targets
from model.evaluate import knee_metrics
from model.io import read_pixels
from model.knee import knee_groups
from model.synth.generate import PRESETS, generate, patient_images, retake_plan
from model.synth.presets import Preset

# Computed at b47588f (before retakes existed) by the same code as below: the pixels and headers
# of patient_images for three patients, and every file generate() wrote for 6 images of seed 9.
HEAD_RECORDS_SHA256 = "fa9f28b7a2810e52d18342cc180b2c4d8391cd3f9e5ae3f016504a85466d3d4a"
HEAD_FILES_SHA256 = "f755b56f1ecc287bc7e9e6f6601a2d751c1d45a085c5e78633057fdfc468aa33"
RetakeSet = tuple[Path, list[dict[str, str]]]
PATIENTS = [(771001, 0), (771001, 1), (5, 3)]  # the last has two studies of two films


def _records_digest(preset: Preset) -> str:
    h = hashlib.sha256()
    for seed, index in PATIENTS:
        for rec in patient_images(seed, index, preset)[1]:
            if rec.retake_of is None:
                h.update(rec.image.stored.tobytes())
                h.update(repr(rec.header).encode())
    return h.hexdigest()


def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "dataset.json":  # the card is new; every other file as before
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_with_retakes_off_every_file_is_the_one_written_before_retakes_existed(tmp_path: Path) -> None:
    assert _records_digest(PRESETS["default"]) == HEAD_RECORDS_SHA256
    out = generate(tmp_path / "off", 6, seed=9, compressed_fraction=0.5, repeat_fraction=0.0).parent
    assert _files_digest(out) == HEAD_FILES_SHA256
    assert json.loads((out / "dataset.json").read_text())["n_retakes"] == 0
    # with retakes on, the films that are not retakes are still those of before
    on = Preset(repeat_fraction=1.0)
    assert _records_digest(on) == HEAD_RECORDS_SHA256
    assert sum(r.retake_of is not None for s, i in PATIENTS for r in patient_images(s, i, on)[1]) == 8


def test_retakes_come_at_the_requested_share_and_only_for_single_knee_films() -> None:
    for fraction in (0.2, 0.5):
        p = Preset(repeat_fraction=fraction)
        plans = [retake_plan(771001, i, s, k, "LR"[k], "AP", p) for i in range(2000) for s in (0, 1) for k in (0, 1)]
        taken = [plan for plan in plans if plan is not None]
        assert len(taken) / len(plans) == pytest.approx(fraction, abs=0.02)  # 8000 films: SD 0.006 or less
        other = sum(view == "PA" for _, view in taken) / len(taken)
        assert other == pytest.approx(p.repeat_other_view, abs=0.04)
    p = Preset(repeat_fraction=1.0)
    assert retake_plan(1, 0, 0, 0, "B", "AP", p) is None  # a film of both knees is never retaken
    assert retake_plan(1, 0, 0, 0, "L", "AP", Preset()) is None  # the presets: off
    # one film's own draw: a film retaken at 0.2 is retaken at 0.5, in the same view, the same render
    low, high = Preset(repeat_fraction=0.2), Preset(repeat_fraction=0.5)
    at_low = {i: retake_plan(3, i, 0, 1, "R", "PA", low) for i in range(400)}
    at_high = {i: retake_plan(3, i, 0, 1, "R", "PA", high) for i in range(400)}
    kept = [i for i, plan in at_low.items() if plan is not None]
    assert 40 < len(kept) < sum(plan is not None for plan in at_high.values())
    for i in kept:
        a, b = at_low[i], at_high[i]
        assert b is not None and a is not None and a[1] == b[1] and a[0].random() == b[0].random()


def test_patient_images_retakes_exactly_the_films_the_plan_names() -> None:
    p = Preset(repeat_fraction=0.5)
    seen = 0
    for index in range(6):
        _, recs = patient_images(771004, index, p)
        for j, rec in enumerate(recs):
            if rec.retake_of is not None:
                continue
            h = rec.header
            plan = retake_plan(771004, index, rec.study_index, h.instance_number - 1, h.laterality, h.view, p)
            nxt = recs[j + 1] if j + 1 < len(recs) else None
            assert (plan is not None) == (nxt is not None and nxt.retake_of == h.sop_uid)
            if plan is not None and nxt is not None:
                seen += 1
                assert nxt.header.view == plan[1] and nxt.header.laterality == h.laterality
    assert seen > 0


@pytest.fixture(scope="module")
def retake_set(tmp_path_factory: pytest.TempPathFactory) -> RetakeSet:
    out = tmp_path_factory.mktemp("retakes")
    manifest = generate(out, 24, seed=771002, compressed_fraction=0.5, repeat_fraction=0.5)
    with manifest.open(newline="") as fh:
        return out, list(csv.DictReader(fh))


def test_a_retake_is_the_same_knee_in_the_same_study_a_fresh_film(retake_set: RetakeSet) -> None:
    out, rows = retake_set
    by_path = {r["path"]: r for r in rows}
    retakes = [r for r in rows if r["path"].endswith("_retake.dcm")]
    assert len(retakes) == json.loads((out / "dataset.json").read_text())["n_retakes"] == 5
    assert len({r["sop_instance_uid"] for r in rows}) == len(rows)
    views = set()
    for r in retakes:
        first = by_path[r["path"].replace("_retake.dcm", ".dcm")]
        same = ("patient_id", "study_instance_uid", "laterality", "label", "severity", "t_score", "profile")
        assert {k: r[k] for k in same} == {k: first[k] for k in same}
        assert r["laterality"] in {"L", "R"}
        a, b = read_pixels(out / first["path"]), read_pixels(out / r["path"])
        assert a.shape == b.shape and np.abs(a - b).mean() > 0.01  # another acquisition, not a copy
        ds_a, ds_b = pydicom.dcmread(out / first["path"]), pydicom.dcmread(out / r["path"])
        assert ds_b.StudyInstanceUID == ds_a.StudyInstanceUID
        side = "ImageLaterality" if ds_a.Modality == "DX" else "Laterality"  # CR: the series' laterality
        assert ds_b.Modality == ds_a.Modality and ds_b.get(side) == ds_a.get(side) == r["laterality"]
        assert ds_b.SeriesInstanceUID != ds_a.SeriesInstanceUID and ds_b.SeriesNumber >= 2
        study = [by for by in rows if by["study_instance_uid"] == r["study_instance_uid"] and by is not r]
        numbers = [int(pydicom.dcmread(out / x["path"], stop_before_pixels=True).InstanceNumber) for x in study]
        assert int(ds_b.InstanceNumber) > int(ds_a.InstanceNumber) and int(ds_b.InstanceNumber) not in numbers
        assert ds_b.SOPInstanceUID == r["sop_instance_uid"] != first["sop_instance_uid"]
        views.add((ds_a.ViewPosition, ds_b.ViewPosition))
    assert any(a != b for a, b in views)  # some retakes change the view (AP and PA in one study)


def test_the_evaluation_groups_a_retake_with_its_film(retake_set: RetakeSet) -> None:
    out, rows = retake_set
    n_retakes = sum(r["path"].endswith("_retake.dcm") for r in rows)
    mrows = read_manifest(out / "manifest.csv")  # as `strnet model evaluate` reads it
    studies, sides = [r.study_instance_uid for r in mrows], [r.laterality for r in mrows]
    groups = knee_groups(studies, sides)
    assert len(groups) == len(mrows) - n_retakes
    for g in groups:
        if len(g) > 1:
            assert len(g) == 2 and not mrows[g[0]].path.name.endswith("_retake.dcm")
            assert mrows[g[1]].path.name == mrows[g[0]].path.name.replace(".dcm", "_retake.dcm")
    n = len(mrows)
    raw = {"screen_logit": np.linspace(-2, 2, n), "severity_logit": np.zeros(n), "tscore": np.linspace(-3, 1, n)}
    meta = SimpleNamespace(temperature=1.0, served_threshold="conservative", thresholds={"conservative": 0.5})
    m = knee_metrics(raw, targets(mrows), meta, studies, sides)  # type: ignore[arg-type]
    assert m["n_knees"] == n - n_retakes and m["n_knees_several_images"] == n_retakes


def test_the_synth_command_takes_the_share_and_records_it(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--n", "3", "--seed", "771005",
                              "--compressed-fraction", "0", "--repeat-fraction", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert card["repeat_fraction"] == 1.0 and card["n"] == 3 and card["seed"] == 771005
    assert card["preset"] == "default" and card["compressed_fraction"] == 0.0 and card["n_patients"] >= 1
    assert card["preset_parameters"]["repeat_fraction"] == 1.0
    assert f"images, {card['n_retakes']} retakes," in res.output and card["n_retakes"] >= 1
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "t"), "--n", "3", "--seed", "1",
                              "--repeat-fraction", "1.5"])  # fmt: skip
    assert res.exit_code != 0 and "repeat_fraction must lie in [0, 1]" in res.output
    assert not (tmp_path / "t").exists()
