"""The overlay a radiologist opens in any viewer: a secondary capture of the radiograph.

It holds the radiograph (downscaled to at most 1024 px on the long side), on a positive result
where the model's attention favours bone a heat map of that attention on bone, and a text banner
above the image (result, probability, severity, T-score estimate and interval, knee and view,
what the colours mean or why there is no heat map, model, NOT FOR DIAGNOSTIC USE), its lines
centred so that a viewer's own corner text (OHIF v3, the Orthanc viewers: four or five lines in
each corner) leaves them visible.

The heat map is ``finding.saliency`` as the screening path serves it: Grad-CAM of the screening
head already kept on the estimated bone of the assessed square at its own strength, and all zero
when that attention is not on bone more than chance (``model.saliency``), placed here on exactly
that square (``finding.region``, clipped to the image) and blended only where it is salient. It
shows where the model's attention lay, not a lesion: on the synthetic test set Grad-CAM puts
barely more of its mass on bone than a flat map would (docs/model-card.md). A negative result
gets no heat colour at all, and every positive without heat says why in the legend line
(``heat_legend``).

BurnedInAnnotation YES; laterality copied (dciodvfy requires it for a paired body part);
patient and study values (StudyDescription too) as reporting/source.py reads them; the model
named in Contributing Equipment and General Equipment (reporting/equipment.py, IHE AIR);
Series Date/Time = when it was built; UIDs derived (reporting/uids.py) so a resend
deduplicates in PACS.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from agent.domain import Findings
from agent.reporting.equipment import contributing_equipment, identify
from agent.reporting.source import reference_dataset
from agent.reporting.sr import DESCRIPTION
from agent.reporting.uids import model_key, result_uid
from agent.reporting.wording import probability_pair, t_score

MAX_SIDE_PX = 1024
MIN_WIDTH_PX = 320
SALIENT_FROM = 0.25  # saliency below this stays pure grey: the heat map marks, it does not tint
MAX_ALPHA = 0.55  # the anatomy stays visible under the hottest spot
POSITIVE_RGB = (255, 80, 64)
NEGATIVE_RGB = (96, 220, 96)
TEXT_RGB = (235, 235, 235)
LEGEND_RGB = (255, 176, 48)  # the legend of a heat map, in the map's own colours
LEGEND_HEAT = "Red-yellow: model attention on bone, not a lesion"
LEGEND_NEGATIVE = "No heat map: screening negative"
LEGEND_OFF_BONE = "No heat map: model attention not focused on bone"  # at or below chance, or faint
LEGEND_NO_BONE = "No heat map: no bone found in the assessed square"  # the served map is all NaN
LEGEND_NO_MAP = "No heat map: attention map not computed"  # saliency off (worker.saliency)
LEGEND_NO_REGION = "No heat map: assessed square not recorded"
# The banner's lines are centred and, where the font stays legible, no wider than this share of
# the picture: a viewer's corner text (OHIF v3 draws four or five lines in each corner) then
# falls beside them, not on them.
TEXT_SHARE = 0.6
MIN_FONT_PX = 11
_ORIENTATION_LETTERS = set("APLRHF")
_SIDES = {"L": "LEFT", "R": "RIGHT"}


def build_overlay(
    source: Dataset,
    image: np.ndarray,
    finding: Findings,
    *,
    series_number: int = 9902,
    instance_number: int = 1,
    manufacturer: str = "strnet-agent",
    now: datetime | None = None,
) -> Dataset:
    """Build the secondary-capture overlay of one screened image.

    Parameters
    ----------
    source
        The screened image's dataset (patient, study, laterality and UIDs are taken from it, as
        ``reference_dataset`` reads them: normalised, or left empty or out; UTF-8).
    image
        The decoded radiograph, 2-D float in [0, 1], MONOCHROME2 sense (bright = bone), any size.
    finding
        STR-Net's answer for this image; ``finding.saliency`` (2-D in [0, 1], any size, over
        ``finding.region`` of ``image``) or None.
    now
        When it is built (Series Date/Time, the model's contribution); default: now.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"image must be a non-empty 2-D array, not shape {image.shape}")
    now = (now or datetime.now()).replace(microsecond=0)
    version = finding.algorithm.version
    # what the overlay copies, each value read leniently (reporting/source.py): never the source's
    source = reference_dataset(source)
    rgb = render(image, finding, anatomy=knee_and_view(source))
    study_uid = str(source.StudyInstanceUID)
    laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "")
    orientation = _orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid(study_uid, model_key(finding.algorithm), "sc-series"),
        series_number=series_number,
        sop_instance_uid=result_uid(str(source.SOPInstanceUID), model_key(finding.algorithm), "sc"),
        instance_number=instance_number,
        manufacturer=manufacturer,
        laterality=laterality if laterality in ("L", "R") else None,
        patient_orientation=orientation or ("L", "F"),  # placeholder, replaced below
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=DESCRIPTION,
        content_date=now.date(),  # one stamp for the content and the series: when it was built
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        # after highdicom's item for the source's acquisition equipment, before its own
        contributing_equipment=[contributing_equipment(finding.algorithm, manufacturer, now)],
    )
    identify(sc, finding.algorithm)
    if "StudyDescription" in source:
        sc.StudyDescription = source.StudyDescription
    if orientation is None:  # highdicom takes single letters only; keep the source's, or empty
        sc.PatientOrientation = source.get("PatientOrientation", "")
    if laterality not in ("L", "R"):  # Type 2C for a paired body part: present, empty
        sc.Laterality = ""
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (
        "NOT FOR DIAGNOSTIC USE. Banner and, on a positive result where the model's attention "
        "favours bone, that attention on bone (Grad-CAM; not a lesion) burned in by STR-Net."
    )
    sc.DerivationDescription = f"{finding.algorithm.name} {version} screening overlay of the referenced image"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    if "VOILUTFunction" in sc:  # OHIF 3.13 refuses an overlay that has one ("LINEAR")
        del sc.VOILUTFunction
    return sc


def render(image: np.ndarray, finding: Findings, anatomy: str = "") -> np.ndarray:
    """The overlay's pixels: (H, W, 3) uint8, banner on top, on a positive result the heat map
    on ``finding.region`` where salient. ``anatomy``: the banner's knee-and-view line.

    The whole picture, banner included, is at most ``MAX_SIDE_PX`` on its long side.
    """
    lines = banner_lines(finding, anatomy)
    rows, cols = image.shape
    # One shrink straight to the final size (banner room included), computed before any pixel
    # work: the clean-up and blending then touch ~1 M pixels instead of the detector's ~5 M.
    scale = min(1.0, MAX_SIDE_PX / max(rows, cols))
    shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    font, line_h = _fit_font(lines, max(shape[1], MIN_WIDTH_PX))
    banner_h = _banner_height(len(lines), line_h)
    if shape[0] + banner_h > MAX_SIDE_PX:  # tall film: make room for the banner
        scale = min(scale, (MAX_SIDE_PX - banner_h) / rows)
        shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        font, line_h = _fit_font(lines, max(shape[1], MIN_WIDTH_PX))  # narrower now
        banner_h = _banner_height(len(lines), line_h)
    grey = np.clip(np.nan_to_num(_shrink(np.asarray(image, dtype=np.float32), shape)), 0.0, 1.0)
    grey_u8 = _to_u8(grey.copy())
    placed = _placed_heat(finding, image.shape, shape) if shows_heat(finding) else None
    if placed is None:
        picture = Image.fromarray(grey_u8, mode="L").convert("RGB")
    else:
        window, heat = placed
        alpha = MAX_ALPHA * np.clip((heat - SALIENT_FROM) / (1.0 - SALIENT_FROM), 0.0, 1.0)
        # Blend plane by plane, and only the rows and columns where something is salient: the
        # rest of the film stays exactly grey (and costs no arithmetic).
        planes = [grey_u8, grey_u8.copy(), grey_u8.copy()]
        rows_hot, cols_hot = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        if rows_hot.size:
            hot = np.s_[rows_hot[0] : rows_hot[-1] + 1, cols_hot[0] : cols_hot[-1] + 1]
            box = np.s_[
                window[0] + rows_hot[0] : window[0] + rows_hot[-1] + 1,
                window[1] + cols_hot[0] : window[1] + cols_hot[-1] + 1,
            ]
            g, a = grey[box], alpha[hot]
            for plane, ramp in zip(planes, _colormap(heat[hot]), strict=True):
                plane[box] = _to_u8(g + a * (ramp - g))
        picture = Image.merge("RGB", [Image.fromarray(p, mode="L") for p in planes])
    width = max(picture.width, MIN_WIDTH_PX)  # a tiny image still gets a legible banner
    canvas = Image.new("RGB", (width, picture.height + banner_h), (0, 0, 0))
    canvas.paste(picture, ((width - picture.width) // 2, banner_h))
    draw = ImageDraw.Draw(canvas)
    legend = len(lines) - 2
    for i, line in enumerate(lines):
        if i == 0:
            colour = POSITIVE_RGB if finding.bone_loss else NEGATIVE_RGB
        else:
            colour = LEGEND_RGB if i == legend and placed is not None else TEXT_RGB
        # centred: clear of the corner text viewers draw over the image's corners
        x = (width - draw.textlength(line, font=font)) / 2
        draw.text((max(4.0, x), line_h // 2 + i * line_h), line, fill=colour, font=font)
    return np.asarray(canvas)


def _banner_height(n_lines: int, line_h: int) -> int:
    """The banner's band: its lines with half a line of black above and below."""
    return line_h * n_lines + 2 * (line_h // 2)


def heat_legend(finding: Findings) -> str:
    """The banner's legend line: what the colours mean, or why there is no heat map. Only a
    positive result whose served map (over a known square) is salient somewhere draws heat;
    negative results never get heat colours."""
    if not finding.bone_loss:
        return LEGEND_NEGATIVE
    if finding.saliency is None:
        return LEGEND_NO_MAP
    if finding.region is None:
        return LEGEND_NO_REGION
    heat = np.asarray(finding.saliency, dtype=np.float32)
    if heat.ndim != 2 or min(heat.shape) == 0:
        return LEGEND_NO_MAP
    finite = np.isfinite(heat)
    if not finite.any():  # model.saliency: no bone found in the square
        return LEGEND_NO_BONE
    # all zero: the attention was not on bone more than chance; below SALIENT_FROM: faint there
    return LEGEND_HEAT if bool(heat[finite].max() >= SALIENT_FROM) else LEGEND_OFF_BONE


def shows_heat(finding: Findings) -> bool:
    """Whether the overlay draws a heat map (``heat_legend``)."""
    return heat_legend(finding) == LEGEND_HEAT


def _placed_heat(
    finding: Findings, source_shape: tuple[int, ...], shape: tuple[int, int]
) -> tuple[tuple[int, int], np.ndarray] | None:
    """The saliency map placed on ``finding.region`` of the picture (the source shrunk to
    ``shape``), clipped to it: the picture window's top-left corner and the heat over that
    window; None when the square lies off the picture."""
    heat = np.nan_to_num(np.asarray(finding.saliency, dtype=np.float32))
    if heat.ndim != 2:
        raise ValueError(f"saliency must be 2-D, not shape {heat.shape}")
    r0, c0, r1, c1 = (float(v) for v in finding.region)  # type: ignore[union-attr]
    if r1 <= r0 or c1 <= c0:
        raise ValueError("the assessed region is empty")
    sy, sx = shape[0] / source_shape[0], shape[1] / source_shape[1]
    # the square in picture pixels (fractional), and the part of the picture it covers
    top, left, bottom, right = r0 * sy, c0 * sx, r1 * sy, c1 * sx
    w_top, w_left = max(0, round(top)), max(0, round(left))
    w_bottom, w_right = min(shape[0], round(bottom)), min(shape[1], round(right))
    if w_bottom <= w_top or w_right <= w_left:
        return None
    # that window in the map's own coordinates: PIL resamples exactly that part of the map
    ky, kx = heat.shape[0] / (bottom - top), heat.shape[1] / (right - left)
    # (rounding the window may put its edge up to half a pixel outside the square: clamp)
    box = (
        max(0.0, (w_left - left) * kx),
        max(0.0, (w_top - top) * ky),
        min(float(heat.shape[1]), (w_right - left) * kx),
        min(float(heat.shape[0]), (w_bottom - top) * ky),
    )
    out = Image.fromarray(np.ascontiguousarray(heat), mode="F").resize(
        (w_right - w_left, w_bottom - w_top), Image.Resampling.BILINEAR, box=box
    )
    return (w_top, w_left), np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _to_u8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 0..255, rounded half to even (in place: ``values`` is scratch)."""
    values *= 255.0
    return np.rint(values, out=values).astype(np.uint8)


def knee_and_view(source: Dataset) -> str:
    """The banner's anatomy line, e.g. "RIGHT KNEE AP" (ImageLaterality, else Laterality, and
    ViewPosition of the source); what is not known is left out ("KNEE AP", "RIGHT KNEE")."""
    side = str(source.get("ImageLaterality") or source.get("Laterality") or "").strip().upper()
    knee = "BOTH KNEES" if side == "B" else " ".join(filter(None, (_SIDES.get(side), "KNEE")))
    view = str(source.get("ViewPosition") or "").strip().upper()
    return " ".join(filter(None, (knee, view)))


def banner_lines(finding: Findings, anatomy: str = "") -> list[str]:
    """The banner text, one string per line: the result, the probability, the T-score, the knee
    and view (``anatomy``, when given), what the colours mean, the model."""
    result = "BONE LOSS SUSPECTED" if finding.bone_loss else "NO BONE LOSS DETECTED"
    severity = (finding.severity or "").capitalize() if finding.bone_loss else ""
    probability, threshold = probability_pair(finding.probability, finding.threshold)
    lines = [
        result + (f" - {severity}" if severity else ""),
        f"P(bone loss) {probability} (threshold {threshold})",
        f"Est. T-score {t_score(finding.t_score)} "
        f"[{t_score(finding.t_score_low)}, {t_score(finding.t_score_high)}] "
        f"{finding.interval_coverage:.0%} interval",
    ]
    if anatomy:
        lines.append(anatomy)
    lines.append(heat_legend(finding))
    lines.append(f"{finding.algorithm.name} {finding.algorithm.version} - NOT FOR DIAGNOSTIC USE")
    return lines


def _block_mean(values: np.ndarray, k: int) -> np.ndarray:
    """k x k block means (drops < k edge pixels); strided adds are far cheaper than a
    reshape-mean over two axes."""
    r, c = (values.shape[0] // k) * k, (values.shape[1] // k) * k
    block = values[0:r:k, 0:c:k].copy()
    for i in range(k):
        for j in range(k):
            if i or j:
                block += values[i:r:k, j:c:k]
    return block * np.float32(1.0 / (k * k))


def _shrink(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average ``values`` down to ``shape``: whole blocks averaged in numpy first (cheap on
    a 5 M pixel film), then PIL's box filter for the remaining non-integer step."""
    if values.shape == shape:
        return values
    k = min(values.shape[0] // shape[0], values.shape[1] // shape[1])
    if k >= 2:
        values = _block_mean(values, k)
    return _resize_float(values, shape)


def _resize_float(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if values.ndim != 2:
        raise ValueError(f"saliency must be 2-D, not shape {values.shape}")
    if values.shape == shape:
        return values
    # Area averaging when shrinking (fast, no aliasing), bilinear when enlarging a saliency map.
    shrink = shape[0] <= values.shape[0] and shape[1] <= values.shape[1]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(values), mode="F").resize((shape[1], shape[0]), method)
    return np.asarray(out, dtype=np.float32)


def _colormap(heat: np.ndarray) -> tuple[np.ndarray | float, np.ndarray, float]:
    """A yellow-to-red ramp in [0, 1], as (red, green, blue) planes or constants
    (warm colours read as "look here" on a grey film)."""
    return 1.0, np.clip(1.0 - heat, 0.0, 1.0) * np.float32(0.9), 0.0


def _fit_font(lines: list[str], width: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """The banner's font and line height: the largest default font (up to width/34 px) whose
    longest line takes at most ``TEXT_SHARE`` of ``width``, so that the centred lines stay clear
    of a viewer's corner text; never below ``MIN_FONT_PX`` unless even that is too wide to fit."""
    size = max(MIN_FONT_PX, width // 34)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def longest(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
        return max(probe.textlength(line, font=font) for line in lines)

    font = ImageFont.load_default(size=size)
    wide = longest(font)
    if wide > TEXT_SHARE * width and size > MIN_FONT_PX:  # text width scales with the size: jump
        size = max(MIN_FONT_PX, int(size * TEXT_SHARE * width / wide))
        font = ImageFont.load_default(size=size)
    while size > MIN_FONT_PX and longest(font) > TEXT_SHARE * width:
        size -= 1
        font = ImageFont.load_default(size=size)
    while size > 8 and longest(font) > width - 8:  # a narrow picture: legible first, then fit
        size -= 1
        font = ImageFont.load_default(size=size)
    return font, round(size * 1.3)


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    row, col = str(value[0]), str(value[1])
    if len(row) == 1 and len(col) == 1 and {row, col} <= _ORIENTATION_LETTERS:
        return row, col
    return None
