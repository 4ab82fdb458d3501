"""The DICOM variant corpus: knee radiographs as sites really send them, made by code (nothing stored).

Each ``Case`` builds one dataset, or a list sent in order over one association, from
tests/dicom_factory.py, and says what the agent must make of it (``Expectation``): the answer to
each C-STORE, the final state of each job the case created, the reason of a SKIPPED job, and, for a
screened study, what its SR holds and that dciodvfy finds no error in it. tests/corpus/test_corpus.py
sends every case to one agent and checks each on its own.

Every case carries planted PHI (``PHI_NAME``, ``PHI_ID``, ``PHI_BIRTH`` ...): the run asserts that
none of it (``PHI_TOKENS``, ``PHI_DATE``: the birth date however it is written) reaches a log line
or a job's reason. Images are 320 x 256 except in the size cases.

The rules asserted (the agent's eligibility and value reading):

- dates, times, ages, sexes and names are read leniently and never cost a screening: DA YYYYMMDD or
  year-first YYYY-MM-DD / YYYY/MM/DD / YYYY.MM.DD, anything else is absent; TM HHMMSS[.f] or
  HH:MM[:SS]; AS nnnD/W/M/Y, where 000Y and a number without a unit are unknown and the age comes
  from the birth and study dates; an unknown age is screened, a known one under 18 is SKIPPED;
  sex M/F/O (male/m, female/f read as M, F), anything else empty; a missing type 2 attribute is
  empty in the results;
- lateral and oblique views are SKIPPED; a laterality conflict is screened without a laterality;
- body part KNEE in any spelling is screened; LEG, EXTREMITY or none only with a knee word (KNEE,
  KNIE, GENOU, RODILLA, GINOCCHIO, JOELHO) in a description or protocol name, or a knee anatomic
  region code; anything else (CHEST) is SKIPPED;
- a blank or near-uniform film is SKIPPED; an identical resend is one job; a different one with the
  same SOP Instance UID is kept and SKIPPED as a conflict;
- every C-STORE is answered Success unless the dataset cannot be read at all.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dicom_factory import DX_PROCESSING, compressed, dcmtk_jpeg, knee_dx, pixels, raw_value, set_pixels
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, DeflatedExplicitVRLittleEndian, JPEGLSNearLossless, generate_uid

from agent.domain import JobState
from agent.ingest.eligibility import (
    BODY_PART_REASON,
    GENERIC_BODY_PART_REASON,
    LATERAL_REASON,
    MODALITY_REASON,
    NOT_GREYSCALE_REASON,
    OBLIQUE_REASON,
)
from agent.pacs.status import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS
from agent.pipeline.load import BLANK_REASON
from agent.queue.store import CONFLICT_REASON

DONE, SKIPPED = JobState.DONE, JobState.SKIPPED
MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation

# ---- planted PHI: none of it may reach a log line or a job's reason ---------------------------------
PHI_NAME = "ZZPHI^CANARY"
PHI_ID = "CANARY-ID-1234"
PHI_BIRTH = "19450325"
PHI_ACCESSION = "CANARY-ACC-77"
PHI_REFERRER = "ZZPHI^REFERRER"
CHILD_BIRTH = "20190611"  # the paediatric cases' birth date
LATIN1_NAME = "ZZPHI-Müller^Jörg"
PHI_TOKENS = ("ZZPHI", "CANARY", "Müller", "Jörg", "Ωμέγα", "Zoë", "山田", "太郎", "やまだ", CHILD_BIRTH, "2019-06-11")
# 19450325 however it is written: 1945-03-25, 25/03/1945, 25.3.1945, 03/25/1945 ...
PHI_DATE = re.compile(r"1945\D{0,2}0?3\D{0,2}25|25\D{0,2}0?3\D{0,2}1945|0?3\D{0,2}25\D{0,2}1945")

# ---- reasons: the exact texts the agent records for a SKIPPED job (docs/dicom-values.md) -------------
AGE = r"^not eligible: patient younger than \d+ years$"
LATERAL = f"^not eligible: ({re.escape(LATERAL_REASON)}|{re.escape(OBLIQUE_REASON)})$"
BODY_PART = f"^not eligible: ({re.escape(BODY_PART_REASON)}|{re.escape(GENERIC_BODY_PART_REASON)})$"
BLANK = f"^{re.escape(BLANK_REASON)}$"
CONFLICT = f"^{re.escape(CONFLICT_REASON)}"
COLOUR = f"^not eligible: {re.escape(NOT_GREYSCALE_REASON)}$"
MODALITY = f"^not eligible: {re.escape(MODALITY_REASON)}$"

TYPE_2 = (
    "StudyDate",
    "StudyTime",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "PatientSex",
    "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Expectation:
    """What the agent must make of a case.

    ``status``: the answer to each C-STORE. ``states``: the final state of each job the case
    created, in the order they were created (empty: none). ``reason``: a regular expression, searched
    in any case, that the reason of every SKIPPED job matches. ``sr``: for a screened study, SR
    attributes and a regular expression each value must match in full ("": present and empty).
    ``no_laterality``: neither the SR nor the overlay states a laterality. ``validate``: dciodvfy
    finds no error in the study's SR.
    """

    states: tuple[JobState, ...] = (DONE,)
    reason: str | None = None
    status: int = SUCCESS
    negotiation_refused: bool = False  # no presentation context accepted: no C-STORE, no job
    sr: Mapping[str, str] = field(default_factory=dict)
    no_laterality: bool = False
    validate: bool = True

    @property
    def screened(self) -> bool:
        return DONE in self.states


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Dataset | list[Dataset]]
    expect: Expectation

    def datasets(self) -> list[Dataset]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about each invalid value a case plants
            out = self.build()
        return out if isinstance(out, list) else [out]


def case(name: str, build: Callable[[], Dataset | list[Dataset]], **expect: Any) -> Case:
    return Case(name, build, Expectation(**expect))


# ---- builders -------------------------------------------------------------------------------------------
def uid() -> str:
    """A new UID without "1945" in it: the PHI check looks for the planted birth date's digits."""
    value = generate_uid()
    while "1945" in value:
        value = generate_uid()
    return value


def base(*, rows: int = 320, cols: int = 256, seed: int = 0, **knee: Any) -> Dataset:
    """A DX knee AP, 12 bits, explicit VR little endian, carrying the planted PHI."""
    ds = knee_dx(
        study_uid=uid(),
        series_uid=uid(),
        sop_uid=uid(),
        rows=rows,
        cols=cols,
        seed=seed,
        patient_name=PHI_NAME,
        patient_id=PHI_ID,
        birth_date=PHI_BIRTH,
        **knee,
    )
    ds.AccessionNumber = PHI_ACCESSION
    ds.ReferringPhysicianName = PHI_REFERRER
    return ds


def change(ds: Dataset, **attrs: Any) -> Dataset:
    """Set attributes; None removes one."""
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def variant(knee: Mapping[str, Any] | None = None, **attrs: Any) -> Callable[[], Dataset]:
    """A builder: ``base(**knee)`` with ``attrs`` changed."""

    def build() -> Dataset:
        return change(base(**(knee or {})), **attrs)

    return build


def sop_class(uid_: str, **attrs: Any) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = change(base(), SOPClassUID=uid_, **attrs)
        ds.file_meta.MediaStorageSOPClassUID = uid_
        return ds

    return build


def region_code(code: str, scheme: str) -> Callable[[], Dataset]:
    """No BodyPartExamined, no description: the knee only as an AnatomicRegionSequence code."""

    def build() -> Dataset:
        ds = change(base(), BodyPartExamined=None)
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, scheme, "Knee"
        ds.AnatomicRegionSequence = [item]
        return ds

    return build


def bits(n: int) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = set_pixels(base(), pixels(320, 256, bits=n), bits_stored=n)
        return change(ds, WindowCenter=2 ** (n - 1), WindowWidth=2**n)

    return build


def signed_pixels() -> Dataset:
    arr = pixels(320, 256).astype(np.int32) - 2048
    return change(set_pixels(base(), arr, bits_stored=12, signed=True), WindowCenter=0, WindowWidth=4096)


def voi_lut_sequence() -> Dataset:
    """No window: a VOI LUT (a gamma curve over the 12-bit range) in its sequence instead."""
    ds = change(base(), WindowCenter=None, WindowWidth=None)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUTDescriptor: entries, first value mapped, bits
    curve = (np.linspace(0.0, 1.0, 4096) ** 0.6 * 65535).astype(int).tolist()
    item.add_new(0x00283006, "US", curve)  # LUTData
    item.LUTExplanation = "GAMMA 0.6"
    ds.VOILUTSequence = [item]
    return ds


def big(rows: int, cols: int) -> Callable[[], Dataset]:
    """A large matrix, tiled from a small image (the factory's full-size pattern needs gigabytes)."""

    def build() -> Dataset:
        tile = pixels(430, 350, seed=3)
        arr = np.tile(tile, (-(-rows // 430), -(-cols // 350)))[:rows, :cols]
        return set_pixels(base(), arr, bits_stored=12)

    return build


def multi_frame() -> Dataset:
    return set_pixels(base(), np.stack([pixels(320, 256, seed=0), pixels(320, 256, seed=1)]), bits_stored=12)


def rgb() -> Dataset:
    grey = pixels(320, 256, bits=8).astype(np.uint8)
    ds = change(
        base(),
        WindowCenter=None,
        WindowWidth=None,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    ds.PixelData = np.stack([grey, grey, grey], axis=-1).tobytes()
    return ds


def uniform(value: int, noise: int = 0) -> Callable[[], Dataset]:
    """A film of one value (a blank, unexposed or burnt-out plate), with +-``noise`` if asked."""

    def build() -> Dataset:
        arr = np.full((320, 256), value, dtype=np.int32)
        if noise:
            arr += np.random.default_rng(5).integers(-noise, noise + 1, size=arr.shape)
        return set_pixels(base(), arr, bits_stored=12)

    return build


def codec(name: str) -> Callable[[], Dataset]:
    """Compressed by pydicom's encoders: j2k, jls or rle (lossless)."""
    return lambda: compressed(base(), name)


def jpeg_ls_near_lossless() -> Dataset:
    out = copy.deepcopy(base())
    out.compress(JPEGLSNearLossless, jls_error=2)
    return out


def jpeg_2000_lossy() -> Dataset:
    out = copy.deepcopy(base())
    out.compress(JPEG2000, j2k_cr=[15])
    out.LossyImageCompression = "01"
    return out


def dcmtk(option: str, n_bits: int = 12) -> Callable[[], Dataset]:
    """Compressed by DCMTK's dcmcjpeg (JPEG baseline, extended and both lossless processes)."""

    def build() -> Dataset:
        return dcmtk_jpeg(bits(n_bits)(), option)

    return build


def deflated() -> Dataset:
    ds = base()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # the SCU deflates it on the wire
    return ds


def raw_name(charset: str | None, name: bytes, **attrs: Any) -> Callable[[], Dataset]:
    """A patient name as bytes that its declared character set (or none) does not describe."""

    def build() -> Dataset:
        ds = change(base(), SpecificCharacterSet=charset, **attrs)
        return raw_value(ds, "PatientName", name)

    return build


def truncated_pixels() -> Dataset:
    ds = base()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def duplicate() -> list[Dataset]:
    ds = base()
    return [ds, copy.deepcopy(ds)]


def conflict(**attrs: Any) -> Callable[[], list[Dataset]]:
    """The same SOP Instance UID twice, the second with other pixels (or other attributes)."""

    def build() -> list[Dataset]:
        first = base()
        second = copy.deepcopy(first)
        if attrs:
            change(second, **attrs)
        else:
            second.PixelData = pixels(320, 256, seed=7).tobytes()
        return [first, second]

    return build


def bilateral_two_views() -> list[Dataset]:
    """XR KNEE 2 VIEWS, both knees: AP and lateral of each, one study (the laterals are SKIPPED)."""
    study, out = uid(), []
    for side in ("L", "R"):
        series = uid()
        for view in ("AP", "LAT"):
            ds = base(seed=len(out), laterality=side)
            change(
                ds,
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                ViewPosition=view,
                InstanceNumber=len(out) + 1,
                StudyDescription="XR KNEE 2 VIEWS BILATERAL",
            )
            out.append(ds)
    return out


LONG = "XR KNEE BILATERAL WEIGHT-BEARING STANDING AP AND ROSENBERG VIEWS FOR OSTEOARTHRITIS FOLLOW-UP "

# ---- the corpus ---------------------------------------------------------------------------------------
CASES: list[Case] = [
    case("baseline-dx-knee-explicit-little-endian", variant()),
    # -- dates, times, ages, sexes and names as sites write them: none may cost a screening
    case("birth-date-dd-mm-yyyy", variant(PatientBirthDate="25/03/1945"), sr={"PatientBirthDate": ""}),
    # a value read leniently is in the SR as DICOM writes it (19450325, 123000); one not read is empty
    case("birth-date-iso-dashes", variant(PatientBirthDate="1945-03-25"), sr={"PatientBirthDate": "19450325"}),
    case("birth-date-year-first-slashes", variant(PatientBirthDate="1945/03/25"), sr={"PatientBirthDate": "19450325"}),
    case("birth-date-zeros", variant(PatientBirthDate="00000000"), sr={"PatientBirthDate": ""}),
    case("study-date-dotted-dd-mm-yyyy", variant(StudyDate="11.02.2023"), sr={"StudyDate": ""}),
    case("study-date-formula", variant(StudyDate="=1+1"), sr={"StudyDate": ""}),
    case("study-date-year-first-dots", variant(StudyDate="2023.02.11"), sr={"StudyDate": "20230211"}),
    case("study-date-iso-dashes", variant(StudyDate="2023-02-11"), sr={"StudyDate": "20230211"}),
    case("study-time-12-hour-clock", variant(StudyTime="12:30 PM"), sr={"StudyTime": ""}),
    case("study-time-hh-mm-ss-colons", variant(StudyTime="12:30:00"), sr={"StudyTime": r"123000(\.0*)?"}),
    case("study-time-hh-mm-colon", variant(StudyTime="12:30"), sr={"StudyTime": r"1230(00)?(\.0*)?"}),
    case("study-time-with-fraction", variant(StudyTime="101500.123456"), sr={"StudyTime": r"101500\.123456"}),
    case(
        "acquisition-and-content-date-times-malformed",
        variant(AcquisitionDateTime="2023-02-11 10:15", ContentDate="11/02/2023", ContentTime="10:15 AM"),
    ),
    case("age-000Y", variant(PatientAge="000Y")),
    case("age-8-without-unit", variant(PatientAge="8")),  # unknown: the 1945 birth date says adult
    case("age-065Y", variant(PatientAge="065Y")),
    case("age-012Y-paediatric", variant(PatientAge="012Y"), states=(SKIPPED,), reason=AGE),
    case("age-006M-infant", variant(PatientAge="006M"), states=(SKIPPED,), reason=AGE),
    case("age-from-birth-date-paediatric", variant(PatientBirthDate=CHILD_BIRTH), states=(SKIPPED,), reason=AGE),
    case(
        "age-without-unit-paediatric-birth-date",
        variant(PatientAge="8", PatientBirthDate=CHILD_BIRTH),
        states=(SKIPPED,),
        reason=AGE,
    ),
    case("age-unknown-everywhere", variant(PatientAge="000Y", PatientBirthDate="00000000")),
    case("sex-male-spelled-out", variant(PatientSex="male"), sr={"PatientSex": "M"}),
    case("sex-lower-case-f", variant(PatientSex="f"), sr={"PatientSex": "F"}),
    case("sex-FEMALE", variant(PatientSex="FEMALE"), sr={"PatientSex": "F"}),
    case("sex-U", variant(PatientSex="U"), sr={"PatientSex": ""}),
    case("sex-O", variant(PatientSex="O"), sr={"PatientSex": "O"}),
    case("name-trailing-empty-components", variant(PatientName="ZZPHI^CANARY^^^")),
    case("name-six-components", variant(PatientName="ZZPHI^CANARY^A^B^C^D")),
    case("name-comma-instead-of-caret", variant(PatientName="ZZPHI, CANARY")),
    case("name-only-spaces", variant(PatientName="    ")),
    case("name-three-component-groups", variant(PatientName="ZZPHI^CANARY=ZZPHI^IDEO=ZZPHI^PHONETIC")),
    case("name-very-long", variant(PatientName="ZZPHI" + "Q" * 150 + "^CANARY" + "W" * 80)),
    # -- type 1/2 attributes missing or empty: empty in the results
    *[case(f"missing-{keyword}", variant(**{keyword: None}), sr={keyword: ""}) for keyword in TYPE_2],
    case("empty-PatientID-and-StudyDate", variant(PatientID="", StudyDate=""), sr={"PatientID": "", "StudyDate": ""}),
    case("missing-every-type-2-attribute", variant(**dict.fromkeys(TYPE_2)), sr=dict.fromkeys(TYPE_2, "")),
    # -- body part, spelled or coded every way sites do it
    case("body-part-lower-case", variant(BodyPartExamined="knee")),
    case("body-part-trailing-space", variant(BodyPartExamined="KNEE ")),
    case("body-part-mixed-case-leading-space", variant(BodyPartExamined=" Knee")),
    case(
        "body-part-LEG-knee-in-study-description", variant(BodyPartExamined="LEG", StudyDescription="XR KNEE 2 VIEWS")
    ),
    case(
        "body-part-LEG-joelho-in-series-description", variant(BodyPartExamined="LEG", SeriesDescription="RX JOELHO ESQ")
    ),
    case("body-part-LEG-no-knee-word", variant(BodyPartExamined="LEG"), states=(SKIPPED,), reason=BODY_PART),
    case(
        "body-part-EXTREMITY-knie-in-study-description",
        variant(BodyPartExamined="EXTREMITY", StudyDescription="Knie bds."),
    ),
    case("body-part-EXTREMITY-genou-in-protocol", variant(BodyPartExamined="EXTREMITY", ProtocolName="GENOU FACE")),
    case(
        "body-part-EXTREMITY-ankle",
        variant(BodyPartExamined="EXTREMITY", StudyDescription="XR ANKLE 3 VIEWS"),
        states=(SKIPPED,),
        reason=BODY_PART,
    ),
    case(
        "body-part-absent-knee-in-study-description", variant(BodyPartExamined=None, StudyDescription="XR KNEE 2 VIEWS")
    ),
    case("body-part-absent-knie-in-study-description", variant(BodyPartExamined=None, StudyDescription="Knie bds.")),
    case(
        "body-part-absent-rodilla-in-series-description", variant(BodyPartExamined=None, SeriesDescription="RODILLA AP")
    ),
    case("body-part-absent-ginocchio-in-protocol", variant(BodyPartExamined=None, ProtocolName="RX GINOCCHIO DX")),
    case("body-part-absent-no-hint", variant(BodyPartExamined=None), states=(SKIPPED,), reason=BODY_PART),
    case("body-part-absent-snomed-region-code", region_code("72696002", "SCT")),
    case("body-part-absent-srt-region-code", region_code("T-15710", "SRT")),
    case(
        "body-part-CHEST",
        variant(BodyPartExamined="CHEST", StudyDescription="XR CHEST PA"),
        states=(SKIPPED,),
        reason=BODY_PART,
    ),
    # -- views and laterality
    case("view-PA", variant(ViewPosition="PA")),
    case("view-absent", variant(ViewPosition=None)),
    case("view-LAT", variant(ViewPosition="LAT"), states=(SKIPPED,), reason=LATERAL),
    case("view-LL", variant(ViewPosition="LL"), states=(SKIPPED,), reason=LATERAL),
    case("view-RL", variant(ViewPosition="RL"), states=(SKIPPED,), reason=LATERAL),
    case("view-lat-lower-case", variant(ViewPosition="lat"), states=(SKIPPED,), reason=LATERAL),
    case("view-RLO-oblique", variant(ViewPosition="RLO"), states=(SKIPPED,), reason=LATERAL),
    case("laterality-conflict", variant(Laterality="L", ImageLaterality="R"), no_laterality=True),
    case("laterality-lower-case-r", variant(Laterality="r", ImageLaterality="r")),
    case("laterality-absent", variant(Laterality=None, ImageLaterality=None), no_laterality=True),
    case("laterality-series-only", variant(ImageLaterality=None, Laterality="R")),
    case("study-bilateral-ap-and-lateral", bilateral_two_views, states=(DONE, SKIPPED, DONE, SKIPPED), reason=LATERAL),
    # -- pixels: photometric, bit depth, sign, LUTs, spacing, size, frames, colour, blank films
    case("monochrome1-dx", variant(knee={"monochrome1": True})),
    case("bits-stored-8", bits(8)),
    case("bits-stored-10", bits(10)),
    case("bits-stored-14", bits(14)),
    case("bits-stored-16", bits(16)),
    case("signed-pixels", signed_pixels),
    case(
        "rescale-slope-intercept",
        variant(RescaleSlope=0.5, RescaleIntercept=-1024, RescaleType="US", WindowCenter=0, WindowWidth=2048),
    ),
    case("voi-lut-sequence", voi_lut_sequence),
    case("voi-lut-function-sigmoid", variant(VOILUTFunction="SIGMOID")),
    case("window-absent", variant(WindowCenter=None, WindowWidth=None)),
    case("presentation-lut-inverse", variant(PresentationLUTShape="INVERSE")),
    case("pixel-spacing-only-imager", variant(PixelSpacing=None)),
    case("pixel-spacing-absent", variant(PixelSpacing=None, ImagerPixelSpacing=None)),
    case("matrix-256x256", variant(knee={"rows": 256, "cols": 256})),
    case("matrix-2500x2048", big(2500, 2048)),
    case("matrix-4300x3500", big(4300, 3500)),
    case("multi-frame-2", multi_frame),
    case("rgb", rgb, states=(SKIPPED,), reason=COLOUR),
    case("blank-film-zeros", uniform(0), states=(SKIPPED,), reason=BLANK),
    case("uniform-film-burnt-out", uniform(4095), states=(SKIPPED,), reason=BLANK),
    case("near-uniform-film", uniform(2048, noise=2), states=(SKIPPED,), reason=BLANK),
    # -- every transfer syntax the agent accepts
    case("ts-implicit-vr-little-endian", variant(knee={"implicit": True})),
    case("ts-deflated-explicit-vr-little-endian", deflated),
    case("ts-jpeg-baseline-8-bit", dcmtk("+eb", 8)),
    case("ts-jpeg-extended-12-bit", dcmtk("+ee")),
    case("ts-jpeg-lossless-process-14", dcmtk("+el")),
    case("ts-jpeg-lossless-sv1", dcmtk("+e1")),
    case("ts-jpeg-ls-lossless", codec("jls")),
    case("ts-jpeg-ls-near-lossless", jpeg_ls_near_lossless),
    case("ts-jpeg-2000-lossless", codec("j2k")),
    case("ts-jpeg-2000-lossy", jpeg_2000_lossy),
    case("ts-rle-lossless", codec("rle")),
    # -- character sets, declared right, wrong or not at all
    case("charset-ISO_IR-100-latin1", variant(SpecificCharacterSet="ISO_IR 100", PatientName=LATIN1_NAME)),
    case(
        "charset-ISO_IR-100-knee-in-german-description",
        variant(SpecificCharacterSet="ISO_IR 100", BodyPartExamined=None, StudyDescription="Röntgen Knie bds."),
    ),
    case("charset-ISO_IR-192-utf8", variant(SpecificCharacterSet="ISO_IR 192", PatientName="ZZPHI-Ωμέγα^Zoë")),
    case(
        "charset-ISO-2022-IR-87-japanese",
        variant(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="ZZPHI^CANARY=山田^太郎=やまだ^たろう"),
    ),
    case("charset-ISO_IR-6", variant(SpecificCharacterSet="ISO_IR 6")),
    case("charset-wrong-term-ISO-8859-1", raw_name("ISO-8859-1", LATIN1_NAME.encode("latin-1"))),
    case(
        "charset-none-declared-latin1-bytes",
        raw_name(None, LATIN1_NAME.encode("latin-1")),
        sr={"PatientName": re.escape(LATIN1_NAME)},
    ),
    case(  # undeclared UTF-8 is read as UTF-8, not as Latin-1 mojibake (docs/dicom-values.md)
        "charset-none-declared-utf8-bytes",
        raw_name(None, "ZZPHI-Ωμέγα^Zoë".encode()),
        sr={"PatientName": "ZZPHI-Ωμέγα\\^Zoë"},
    ),
    # -- descriptions at and over their length limit
    case(
        "descriptions-at-the-64-character-limit",
        variant(StudyDescription=LONG[:64], SeriesDescription=LONG[:64], ProtocolName=LONG[:64]),
    ),
    case("descriptions-over-long", variant(StudyDescription=LONG * 3, SeriesDescription=LONG * 3)),
    # -- SOP classes and modalities
    case("sop-dx-for-processing", sop_class(DX_PROCESSING, PresentationIntentType="FOR PROCESSING")),
    case("sop-cr", variant(knee={"modality": "CR"})),
    case("sop-cr-monochrome1", variant(knee={"modality": "CR", "monochrome1": True})),
    case(  # not offered at all (docs/dicom-conformance.md): the association is refused, nothing kept
        "sop-digital-mammography",
        sop_class(MAMMOGRAPHY, Modality="MG", BodyPartExamined="BREAST", ViewPosition="CC"),
        states=(),
        negotiation_refused=True,
    ),
    case(
        "modality-MG-in-a-dx-image",
        variant(Modality="MG", BodyPartExamined="BREAST", ViewPosition="CC"),
        states=(SKIPPED,),
        reason=MODALITY,
    ),
    # -- resends
    case("resend-identical", duplicate),  # Success twice, one job
    case("resend-other-pixels-conflict", conflict(), states=(DONE, SKIPPED), reason=CONFLICT),
    case(
        "resend-other-header-conflict",
        conflict(StudyDescription="XR KNEE AP (CORRECTED)"),
        states=(DONE, SKIPPED),
        reason=CONFLICT,
    ),
    # -- genuinely unreadable: refused, nothing kept
    case("pixel-data-truncated", truncated_pixels, states=(), status=CANNOT_UNDERSTAND),
    case("rows-missing", variant(Rows=None), states=(), status=DATASET_DOES_NOT_MATCH_SOP_CLASS),
]

BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
