"""Synthetic knee films for the benches (bench_sweep, bench_scale): model/synth renderings of the
real size, 1024 x 832 16-bit DX of the ``acme_dx`` profile (``scale`` 2: upscaled to 2048 x 1664).

A few films are rendered once (the generator takes about a second each); every film made from
them gets noise of its own, so no two images are alike.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

import numpy as np


class KneeFilms:
    """``bases`` renderings drawn from ``rng`` (the same seed gives the same films)."""

    def __init__(self, rng: np.random.Generator, bases: int = 4, scale: float = 1.0) -> None:
        from model.synth.acquisition import VENDOR_PROFILES
        from model.synth.generate import generate_one

        self.rng, self.scale = rng, scale
        self.profile = VENDOR_PROFILES["acme_dx"]
        self.top = (1 << self.profile.bits_stored) - 1
        self.bases = [generate_one(rng, laterality="LR"[i % 2], view="AP", profile="acme_dx") for i in range(bases)]
        if scale != 1.0:  # larger films: the renderings upscaled
            from skimage.transform import resize

            for img, _ in self.bases:
                shape = (round(img.stored.shape[0] * scale), round(img.stored.shape[1] * scale))
                img.stored = resize(img.stored, shape, order=1, preserve_range=True, anti_aliasing=False).astype(
                    np.uint16
                )

    def film(self, s: int, n: int, study_uid: str, when: datetime, prefix: str = "SWEEP") -> Any:
        """Image ``n`` of study ``s`` (patient ``<prefix><s>``), an uncompressed pydicom Dataset."""
        from pydicom.uid import generate_uid

        from model.synth.dicom_writer import ImageHeader, build_dataset

        rng, profile = self.rng, self.profile
        img, patient = self.bases[int(rng.integers(0, len(self.bases)))]
        noisy = np.minimum(img.stored + rng.integers(0, 24, img.stored.shape, dtype=np.uint16), self.top)
        hdr = ImageHeader(
            patient_id=f"{prefix}{s:05d}", patient_name=f"SYNTHETIC^{prefix}{s:05d}", birth_date=date(1950, 1, 1),
            sex=patient.sex, age=patient.age, height_m=patient.height_m, weight_kg=patient.weight_kg,
            study_uid=study_uid, series_uid=generate_uid(), sop_uid=generate_uid(), study_datetime=when,
            accession=f"{prefix[0]}{s:06d}", study_id="1", series_number=n + 1, instance_number=1,
            laterality="LR"[n % 2], view="AP", kvp=img.kvp, magnification=img.magnification, burned_in_text=False,
        )  # fmt: skip
        ds = build_dataset(noisy.astype(np.uint16), hdr, profile)
        if self.scale != 1.0:  # the same knee in finer pixels
            spacing = f"{profile.pixel_spacing_mm / self.scale:.4f}"
            ds.ImagerPixelSpacing = [spacing, spacing]
            ds.PixelSpacing = [f"{profile.pixel_spacing_mm / self.scale / img.magnification:.4f}"] * 2
        return ds
