"""Render docs/configuration.md from the settings model (a test keeps the file current)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from agent.config import FhirSection, Hl7Section, PacsSection, PeerSection, Settings

HEADER = """# Configuration

Generated from `agent/config.py` by `strnet config docs --out docs/configuration.md`; do not
edit by hand (a test fails when this file is out of date).

Settings are read from a TOML file (`--config FILE`, default `./agent.toml` when present), then
overridden by environment variables `STRNET_<SECTION>__<KEY>` (for example
`STRNET_SCP__PORT=11113`), then by command-line options. A bad value stops start-up with exit
code 2 and a message naming the setting. `deploy/agent.example.toml` shows every setting.

"""


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    if value is None:
        return "unset"
    return "`" + json.dumps(value, default=str) + "`"


def _section(title: str, model: type[BaseModel], lines: list[str]) -> None:
    lines.append(f"## `{title}`\n")
    lines.append("| key | default | meaning |")
    lines.append("| --- | --- | --- |")
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((f"{title}.{name}", ann))
            continue
        if name == "peers":
            nested.append((f"[{title}.peers]]", PeerSection))
        lines.append(f"| `{name}` | {_default(info)} | {info.description or ''} |")
    lines.append("")
    for sub_title, sub in nested:
        _section(sub_title.strip("[]") if not sub_title.startswith("[") else f"[{sub_title}", sub, lines)


_LISTS: dict[str, tuple[str, type[BaseModel]]] = {
    "hl7": ("one table per HL7 v2 destination: ORU^R01 over MLLP", Hl7Section),
    "fhir": ("one table per FHIR R4 destination", FhirSection),
}


def render() -> str:
    lines = [HEADER]
    for name, info in Settings.model_fields.items():
        ann = info.annotation
        if name == "pacs":
            lines.append("## `[[pacs]]` (one table per destination of results)\n")
            lines.append(f"Default: {_default(info)}\n")
            _fields(PacsSection, lines)
            continue
        if name in _LISTS:
            title, model = _LISTS[name]
            lines.append(f"## `[[{name}]]` ({title})\n")
            lines.append("Default: none.\n")
            _fields(model, lines)
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _section(name, ann, lines)
    return "\n".join(lines).rstrip() + "\n"


def _fields(model: type[BaseModel], lines: list[str]) -> None:
    lines.append("| key | default | meaning |")
    lines.append("| --- | --- | --- |")
    for name, info in model.model_fields.items():
        lines.append(f"| `{name}` | {_default(info)} | {info.description or ''} |")
    lines.append("")
