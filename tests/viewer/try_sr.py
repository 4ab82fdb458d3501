"""Show DICOM files (source images and an SR) in OHIF v3 and print what it displayed, as JSON.

    .venv/bin/python tests/viewer/try_sr.py FILE.dcm [FILE.dcm | DIR ...] --out DIR

Starts a throwaway Orthanc with its DICOMweb plugin, uploads the files, serves OHIF (``make ohif``
unpacks it) on the same origin, opens the SR's study in Debian's Chromium, double-clicks the SR
(series description starting "STR-Net bone-loss screening", or ``--sr-prefix``) and prints
``SrView`` (tests/viewer/ohif.py); writes it to DIR/srview.json with screenshots DIR/sr*.png.
Exit status 0 when the SR opened without an error, 1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ohif import OHIF_DIST, SR_SERIES_PREFIX, OhifServer, launch_chromium, open_sr


def _files(args: list[str]) -> list[Path]:
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".dcm", "")))
        elif p.is_file():
            out.append(p)
        else:
            raise SystemExit(f"try_sr: no such file: {arg}")
    return out


def _study_uid(files: list[Path]) -> str:
    """The study of the SR among the files (the first SR), else of the first file."""
    from pydicom import dcmread

    studies: list[tuple[bool, str]] = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"])
        studies.append((str(ds.get("Modality", "")) == "SR", str(ds.StudyInstanceUID)))
    for is_sr, uid in studies:
        if is_sr:
            return uid
    return studies[0][1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="DICOM files, or folders of them")
    ap.add_argument("--out", required=True, type=Path, help="folder for srview.json and the screenshots")
    ap.add_argument("--study", help="StudyInstanceUID to open (default: the SR's)")
    ap.add_argument("--sr-prefix", default=SR_SERIES_PREFIX, help="series description of the SR to open")
    ap.add_argument("--no-hydrate", action="store_true", help="leave OHIF's 'track measurements?' prompt alone")
    ap.add_argument("--walk", action="store_true",
                    help="with --no-hydrate (or no prompt): step through the measurements with the viewport's arrows")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for each wait (default 60)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--chromium-arg", action="append", default=[], help="extra Chromium flag (repeatable)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=JSON",
                    help="extra window.config key for OHIF, e.g. useCPURendering=true (repeatable)")
    args = ap.parse_args(argv)

    import json

    from playwright.sync_api import sync_playwright

    from agent.demo.orthanc import LocalOrthanc

    files = _files(args.files)
    if not files:
        print("try_sr: no files", file=sys.stderr)
        return 2
    extra = {}
    for item in args.config:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value)
    study_uid = args.study or _study_uid(files)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with LocalOrthanc(aet="TRYSR", dicomweb=True) as orthanc:
        for f in files:
            orthanc.upload(f)
        t_up = time.monotonic() - t0
        with OhifServer(OHIF_DIST, orthanc.url, config_extra=extra) as ohif, sync_playwright() as pw:
            browser = launch_chromium(pw, extra_args=args.chromium_arg)
            try:
                context = browser.new_context(viewport={"width": args.width, "height": args.height})
                page = context.new_page()
                view = open_sr(page, ohif.url, study_uid, screenshot=args.out / "sr.png", sr_prefix=args.sr_prefix,
                               hydrate=not args.no_hydrate, walk=args.walk,
                               load_timeout_s=args.timeout, sr_timeout_s=args.timeout)
            finally:
                browser.close()
        view.timings["orthanc_upload_s"] = round(t_up, 2)
        view.timings["wall_s"] = round(time.monotonic() - t0, 2)
        if view.error:
            (args.out / "orthanc.log").write_text(orthanc.log_tail(200) + "\n", encoding="utf-8")
        text = view.to_json()  # before Orthanc stops (it takes ~3 s to)
        (args.out / "srview.json").write_text(text + "\n", encoding="utf-8")
        print(text, flush=True)
    return 0 if view.sr_opened and view.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
