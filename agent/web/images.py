"""Server-rendered images: the overlay (from the stored secondary-capture object) and the
probability / T-score trend plot (matplotlib, no JavaScript)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from PIL import Image

from agent.db.fls import EvidenceRow
from agent.db.worklist import TrendPoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_plot_lock = threading.Lock()

# The patient page's overlay: a JPEG small enough to load fast (an overlay PNG is 0.5 to 0.8 MB),
# sharp at the page's 300 px on a 2x screen; the full-size PNG stays one click away.
OVERLAY_JPEG_MAX_SIDE = 768
OVERLAY_JPEG_QUALITY = 85


class BytesCache:
    """A small thread-safe LRU of encoded images, bounded by total bytes and by entries."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[object, ...], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes or len(self._items) > self.max_entries:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes


# ~100 KB per overlay JPEG: a few hundred recent overlays, never more than 32 MiB of memory
overlay_cache = BytesCache(max_bytes=32 * 2**20, max_entries=512)


def _sc_image(path: Path) -> Image.Image:
    """The stored SC object's pixels as an 8-bit image (RGB as is; grey scaled to 8 bits)."""
    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            a = 255 - a
        img = Image.fromarray(a.astype(np.uint8), "L")
    return img


def sc_to_png(path: Path, max_side: int | None = None) -> bytes:
    """The stored SC object's pixels as a PNG, at full size unless ``max_side`` is given."""
    img = _sc_image(path)
    if max_side is not None:
        img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def overlay_jpeg(path: Path, max_side: int = OVERLAY_JPEG_MAX_SIDE, quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    """The stored overlay as a JPEG whose long side is at most ``max_side``; built once per file
    (its path, size and modification time: a rewritten file is built again) and then served from
    ``overlay_cache``."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, max_side, quality)
    cached = overlay_cache.get(key)
    if cached is not None:
        return cached
    img = _sc_image(path)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=True)
    data = out.getvalue()
    overlay_cache.put(key, data)
    return data


def trend_png(points: list[TrendPoint], threshold: float | None = None) -> bytes:
    """Probability (left axis) and estimated T-score (right axis) per study, oldest first."""
    with _plot_lock:
        fig = trend_figure(points, threshold)
        out = io.BytesIO()
        fig.savefig(out, format="png", metadata={"Software": None})
        return out.getvalue()


def trend_figure(points: list[TrendPoint], threshold: float | None = None) -> Figure:
    """The trend plot as a figure, its legend in a row below the plot, where it covers no point.
    Call under ``_plot_lock`` (matplotlib's text layout is not thread-safe)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.1), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(points)))
    labels = [p.label for p in points]
    ax.plot(x, [p.probability for p in points], "o-", color="#b03a2e", label="probability of bone loss")
    if threshold is not None:
        ax.axhline(threshold, color="#b03a2e", linestyle=":", linewidth=1, label="flag threshold")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax2 = ax.twinx()
    ax2.plot(x, [p.t_score for p in points], "s--", color="#1f4e79", label="estimated T-score")
    thresholds = ((-1.0, "osteopenia", "#888888", "#666666"), (-2.5, "osteoporosis", "#444444", "#444444"))
    for t, label, line, text in thresholds:
        ax2.axhline(t, color=line, linewidth=0.8)
        ax2.text(1.0, t, f" {t:.1f} {label}", transform=ax2.get_yaxis_transform(), fontsize=6, va="bottom",
                 ha="right", color=text)  # fmt: skip
    ts = [p.t_score for p in points] or [0.0]
    ax2.set_ylim(min(-4.0, min(ts) - 0.5), max(2.0, max(ts) + 0.5))
    ax2.set_ylabel("T-score")
    ax.set_xticks(x, labels, fontsize=8)
    if len(x) == 1:
        ax.set_xlim(-1, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    fig.legend(
        lines[0] + lines2[0],
        lines[1] + lines2[1],
        fontsize=7,
        loc="outside lower center",
        ncols=3,
        frameon=False,
    )
    return fig


def evidence_png(months: list[EvidenceRow]) -> bytes:
    """Per month of first flag: patients flagged and those with a DXA result (bars, left axis), and
    the observed PPV at T <= -1.0 and T <= -2.5 (lines, right axis, months with a DXA only)."""
    with _plot_lock:
        fig = evidence_figure(months)
        out = io.BytesIO()
        fig.savefig(out, format="png", metadata={"Software": None})
        return out.getvalue()


def evidence_figure(months: list[EvidenceRow]) -> Figure:
    """The evidence chart as a figure, its legend below the plot. Call under ``_plot_lock``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.1), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(months))
    ax.bar(x - 0.2, [m.flagged for m in months], 0.4, color="#9db4cc", label="flagged")
    ax.bar(x + 0.2, [m.dxa_n for m in months], 0.4, color="#1f4e79", label="with DXA result")
    ax.set_ylabel("patients")
    ax.set_ylim(0, max([1, *(m.flagged for m in months)]) * 1.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax.twinx()
    with_dxa = [i for i, m in enumerate(months) if m.dxa_n]
    ax2.plot(with_dxa, [months[i].low_n / months[i].dxa_n for i in with_dxa], "o-", color="#b03a2e",
             label="PPV, T <= -1.0")  # fmt: skip
    ax2.plot(with_dxa, [months[i].osteoporosis_n / months[i].dxa_n for i in with_dxa], "s--", color="#6c3483",
             label="PPV, T <= -2.5")  # fmt: skip
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("observed PPV")
    ax.set_xticks(x, [m.month for m in months], fontsize=8)
    if len(months) <= 1:
        ax.set_xlim(-1, 1)
    lines, lines2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="outside lower center", ncols=4,
               frameon=False)  # fmt: skip
    return fig
