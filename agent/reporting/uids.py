"""Deterministic UIDs for the objects the agent writes back to PACS; see docs/sr-content.md).

A resend after a crash must carry the same SOP Instance UIDs so that PACS deduplicates instead of
storing a second copy, so every result UID is derived, never generated:

    "2.25." + int(uuid5(NAMESPACE, f"{input_uid}|{model}|{kind}"))   (model: model_key, version#hash)

The 2.25 root (PS3.5 B.2) turns a UUID into an OID without a registered root of our own; a
128-bit integer has at most 39 digits, so the UID is at most 44 characters.
"""

from __future__ import annotations

import re
import uuid

from agent.domain import AlgorithmInfo

# Fixed for the life of the project: changing it changes every result UID ever written.
NAMESPACE = uuid.UUID("6c0e4f3a-8d5b-4b61-9a7e-2f1c9d3e5a70")

# Object kinds and what their input UID is.
KINDS: dict[str, str] = {
    "sr": "study UID + '#' + report revision",
    "sr-series": "study UID",
    "sc": "source SOP Instance UID",
    "sc-series": "study UID",
    "group": "source SOP Instance UID (tracking UID of the image's measurement group)",
    "device": "algorithm name + '#' + checkpoint SHA-256 (Device UID of the model: new weights, new device)",
    "assessment": "SR SOP Instance UID (a radiologist's verdict sent onward: the key of its outbox rows)",
}

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def result_uid(input_uid: str, model_version: str, kind: str) -> str:
    """The UID of result object ``kind`` derived from ``input_uid`` and ``model_version``.

    Raises ValueError for an unknown kind or an empty input, so a typo cannot silently make a
    UID that collides with nothing and deduplicates nothing.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, not {kind!r}")
    if not input_uid:
        raise ValueError("input_uid must not be empty")
    if not model_version:
        raise ValueError("model_version must not be empty")
    name = f"{input_uid}|{model_version}|{kind}"
    uid = f"2.25.{uuid.uuid5(NAMESPACE, name).int}"
    assert len(uid) <= 64 and _UID_RE.match(uid), uid  # holds by construction
    return uid


def model_key(algorithm: AlgorithmInfo) -> str:
    """What a result UID says about the model: its version AND its checkpoint's hash, so new
    weights under an unchanged version string make new objects instead of colliding with the
    old ones in PACS."""
    return f"{algorithm.version}#{algorithm.checkpoint_sha256}"


def sr_input(study_uid: str, revision: int) -> str:
    """The input of the ``"sr"`` kind: one SR per (study, revision)."""
    if revision < 1:
        raise ValueError(f"revision must be >= 1, not {revision}")
    return f"{study_uid}#{revision}"
