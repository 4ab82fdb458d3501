"""The overlay's heat map: on the assessed square, on bone, only on positive results; its banner
and its DICOM identity.

Synthetic films come from model.synth (seeded) with the generator's bone mask; the findings come
from the shipped checkpoint through the served path (agent.pipeline), so what is checked is what
a radiologist would see. Pixel tests read the overlay below its banner: grey is R == G == B.
"""

from __future__ import annotations

import io
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import require_tool
from dicom_factory import knee_dx
from PIL import Image

from agent.domain import AlgorithmInfo, Findings, InstanceRef, LeasedJob
from agent.reporting.overlay import (
    LEGEND_HEAT,
    LEGEND_NEGATIVE,
    LEGEND_NO_BONE,
    LEGEND_NO_MAP,
    LEGEND_NO_REGION,
    LEGEND_OFF_BONE,
    MIN_FONT_PX,
    MIN_WIDTH_PX,
    TEXT_SHARE,
    _fit_font,
    banner_lines,
    build_overlay,
    knee_and_view,
)
from agent.reporting.source import reference_dataset
from model.saliency import bone_estimate, bone_share, film_on_grid, on_bone, restrict_to_bone

ALGO = AlgorithmInfo(name="STR-Net", version="0.3.1-test", checkpoint_sha256="c0ffee" * 10 + "abcd")
HOT = 30  # a channel this far from blue is heat colour, not grey


def _finding(bone_loss: bool, saliency: Any, region: tuple[int, int, int, int] | None) -> Findings:
    return Findings(
        0.8731 if bone_loss else 0.1523, threshold=0.4217, bone_loss=bone_loss,
        p_osteoporosis_given_bone_loss=0.71 if bone_loss else 0.05,
        severity="osteoporosis" if bone_loss else None, t_score=-2.73 if bone_loss else -0.41,
        t_score_low=-3.41, t_score_high=-1.96, interval_coverage=0.9, algorithm=ALGO,
        saliency=saliency, region=region,
    )  # fmt: skip


def _picture(sc: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    """The overlay's radiograph (the banner cut off) as int RGB, in the picture's own pixels."""
    px = sc.pixel_array.astype(int)
    width = sc.Columns if sc.Columns > MIN_WIDTH_PX else None
    scale = (width / cols) if width else 1.0
    h, w = round(rows * scale), round(cols * scale)
    left = (sc.Columns - w) // 2
    return px[sc.Rows - h :, left : left + w]


def _hot(picture: np.ndarray) -> np.ndarray:
    """Where the picture is heat-coloured: red or green far from blue."""
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    return (np.abs(r - b) > HOT) | (np.abs(g - b) > HOT)


@pytest.fixture(scope="module")
def screener() -> Any:
    from agent.pipeline.infer import Screener

    return Screener(device="cpu", threads=1)


def _synthetic(seed: int, index: int = 0) -> tuple[pydicom.Dataset, np.ndarray, np.ndarray]:
    """A synthetic knee film as the agent decodes it, its source header and the generator's
    label mask (0 background, 1 cortex, 2 trabecular)."""
    from model.io import read_pixels
    from model.synth.acquisition import VENDOR_PROFILES
    from model.synth.dicom_writer import build_dataset
    from model.synth.generate import patient_images

    _, records = patient_images(seed, index)
    rec = records[0]
    ds = build_dataset(rec.image.stored, rec.header, VENDOR_PROFILES[rec.image.profile])
    return ds, read_pixels(ds), rec.image.mask


def _scored(screener: Any, film: np.ndarray) -> Findings:
    """The finding of one film as scored, its map the raw Grad-CAM over the square."""
    x = screener.preprocess(film)
    texture = screener.texture(film)
    features = None if texture is None else texture[None]
    [f], _ = screener.score(x[None], [{"age": None, "sex": None, "bmi": None}], features)
    return f


def _served(screener: Any, film: np.ndarray) -> Findings:
    """The served finding of one film: scored, its square set and its map kept on bone (what
    agent.pipeline.run.screen_batch does)."""
    f = _scored(screener, film)
    region = screener.region(film.shape)
    return replace(f, region=region, saliency=screener.bone_saliency(film, region, f.saliency))


# ---- the map on the film ------------------------------------------------------------------------


def test_the_map_is_placed_on_the_region_not_stretched_over_the_film() -> None:
    """A hot corner of the map lands on that corner of the assessed square (the bug stretched the
    map over the whole film, which put it elsewhere)."""
    source = knee_dx(rows=300, cols=240)
    film = np.full((300, 240), 0.5, np.float32)
    heat = np.zeros((24, 24), np.float32)
    heat[:6, 18:] = 1.0  # the square's top-right quarter-corner
    region = (48, 18, 252, 222)  # side 204: cells of 8.5 px
    sc = build_overlay(source, film, _finding(True, heat, region))
    rows, cols = np.nonzero(_hot(_picture(sc, 300, 240)))
    assert rows.size
    # cells 0-5 and 18-23 of the square: rows 48 to 99, columns 171 to 222 (bilinear: +- 1 cell)
    assert 48 - 9 <= rows.min() and rows.max() <= 99 + 9, (rows.min(), rows.max())
    assert 171 - 9 <= cols.min() and cols.max() <= 222 + 9, (cols.min(), cols.max())


def test_a_square_past_the_film_is_clipped_and_places_the_map_on_its_part_of_the_film() -> None:
    """crop "full": the square reaches past the short side; the map's cells beyond the film are
    not drawn and the rest stays in place."""
    source = knee_dx(rows=300, cols=240)
    film = np.full((300, 240), 0.5, np.float32)
    heat = np.zeros((30, 30), np.float32)
    heat[:, 14:16] = 1.0  # a vertical bar through the square's middle column
    heat[:, :2] = 1.0  # and one over the padding left of the film (cells 0-1: columns -30 to -21)
    sc = build_overlay(source, film, _finding(True, heat, (0, -30, 300, 270)))
    _, cols = np.nonzero(_hot(_picture(sc, 300, 240)))
    # the middle bar: columns 110 to 129 of the film (the padding bar is off the film)
    assert 100 <= cols.min() and cols.max() <= 140, (cols.min(), cols.max())


def _draws(finding: Findings) -> bool:
    return banner_lines(finding)[-2] == LEGEND_HEAT


def test_served_heat_lands_inside_the_region_and_on_bone(screener: Any) -> None:
    """Through the served path, on synthetic films with their masks: where the map is drawn,
    every heat pixel lies in the assessed square and nearly all on the generator's bone; where
    it is not (the attention not on bone more than chance), the film stays grey and the legend
    says why. Films 1 of seed 20260427 and 2 and 4 of seed 990001 are drawn, the rest not."""
    drawn = 0
    for seed, index in ((20260427, 0), (20260427, 1), (990001, 2), (990001, 4)):
        source, film, mask = _synthetic(seed, index)
        f = _served(screener, film)
        f = replace(f, bone_loss=True, severity=f.severity or "osteopenia")  # draw it whatever the score
        sc = build_overlay(source, film, f)
        rows, cols = film.shape
        picture = _picture(sc, rows, cols)
        hot = _hot(picture)
        if not _draws(f):
            assert banner_lines(f)[-2] == LEGEND_OFF_BONE and not f.saliency.any()
            assert not hot.any(), f"film {seed}/{index}: heat colour without a drawn map"
            continue
        drawn += 1
        assert hot.sum() > 100, "a drawn map shows"
        scale = picture.shape[0] / rows
        r0, c0, r1, c1 = (v * scale for v in f.region)
        hr, hc = np.nonzero(hot)
        assert hr.min() >= r0 - 1 and hr.max() < r1 + 1 and hc.min() >= c0 - 1 and hc.max() < c1 + 1
        bone = np.asarray(
            Image.fromarray((mask > 0).astype(np.float32), mode="F").resize(
                (picture.shape[1], picture.shape[0]), Image.Resampling.BOX
            )
        )
        on_bone_px = float((bone[hot] > 0.5).mean())
        assert on_bone_px >= 0.9, f"film {seed}/{index}: {on_bone_px:.2f} of the heat pixels on bone"
    assert drawn == 3


def test_the_network_decides_whether_heat_is_drawn(screener: Any) -> None:
    """Null-map twins through the served restriction, on real films and their real Grad-CAM maps:
    a flat map (an overlay that ignored the network) is never drawn, and of a map and its inverse
    (max - map) at most one is: the kept share of the one exceeds chance exactly when the
    other's falls below it. The real maps are drawn on some films and not on others."""
    real = []
    for seed, index in ((20260427, 0), (20260427, 1), (990001, 2), (990001, 4), (990001, 0)):
        _, film, _ = _synthetic(seed, index)
        region = screener.region(film.shape)
        cam = np.asarray(_scored(screener, film).saliency, np.float32)
        served, inverse = on_bone(film, region, cam), on_bone(film, region, cam.max() - cam)
        flat = on_bone(film, region, np.ones_like(cam))
        assert served.bone_found and flat.kept_share == pytest.approx(flat.chance_share)
        assert not flat.drawn and not flat.heat.any(), "a flat map is drawn: the overlay ignores the network"
        assert not (served.drawn and inverse.drawn)
        assert served.drawn == (served.kept_share > served.chance_share)
        real.append(served.drawn)
        # what the worker serves is exactly this map
        assert np.array_equal(screener.bone_saliency(film, region, cam), served.heat)
    assert any(real) and not all(real), real


def test_the_kept_map_keeps_its_strength_and_a_map_off_bone_draws_nothing() -> None:
    """The part of the map on bone is divided by the whole map's maximum, not by its own: a map
    whose peak lies off bone draws that bone part faintly. A map almost all off bone is not
    drawn at all, however bright its bone part (the review's case: 98.5 % of the map off bone)."""
    from model.preprocess import PreprocessSpec, crop_box

    _, film, _ = _synthetic(990001, 2)
    region = crop_box(film.shape, PreprocessSpec())
    grid, on_film = film_on_grid(film, region, 256)
    bone = bone_estimate(grid, on_film)
    assert bone.any()
    # on bone at 0.4, a hot spot off bone at 1.0 (a tenth of the bone's area): kept share high
    cam = np.where(bone, 0.4, 0.0).astype(np.float32)
    off = np.argwhere(~bone & (np.arange(256)[:, None] > 200))[: max(1, int(bone.sum()) // 10)]
    cam[off[:, 0], off[:, 1]] = 1.0
    out = on_bone(film, region, cam)
    assert out.drawn and out.heat.max() == pytest.approx(0.4)
    assert np.array_equal(out.heat > 0, bone)
    # the same bone part, but the map's mass is 98.5 % off bone: nothing is drawn
    cam = np.where(bone, 1.0, 0.0).astype(np.float32)
    cam[~bone] = bone.sum() * (0.985 / 0.015) / (~bone).sum()
    out = on_bone(film, region, cam)
    assert out.kept_share == pytest.approx(0.015, abs=1e-4) and not out.drawn and not out.heat.any()


def test_restriction_keeps_the_map_off_collimation_soft_tissue_and_the_edges() -> None:
    """The bone estimate lies on the generator's bone, away from the square's outer margin and
    the cells off the film; a map on it is drawn only there."""
    from model.preprocess import PreprocessSpec, crop_box, resize_mask

    spec = PreprocessSpec()
    _, film, mask = _synthetic(990001, 2)  # a film with a collimation frame
    region = crop_box(film.shape, spec)
    grid, on_film = film_on_grid(film, region, 256)
    bone = bone_estimate(grid, on_film)
    assert bone_share(bone, resize_mask(mask, spec)) >= 0.9
    assert not bone[:8].any() and not bone[-8:].any() and not bone[:, :8].any() and not bone[:, -8:].any()
    served = restrict_to_bone(film, region, np.where(bone, 1.0, 0.1).astype(np.float32))
    assert served.max() == pytest.approx(1.0) and np.array_equal(served > 0, bone)
    # crop "full" on a portrait film: the square's columns left and right of the film are zero
    full = PreprocessSpec(crop="full")
    square = crop_box(film.shape, full)
    grid, (g0, h0, g1, h1) = film_on_grid(film, square, 256)
    assert h0 > 0 and h1 < 256 and np.isnan(grid[:, :h0]).all()
    est = bone_estimate(grid, (g0, h0, g1, h1))
    assert not est[:, :h0].any() and not est[:, h1:].any() and est.any()
    # and the mask measure pads with 0 there (no bone off the film), not the mask's median
    assert not resize_mask(np.ones_like(mask), full)[:, : h0 - 1].any()


def test_no_bone_no_map() -> None:
    """A blank film (no texture, nothing bright) has no bone: the served map is all NaN (nothing
    to place it on), the overlay draws nothing and says so."""
    region = (50, 20, 350, 320)
    film = np.full((400, 300), 0.3, np.float32)
    out = restrict_to_bone(film, region, np.ones((64, 64), np.float32))
    assert out.shape == (64, 64) and np.isnan(out).all()
    f = _finding(True, out, region)
    assert banner_lines(f)[-2] == LEGEND_NO_BONE
    assert not _hot(_picture(build_overlay(knee_dx(rows=400, cols=300), film, f), 400, 300)).any()


def test_a_film_with_nan_is_refused_clearly(screener: Any) -> None:
    from agent.errors import ProcessingError

    film = np.random.default_rng(3).random((300, 240)).astype(np.float32)
    film[150, 120] = np.nan
    region = (20, 0, 260, 240)
    with pytest.raises(ValueError, match="NaN or infinite"):
        restrict_to_bone(film, region, np.ones((64, 64), np.float32))
    with pytest.raises(ProcessingError, match="NaN or infinite"):
        screener.bone_saliency(film, region, np.ones((64, 64), np.float32))


# ---- the measure on a seeded synthetic set ---------------------------------------------------------


class _Twin:
    """The shipped predictor with its Grad-CAM replaced: ``"flat"`` (a uniform map) or
    ``"inverted"`` (max - map)."""

    def __init__(self, pred: Any, kind: str) -> None:
        self.pred, self.kind, self.spec = pred, kind, pred.spec

    def saliency(self, x: Any) -> np.ndarray:
        cam = np.asarray(self.pred.saliency(x), np.float32)
        if self.kind == "flat":
            return np.ones_like(cam)
        return cam.max(axis=(-2, -1), keepdims=True) - cam


def _network_gate(m: dict[str, Any]) -> bool:
    """The network-dependent gate: the raw map puts more of its mass on bone than a flat map
    (chance) and than its own inverse. A flat map equals chance; of a map and its inverse at
    most one passes."""
    raw = m["saliency_in_bone_raw"]
    return bool(raw > m["saliency_in_bone_uniform"] and raw > m["saliency_in_bone_inverted"])


def test_saliency_in_bone_on_a_small_seeded_set(tmp_path: Path) -> None:
    """model.evaluate's measure, with the shipped checkpoint, on 12 seeded synthetic films: where
    the served map is drawn at least 0.80 of its mass is on the generator's bone; the
    network-dependent figures are written; and null-map twins (the same films with a flat or an
    inverted map in place of Grad-CAM) cannot pass both gates: a flat map is never drawn (the
    served figure is NaN) and equals chance, and the real map and its inverse never both pass."""
    from model.data import build_cache, read_manifest
    from model.evaluate import saliency_in_bone
    from model.predict import Predictor
    from model.synth.generate import generate

    rows = read_manifest(generate(tmp_path / "set", n=12, seed=31337))
    assert all(r.mask_path is not None and r.mask_path.exists() for r in rows)
    pred = Predictor(device="cpu")
    cache = build_cache(rows, pred.spec, workers=1, progress=False)
    m = saliency_in_bone(pred, rows, cache, np.ones(len(rows), bool), workers=1)
    detail = m["saliency_in_bone_detail"]
    assert detail["n_images"] == 12 and detail["n_no_bone"] == 0
    assert detail["n_drawn"] + detail["n_off_bone"] == 12 and 0 < detail["n_drawn"] < 12
    assert m["saliency_in_bone"] >= 0.80, m
    lo, hi = m["saliency_in_bone_ci"]
    assert lo <= m["saliency_in_bone"] <= hi
    assert m["saliency_lift"] == pytest.approx(m["saliency_in_bone_raw"] / m["saliency_in_bone_uniform"])
    assert 0 < m["saliency_kept_share"] < 1 and 0 < detail["kept_share_chance"] < 1
    # the served figure is the estimate's: a flat map restricted the same way is as high
    assert detail["estimate_precision"] >= 0.80

    flat = saliency_in_bone(_Twin(pred, "flat"), rows, cache, np.ones(len(rows), bool), workers=1)
    assert flat["saliency_in_bone_detail"]["n_drawn"] == 0
    assert not flat["saliency_in_bone"] >= 0.80  # NaN: nothing drawn, the served gate fails
    assert flat["saliency_in_bone_raw"] == pytest.approx(flat["saliency_in_bone_uniform"], abs=1e-12)
    assert not _network_gate(flat)
    assert flat["saliency_in_bone_uniform"] == pytest.approx(m["saliency_in_bone_uniform"])

    inverted = saliency_in_bone(_Twin(pred, "inverted"), rows, cache, np.ones(len(rows), bool), workers=1)
    assert inverted["saliency_in_bone_inverted"] == pytest.approx(m["saliency_in_bone_raw"])
    assert not (_network_gate(m) and _network_gate(inverted))
    # the map decides which films are drawn: an image's map and its inverse are never both drawn
    assert detail["n_drawn"] + inverted["saliency_in_bone_detail"]["n_drawn"] <= 12


# ---- negative results: grey ----------------------------------------------------------------------


def test_a_negative_result_has_no_heat_colour_and_says_so() -> None:
    source = knee_dx(rows=300, cols=240)
    film = np.random.default_rng(1).random((300, 240)).astype(np.float32)
    f = _finding(False, np.ones((24, 24), np.float32), (48, 18, 252, 222))  # a map that is hot everywhere
    picture = _picture(build_overlay(source, film, f), 300, 240)
    assert np.abs(picture[..., 0] - picture[..., 2]).max() == 0
    assert np.abs(picture[..., 1] - picture[..., 2]).max() == 0
    assert banner_lines(f)[-2] == LEGEND_NEGATIVE
    # a positive with a map says what the colours mean; one without draws none and says why
    positive = replace(f, bone_loss=True, severity="osteopenia")
    assert banner_lines(positive)[-2] == LEGEND_HEAT
    for case, legend in (
        (replace(positive, region=None), LEGEND_NO_REGION),
        (replace(positive, saliency=None), LEGEND_NO_MAP),
        (replace(positive, saliency=np.zeros((24, 24), np.float32)), LEGEND_OFF_BONE),  # not on bone
        (replace(positive, saliency=np.full((24, 24), 0.2, np.float32)), LEGEND_OFF_BONE),  # faint
        (replace(positive, saliency=np.full((24, 24), np.nan, np.float32)), LEGEND_NO_BONE),
    ):
        assert banner_lines(case)[-2] == legend
        assert not _hot(_picture(build_overlay(source, film, case), 300, 240)).any(), legend
    assert len({LEGEND_HEAT, LEGEND_NEGATIVE, LEGEND_NO_REGION, LEGEND_NO_MAP, LEGEND_OFF_BONE, LEGEND_NO_BONE}) == 6


def test_the_demo_normal_study_has_no_hot_colour(screener: Any, tmp_path: Path) -> None:
    """The study `strnet demo` sends as normal, screened through the served path
    (agent.pipeline.run.screen_and_report, overlays on): its overlays are grey below the banner;
    the demo's bone-loss study, screened positive, shows heat where its served map is drawn (the
    model's attention on bone more than chance) and none elsewhere."""
    from agent.demo.run import DEMO_SEED, pick_studies
    from agent.pipeline.run import Finished, screen_and_report
    from model.io import read_pixels
    from model.synth.generate import generate

    studies = {s.label.split(" (")[0]: s for s in pick_studies(generate(tmp_path / "demo", n=16, seed=DEMO_SEED))}
    drawn: list[bool] = []
    assert set(studies) == {"bone loss", "normal"}
    for name, study in studies.items():
        jobs, paths = [], {}
        for i, path in enumerate(study.files):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ref = InstanceRef(
                str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
            )  # fmt: skip
            jobs.append(LeasedJob(i + 1, 1, str(path), ref))
            paths[str(path)] = path
        for done in screen_and_report(jobs, paths, screener, 50_000_000, True):
            assert isinstance(done, Finished) and done.overlay is not None
            sc = pydicom.dcmread(io.BytesIO(done.overlay.data))
            header = pydicom.dcmread(paths[done.job.spool_path], stop_before_pixels=True)
            picture = _picture(sc, int(header.Rows), int(header.Columns))
            if name == "normal":
                assert not done.findings.bone_loss
                assert not _hot(picture).any(), "the demo's normal study shows heat colours"
            elif done.findings.bone_loss:  # heat exactly where the served map is drawn
                served = _served(screener, read_pixels(paths[done.job.spool_path]))
                drawn.append(_draws(replace(served, bone_loss=True)))
                hot = int(_hot(picture).sum())
                assert hot > 100 if drawn[-1] else hot == 0, (drawn[-1], hot)
    assert drawn, "the demo's bone-loss study screened positive"


# ---- the banner --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"ImageLaterality": "R", "Laterality": "R", "ViewPosition": "AP"}, "RIGHT KNEE AP"),
        ({"ImageLaterality": "L", "Laterality": "L", "ViewPosition": "PA"}, "LEFT KNEE PA"),
        ({"ImageLaterality": "B", "Laterality": None, "ViewPosition": "AP"}, "BOTH KNEES AP"),
        ({"ImageLaterality": None, "Laterality": "L", "ViewPosition": None}, "LEFT KNEE"),
        ({"ImageLaterality": None, "Laterality": None, "ViewPosition": "LL"}, "KNEE LL"),
        ({"ImageLaterality": None, "Laterality": None, "ViewPosition": None}, "KNEE"),
    ],
)
def test_banner_names_the_knee_and_view(values: dict[str, str | None], expected: str) -> None:
    source = knee_dx()
    for keyword, value in values.items():
        if value is None:
            delattr(source, keyword)
        else:
            setattr(source, keyword, value)
    anatomy = knee_and_view(reference_dataset(source))
    assert anatomy == expected
    lines = banner_lines(_finding(True, None, None), anatomy)
    assert lines[3] == expected and lines[0].startswith("BONE LOSS SUSPECTED")


def test_banner_lines_are_centred_clear_of_the_corners() -> None:
    """OHIF v3 and the Orthanc viewers write four or five lines of their own in each corner of
    the viewport: the banner's lines are centred and, on a film of ordinary width, take at most
    TEXT_SHARE of it, so its middle stays readable."""
    source = knee_dx(rows=1024, cols=832)
    film = np.full((1024, 832), 0.4, np.float32)
    sc = build_overlay(source, film, _finding(True, None, (0, 0, 832, 832)))
    px = sc.pixel_array.astype(int)
    picture_rows = round(1024 * sc.Columns / 832)
    banner = px[: sc.Rows - picture_rows]
    lit_cols = np.flatnonzero((banner.max(axis=2) > 60).any(axis=0))
    width = sc.Columns
    assert lit_cols.size
    assert lit_cols.min() >= (1 - TEXT_SHARE) / 2 * width - 2 and lit_cols.max() <= (1 + TEXT_SHARE) / 2 * width + 2
    assert abs((lit_cols.min() + lit_cols.max()) / 2 - width / 2) < 0.05 * width  # centred
    lit_rows = np.flatnonzero((banner.max(axis=2) > 60).any(axis=1))
    assert lit_rows.min() >= 4 and lit_rows.max() <= banner.shape[0] - 4  # clear margins
    # the first line is coloured by the result (red), the others are not
    first = banner[lit_rows.min() : lit_rows.min() + 8]
    assert ((first[..., 0] - first[..., 2]) > 100).any()


def test_banner_is_legible_at_the_minimum_width() -> None:
    lines = banner_lines(_finding(True, np.ones((8, 8), np.float32), (0, 0, 30, 30)), "RIGHT KNEE AP")
    font, line_h = _fit_font(lines, MIN_WIDTH_PX)
    assert font.size >= MIN_FONT_PX - 1  # type: ignore[union-attr]
    probe = Image.new("RGB", (1, 1))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(probe)
    assert max(draw.textlength(line, font=font) for line in lines) <= MIN_WIDTH_PX - 8
    sc = build_overlay(knee_dx(rows=40, cols=30), np.zeros((40, 30), np.float32), _finding(True, None, None))
    assert sc.Columns == MIN_WIDTH_PX


# ---- the DICOM object -------------------------------------------------------------------------------


def test_overlay_identity_dates_and_dciodvfy(tmp_path: Path) -> None:
    """Series Date/Time (the build), StudyDescription copied, the model in Contributing Equipment
    after the source's acquisition item, no VOI LUT Function, and dciodvfy: no error."""
    from datetime import datetime

    source = knee_dx(rows=300, cols=240)
    source.StudyDescription = "XR KNEE 2 VIEWS"
    source.ViewPosition = "AP"
    film = np.random.default_rng(2).random((300, 240)).astype(np.float32)
    now = datetime(2026, 3, 4, 5, 6, 7, 890)
    sc = build_overlay(source, film, _finding(True, np.ones((24, 24), np.float32), (48, 18, 252, 222)), now=now)
    assert (str(sc.SeriesDate), str(sc.SeriesTime)) == ("20260304", "050607")
    assert str(sc.SeriesDate) + str(sc.SeriesTime) <= str(sc.ContentDate) + str(sc.ContentTime)[:6]
    assert sc.StudyDescription == "XR KNEE 2 VIEWS"
    assert "VOILUTFunction" not in sc
    purposes = [e.PurposeOfReferenceCodeSequence[0].CodeValue for e in sc.ContributingEquipmentSequence]
    [ours] = [i for i, e in enumerate(sc.ContributingEquipmentSequence) if e.Manufacturer == "strnet-agent"]
    item = sc.ContributingEquipmentSequence[ours]
    assert purposes[ours] == "109102" and item.ManufacturerModelName == "STR-Net 0.3.1-test"
    assert str(item.ContributionDateTime) == "20260304050607"
    assert purposes[0] == "109101" and ours == 1  # after highdicom's acquisition item
    # General Equipment names the model too (reporting/equipment.py identify)
    assert sc.ManufacturerModelName == "STR-Net 0.3.1-test" and sc.SoftwareVersions == "0.3.1-test"
    assert sc.DeviceUID
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    text = proc.stdout + proc.stderr
    assert len(re.findall(r"^(?:Error|Abort)", text, flags=re.MULTILINE)) == 0, text
    assert "VOILUTFunction" not in pydicom.dcmread(path)
