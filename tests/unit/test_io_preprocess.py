"""model.io.read_pixels and model.preprocess: the one decode + preprocessing path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from model.io import read_pixels
from model.preprocess import PreprocessSpec, crop_resize, preprocess, preprocess_file, resize_mask


def _ds(
    arr: np.ndarray,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    frames = arr.shape[0] if arr.ndim == 3 else 1
    ds.Rows, ds.Columns = arr.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(arr, dtype=dtype).tobytes()
    return ds


RAMP = np.tile(np.arange(16, dtype=np.int64), (6, 1))  # rows 6, cols 16, increasing to the right


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_scale_to_unit_range(bits: int) -> None:
    top = (1 << bits) - 1
    arr = (RAMP * top) // 15
    out = read_pixels(_ds(arr, bits))
    assert out.dtype == np.float32 and out.shape == (6, 16)
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)
    assert np.all(np.diff(out[0]) > 0)


def test_monochrome1_is_inverted() -> None:
    arr = (RAMP * 4095) // 15
    m2 = read_pixels(_ds(arr, 12, "MONOCHROME2"))
    m1 = read_pixels(_ds(arr, 12, "MONOCHROME1"))
    assert np.allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] > m1[0, -1]


def test_window_and_rescale_applied() -> None:
    arr = (RAMP * 4095) // 15
    out = read_pixels(_ds(arr, 12, window=(2048.0, 1024.0)))
    assert out[0, 0] == 0.0 and out[0, -1] == 1.0
    assert 0.0 < out[0, 8] < 1.0
    # Rescale then window in rescaled units: slope 2 doubles the values.
    out2 = read_pixels(_ds(arr, 12, window=(4096.0, 2048.0), rescale=(2.0, 0.0)))
    assert np.allclose(out, out2, atol=1e-3)


def test_multiframe_returns_first_frame() -> None:
    frames = np.stack([RAMP * 100, 1500 - RAMP * 100])
    out = read_pixels(_ds(frames, 12))
    assert out.shape == (6, 16)
    assert out[0, 0] < out[0, -1]


def test_size_cap_raises_before_decoding(tmp_path: Path) -> None:
    ds = _ds(RAMP, 12)
    ds.Rows, ds.Columns = 5000, 5000
    ds.PixelData = b"\x00\x01"  # undecodable: the size check must come first
    with pytest.raises(ValueError, match="too large"):
        read_pixels(ds, max_pixels=1000)
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError, match="too large"):
        read_pixels(path, max_pixels=1000)
    with pytest.raises(ValueError, match="decoded"):
        read_pixels(path)


def test_bad_inputs_raise_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not an image at all" * 20)
    with pytest.raises(ValueError):
        read_pixels(junk)
    rgb = _ds(np.zeros((4, 4)), 8)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation = 3, "RGB"
    with pytest.raises(ValueError, match="greyscale"):
        read_pixels(rgb)
    no_pixels = _ds(np.zeros((4, 4)), 8)
    del no_pixels.PixelData
    with pytest.raises(ValueError):
        read_pixels(no_pixels)
    with pytest.raises(ValueError):
        read_pixels(tmp_path / "missing.dcm")


def test_png_8_and_16_bit(tmp_path: Path) -> None:
    a8 = (RAMP * 17).astype(np.uint8)
    Image.fromarray(a8).save(tmp_path / "a8.png")
    out8 = read_pixels(tmp_path / "a8.png")
    assert out8.dtype == np.float32 and out8.max() == pytest.approx(1.0)
    a16 = (RAMP * 4369).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "a16.png")
    out16 = read_pixels(tmp_path / "a16.png")
    assert np.allclose(out8, out16, atol=1e-3)
    with pytest.raises(ValueError, match="too large"):
        read_pixels(tmp_path / "a16.png", max_pixels=10)


@pytest.mark.parametrize("shape", [(7, 5), (1, 1), (2, 3), (1001, 333), (257, 256), (1024, 832)])
@pytest.mark.parametrize("crop", ["center", "full"])
def test_preprocess_shapes(shape: tuple[int, int], crop: str) -> None:
    spec = PreprocessSpec(crop=crop)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    y = preprocess(x, spec)
    assert y.shape == (1, 256, 256) and y.dtype == np.float32
    assert np.isfinite(y).all()


def test_preprocess_deterministic_and_sized() -> None:
    x = np.random.default_rng(1).random((900, 700)).astype(np.float32)
    spec = PreprocessSpec(input_size=128)
    assert np.array_equal(preprocess(x, spec), preprocess(x.copy(), spec))
    assert preprocess(x, spec).shape == (1, 128, 128)


def test_preprocess_constant_and_nan() -> None:
    y = preprocess(np.full((50, 60), 0.3, np.float32), PreprocessSpec())
    assert np.isfinite(y).all() and np.ptp(y) == 0.0
    bad = np.zeros((10, 10), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError):
        preprocess(bad, PreprocessSpec())
    with pytest.raises(ValueError):
        preprocess(np.zeros((2, 3, 4), np.float32), PreprocessSpec())


def test_area_resampling_preserves_mean() -> None:
    x = np.random.default_rng(2).random((700, 700)).astype(np.float32)
    y = crop_resize(x, PreprocessSpec(crop="full", input_size=256))
    assert y.mean() == pytest.approx(x.mean(), abs=1e-4)


def test_spec_roundtrip_and_validation() -> None:
    spec = PreprocessSpec(input_size=320, clahe=True)
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({"input_size": 256, "bogus": 1})
    with pytest.raises(ValueError):
        PreprocessSpec(crop="weird")
    with pytest.raises(ValueError):
        PreprocessSpec(crop_fraction=0.0)


def test_clahe_option_runs() -> None:
    x = np.random.default_rng(3).random((300, 300)).astype(np.float32)
    y = preprocess(x, PreprocessSpec(input_size=64, clahe=True))
    assert y.shape == (1, 64, 64) and np.isfinite(y).all()


def test_resize_mask_fraction() -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[:, :50] = 2
    frac = resize_mask(mask, PreprocessSpec(crop="full", input_size=10), label=2)
    assert frac.shape == (10, 10)
    assert np.allclose(frac[:, :5], 1.0) and np.allclose(frac[:, 5:], 0.0)


def test_preprocess_file_on_generated_dicom(tmp_path: Path) -> None:
    from model.synth.generate import generate

    manifest = generate(tmp_path, 2, seed=1, compressed_fraction=1.0)
    rel = manifest.read_text().splitlines()[1].split(",")[0]
    y = preprocess_file(tmp_path / rel, PreprocessSpec())
    assert y.shape == (1, 256, 256) and np.isfinite(y).all()
    with pytest.raises(ValueError, match="too large"):
        preprocess_file(tmp_path / rel, PreprocessSpec(), max_pixels=1000)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi", "attrs", "photometric"),
    [
        ("uint16", 0, 4095, {"WindowCenter": 2000, "WindowWidth": 3000}, "MONOCHROME2"),
        ("uint16", 300, 16383, {"WindowCenter": 9000, "WindowWidth": 4000, "VOILUTFunction": "SIGMOID"}, "MONOCHROME1"),
        ("uint8", 10, 200, {"RescaleSlope": 2.0, "RescaleIntercept": -7.0}, "MONOCHROME2"),
        ("int16", -1024, 3071, {"RescaleSlope": 1.0, "RescaleIntercept": -1024.0}, "MONOCHROME1"),
        ("int16", -500, 500, {"WindowCenter": 0, "WindowWidth": 0.5}, "MONOCHROME2"),  # unusable window: min-max
    ],
)
def test_lookup_decode_is_bit_identical_to_per_pixel(dtype, lo, hi, attrs, photometric) -> None:
    # The decoder maps 8/16-bit images through a table of stored values; it must give exactly the
    # per-pixel float64 result, including the min-max fallback over values that occur (a gap in
    # the middle of the range must not move the scaling).
    from model import io

    rng = np.random.default_rng(3)
    arr = rng.integers(lo, hi + 1, size=(37, 29)).astype(dtype)
    arr[arr == (lo + hi) // 2] = lo  # a value inside the range that does not occur
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    got = io._via_lookup(arr, ds, photometric)
    want = io._finish(io._transform(arr, ds, photometric))
    assert got.dtype == np.float32 and got.shape == arr.shape
    np.testing.assert_array_equal(got, want)
