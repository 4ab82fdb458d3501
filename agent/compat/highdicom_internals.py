"""highdicom's internals that the agent relies on: nothing outside this module touches them (ADR 0010).

Checked against highdicom ``CHECKED_VERSIONS`` (the range pyproject.toml pins); ``problems()``
names what no longer holds with the installed version. One patch, reported in
``library_patch_missing`` by its name when it does not act:

``sr_content_in_place``
    ``hd.sr.Comprehensive3DSR`` (through ``_SR.__init__``) deep-copies the content tree it is
    given with ``copy.deepcopy`` and parses the copy for its ``content`` property: a third of our
    SR build (80 of 265 ms for a three-image study). A tree built for one SR and never used again
    may be parsed in place instead (``keep_content_uncopied``): the encoded SR is the same to the
    byte (tests/unit/test_reporting.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from agent.compat import PatchMissing, installed_version, version_problem

DISTRIBUTION = "highdicom"
#: the versions every internal below was checked against (pyproject.toml pins the same)
CHECKED_VERSIONS = ">=0.28,<0.29"
CHECKED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 28), (0, 29))

SR_CONTENT_IN_PLACE = "sr_content_in_place"
_EFFECT = "each SR's content tree is deep-copied before highdicom parses it (a third of the SR build)"


class ContentCopy:
    """What ``keep_content_uncopied`` saw: whether highdicom asked to deep-copy the content."""

    __slots__ = ("skipped",)

    def __init__(self) -> None:
        self.skipped = 0  # deep copies of the root answered with the root itself

    def missing(self) -> PatchMissing | None:
        """None when a deep copy was skipped; else the patch did not act (highdicom no longer
        copies the content through ``copy.deepcopy``): what to report."""
        if self.skipped:
            return None
        return PatchMissing(SR_CONTENT_IN_PLACE, ("deepcopy(content) in highdicom.sr.sop._SR.__init__",), _EFFECT)


@contextmanager
def keep_content_uncopied(root: Dataset) -> Iterator[ContentCopy]:
    """Within the block, a deep copy of ``root`` (an SR's content tree built for this SR alone) is
    ``root`` itself: ``hd.sr.Comprehensive3DSR(content=root, ...)`` then parses the tree in place.
    Afterwards ``root`` copies normally again. ``copy.deepcopy`` honours an instance's
    ``__deepcopy__``; ``Dataset.__setattr__`` would take the name for an element, hence ``__dict__``.
    """
    seen = ContentCopy()

    def uncopied(memo: Any) -> Dataset:
        seen.skipped += 1
        return root

    root.__dict__["__deepcopy__"] = uncopied
    try:
        yield seen
    finally:
        root.__dict__.pop("__deepcopy__", None)


def content_parsed_in_place(sr: Any) -> bool:
    """Whether ``sr``'s parsed content (its ``content`` property) is the tree its dataset holds,
    not a copy of it: True for an SR built under ``keep_content_uncopied``."""
    return bool(sr.content[0].ContentSequence is sr.ContentSequence)


def problems() -> list[str]:
    """One line per internal of this module that does not hold with the installed highdicom (the
    version range included); empty when the patch acts as checked."""
    found: list[str] = []
    line = version_problem(DISTRIBUTION, installed_version(DISTRIBUTION), *CHECKED_RANGE)
    if line is not None:
        found.append(line)
    try:
        root, image = _probe_content()
        with keep_content_uncopied(root) as seen:
            sr = hd.sr.Comprehensive3DSR(
                evidence=[image],
                content=root,
                series_instance_uid="2.25.3",
                series_number=1,
                sop_instance_uid="2.25.4",
                instance_number=1,
                manufacturer="strnet-agent probe",
            )
    except Exception as exc:  # noqa: BLE001 - any failure is a line of the report
        return [*found, f"hd.sr.Comprehensive3DSR of a small content tree failed: {exc!r} ({SR_CONTENT_IN_PLACE})"]
    if seen.missing() is not None:
        found.append(
            f"hd.sr.Comprehensive3DSR no longer deep-copies its content with copy.deepcopy ({SR_CONTENT_IN_PLACE})"
        )
    elif not content_parsed_in_place(sr):
        found.append(f"hd.sr.Comprehensive3DSR's content is not the tree it was given ({SR_CONTENT_IN_PLACE})")
    if "__deepcopy__" in root.__dict__:
        found.append(f"keep_content_uncopied left its __deepcopy__ on the content ({SR_CONTENT_IN_PLACE})")
    return found


def _probe_content() -> tuple[Any, Dataset]:
    """A root container with one text item, and an image of one study to cite as evidence."""
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Finding, value="probe", relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        ]
    )
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    image.SOPInstanceUID, image.StudyInstanceUID, image.SeriesInstanceUID = "2.25.1", "2.25.2", "2.25.5"
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        setattr(image, keyword, "")
    image.Modality = "DX"
    return root, image
