"""Every import in agent/ and model/ points down the layers of docs/architecture.md, with no circle.

Imports inside functions and under ``TYPE_CHECKING`` count too: a deferred import that dodges a
circle at load time is still a circle in the design. Each check names the offending import by
file and line, and is shown to fail on a planted upward import and a planted circle.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "model")

# Top to bottom. A module may import from its own layer or any layer below it, never above.
# A module belongs to the layer of the longest prefix that names it (docs/architecture.md, Layers).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("agent.__main__", "agent.cli", "agent.demo")),
    ("composition root", ("agent.app",)),
    ("surfaces", ("agent.scheduler", "agent.web", "agent.ops", "agent.config_docs")),
    # the services: none imports another (the composition root passes what one must ask another)
    ("receiving", ("agent.ingest",)),
    ("screening and reporting", ("agent.queue.worker", "agent.queue.reporter")),
    ("sending", ("agent.pacs.sender",)),
    ("screening", ("agent.pipeline", "agent.pipeline.decode")),  # decode: a batch's films, in decode processes
    ("building and speaking DICOM", ("agent.reporting", "agent.pacs", "agent.ehr",  # + HL7 v2, FHIR
                                     "agent.pacs.commitment",  # storage commitment: SCU's request, reports
                                     "agent.pacs.dicomweb",  # STOW-RS to a dicomweb destination
                                     "agent.pacs.wado")),  # QIDO-RS/WADO-RS: the sweep's DICOMweb source
    ("records", ("agent.queue", "agent.db.registry", "agent.db.users", "agent.db.worklist", "agent.db.fls",
                 "agent.audit")),
    ("database", ("agent.db",)),
    ("support", ("agent.spool", "agent.helper", "agent.compat", "agent.config", "agent.logging", "agent.metrics",
                 "agent.failpoints")),
    ("base", ("agent.domain", "agent.errors", "agent.clock", "agent.dicom_values", "agent")),
    ("model: commands", ("model.cli",)),
    ("model: training and evaluation", ("model.train", "model.evaluate")),
    ("model: reports", ("model.report", "model.threshold")),
    ("model: prediction", ("model.predict",)),
    ("model: features, data, network", ("model.texture", "model.data", "model.checkpoint", "model.strnet",
                                        "model.losses", "model.synth")),
    ("model: parts", ("model.backbone", "model.heads", "model.routing", "model.calibration", "model.conformal",
                      "model.metrics", "model.fitting", "model.knee")),
    ("model: pixels and settings", ("model.io", "model.preprocess", "model.saliency", "model.config", "model")),
]
# the three service layers are ordered only so that none of them imports another
SERVICES = frozenset({"receiving", "screening and reporting", "sending"})
# agent/ reaches the model through the screening pipeline only (and the CLI and demo that mount
# or drive it): nothing else in the service process loads torch.
MODEL_IMPORTERS = ("agent.pipeline", "agent.cli", "agent.demo")


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if ".venv" not in path.parts:
                found[_module_name(root, path)] = path
    return found


def imports(root: Path) -> list[Import]:
    """Every import of a project module by a project module, wherever in the file it stands."""
    known = modules(root)
    out = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]  # `import a.b.c` of a module: its deepest known part
                if target and target != name:
                    out.append(Import(name, target, where))
    return out


def layer_of(module: str) -> int:
    best, index = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            covers = module == p or (p not in PACKAGES and module.startswith(p + "."))  # a package's own
            if covers and len(p) > len(best):  # __init__ does not place the modules under it
                best, index = p, i
    return index


def upward(edges: list[Import]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if dst < src:
            bad.append(f"{e} (layer '{LAYERS[src][0]}' may not import layer '{LAYERS[dst][0]}')")
        elif dst > src and LAYERS[src][0] in SERVICES and LAYERS[dst][0] in SERVICES:
            bad.append(f"{e} (service '{LAYERS[src][0]}' may not import service '{LAYERS[dst][0]}')")
        if e.source.startswith("model") and e.target.startswith("agent"):
            bad.append(f"{e} (model/ never imports agent/)")
        if e.target.startswith("model") and e.source.startswith("agent") and not any(
            e.source == p or e.source.startswith(p + ".") for p in MODEL_IMPORTERS
        ):
            bad.append(f"{e} (only {', '.join(MODEL_IMPORTERS)} import model/)")
    return bad


def cycles(edges: list[Import]) -> list[str]:
    """Each circle among modules, named by the imports that close it (Tarjan's strongly connected components)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [
        "circle: " + "; ".join(sorted({str(e) for e in edges if e.source in c and e.target in c})) for c in found
    ]


def unplaced(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}: {name} is in no layer" for name, path in modules(root).items()
            if layer_of(name) < 0]


def problems(root: Path) -> list[str]:
    edges = imports(root)
    return unplaced(root) + upward(edges) + cycles(edges)


def test_every_import_points_down_and_no_circle() -> None:
    found = problems(ROOT)
    assert not found, "\n".join(found)


@pytest.fixture
def copy_of_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "weights", "*.pt"))
    return tmp_path


def _plant(root: Path, module: str, line: str) -> str:
    path = root / (module.replace(".", "/") + ".py")
    text = path.read_text()
    path.write_text(text + f"\n\ndef _planted() -> None:\n    {line}\n")
    return f"{path.relative_to(root)}:{text.count(chr(10)) + 4}"


def test_a_planted_upward_import_is_named(copy_of_tree: Path) -> None:
    assert problems(copy_of_tree) == []
    where = _plant(copy_of_tree, "agent.db.engine", "from agent.app import Agent  # noqa: F401")
    found = problems(copy_of_tree)
    named = [p for p in found if where in p and "agent.db.engine imports agent.app" in p and "layer 'database'" in p]
    assert named, found


def test_a_planted_circle_in_one_layer_is_named(copy_of_tree: Path) -> None:
    # agent/queue/screening.py imports agent/queue/outbox.py (same layer): the way back closes a circle
    assert any(e.source == "agent.queue.screening" and e.target == "agent.queue.outbox" for e in imports(copy_of_tree))
    where = _plant(copy_of_tree, "agent.queue.outbox", "import agent.queue.screening  # noqa: F401")
    found = problems(copy_of_tree)
    assert any(p.startswith("circle:") and where in p for p in found), found


def test_model_never_imports_the_agent(copy_of_tree: Path) -> None:
    _plant(copy_of_tree, "model.io", "from agent.errors import InputRejected  # noqa: F401")
    assert any("model/ never imports agent/" in p for p in problems(copy_of_tree))


def test_a_new_module_needs_a_layer(copy_of_tree: Path) -> None:
    (copy_of_tree / "agent" / "wiring.py").write_text('"""A module nobody placed."""\n')
    assert any("agent.wiring is in no layer" in p for p in problems(copy_of_tree))


def test_a_service_importing_another_service_is_named(copy_of_tree: Path) -> None:
    where = _plant(copy_of_tree, "agent.ingest.scp", "from agent.queue.worker import Worker  # noqa: F401")
    found = problems(copy_of_tree)
    assert any(where in p and "service 'receiving' may not import service 'screening and reporting'" in p
               for p in found), found
