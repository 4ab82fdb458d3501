"""Prometheus metrics of the agent (served by the admin web at ``/metrics``).

Counters and the latency histogram live in one registry of their own and are bumped where the
events happen (one line each in ingest and the worker). Queue, outbox and registry sizes are read
from the database at scrape time, so they are right across restarts and processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from agent.domain import OUTBOX_BACKLOG

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter(
    "strnet_instances_received",
    "DICOM instances accepted by the storage SCP (after commit).",
    ["outcome"],
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "strnet_inference_seconds",
    "STR-Net inference time per image (a micro-batch's time shared out).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

class _Snapshot:
    """A one-shot collector over figures read from the database for this scrape."""

    def __init__(self, jobs: Mapping[str, int], outbox: Mapping[str, int], flagged: int,
                 swept: Mapping[str, int], atna_backlog: int | None = None) -> None:  # fmt: skip
        self.jobs, self.outbox, self.flagged, self.swept = jobs, outbox, flagged, swept
        self.atna_backlog = atna_backlog

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("strnet_jobs", "Jobs by state.", labels=["state"])
        for state, n in sorted(self.jobs.items()):
            g.add_metric([state], n)
        yield g
        o = GaugeMetricFamily("strnet_outbox_items", "Result objects in the outbox by state.", labels=["state"])
        for state, n in sorted(self.outbox.items()):
            o.add_metric([state], n)
        yield o
        yield GaugeMetricFamily(
            "strnet_outbox_backlog",
            "Result objects not yet delivered (pending, sending, sent awaiting storage commitment, retry).",
            value=sum(self.outbox.get(s, 0) for s in OUTBOX_BACKLOG),
        )
        yield GaugeMetricFamily("strnet_flagged_patients", "Patients in the flagged registry.", value=self.flagged)
        w = GaugeMetricFamily("strnet_sweep_studies", "Studies the archive sweep found, by state.", labels=["state"])
        for state, n in sorted(self.swept.items()):
            w.add_metric([state], n)
        yield w
        if self.atna_backlog is not None:
            yield GaugeMetricFamily("strnet_atna_backlog", "Audit events not yet delivered to the audit "
                                    "repository (IHE ATNA; only with [atna] enabled).", value=self.atna_backlog)


def render(jobs: Mapping[str, int], outbox: Mapping[str, int], flagged: int,
           swept: Mapping[str, int] | None = None, atna_backlog: int | None = None) -> bytes:  # fmt: skip
    """The Prometheus text exposition: process counters plus the database snapshot."""
    snap = CollectorRegistry(auto_describe=False)
    snap.register(_Snapshot(jobs, outbox, flagged, swept or {}, atna_backlog))
    return generate_latest(REGISTRY) + generate_latest(snap)
