"""The tree shows the layers (docs/design.md, "Layers"): imports only go down, never in a cycle.

Read from the source with ``ast``, every import counts: at module level, inside functions and
under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

import gradscope

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (cli/ and reports/ are mapped into gradscope, see pyproject)
SOURCES = {"gradscope": "gradscope", "cli": "gradscope.cli", "reports": "gradscope.reports"}

#: What each layer may import from gradscope, besides itself (docs/design.md, "Layers").
ALLOWED = {
    "gradscope.version": set(),
    "gradscope.store": {"gradscope.version"},
    "gradscope.recording": {"gradscope.store", "gradscope.version"},
    "gradscope.analysis": {"gradscope.store", "gradscope.version"},
    "gradscope.lab": {"gradscope.analyses", "gradscope.recording", "gradscope.store", "gradscope.version"},
    "gradscope.integrations": {"gradscope.recording", "gradscope.store", "gradscope.version"},
    "gradscope.analyses": {"gradscope.recording", "gradscope.store", "gradscope.version"},
    "gradscope.testing": {"gradscope.recording", "gradscope.store", "gradscope.lab", "gradscope.analysis",
                          "gradscope.version"},
    "gradscope.reports": {"gradscope", "gradscope.analysis", "gradscope.store", "gradscope.version"},
    "gradscope.cli": {"gradscope", "gradscope.analyses", "gradscope.analysis", "gradscope.store", "gradscope.lab",
                      "gradscope.recording", "gradscope.reports", "gradscope.integrations", "gradscope.version"},
    "gradscope": {"gradscope.analyses", "gradscope.analysis", "gradscope.lab", "gradscope.recording",
                  "gradscope.store", "gradscope.version"},
}
#: Upward imports made only inside a function, named here with why: a run read in Jupyter
#: renders itself with the report's figures, loaded when a notebook displays it.
DEFERRED = {("gradscope.store.reader", "gradscope.reports.notebook")}
#: Only the outer layers may import these (the core stays light inside a training job).
PRESENTATION = ("click", "seaborn", "matplotlib", "jinja2")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The gradscope modules (or packages) that ``name`` imports, resolved to module names."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # "from a import b" needs a's namespace, or only the module a.b where b is one
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        found.update(t for t in targets if t == "gradscope" or t.startswith("gradscope."))
    found.discard(name)  # a package importing its own submodules names itself first
    return {t for t in found if (name, t) not in DEFERRED}


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} is in no layer of docs/design.md; add it to ALLOWED here and there")


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_is_in_a_layer_and_imports_only_below_it():
    wrong = []
    for name, targets in GRAPH.items():
        layer = _layer(name)
        for target in targets:
            target_layer = _layer(target)
            if target_layer != layer and target_layer not in ALLOWED[layer]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first cycle a depth-first search closes, as a path that ends where it starts."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_cycle_and_a_layer_violation():
    """Guards the two tests above against a graph that is always empty."""
    assert "gradscope.recording.sink" in GRAPH["gradscope.recording.probes"]
    assert "gradscope.store.schema" in GRAPH["gradscope.recording.buffer"]
    assert _layer("gradscope.store.schema") == "gradscope.store"
    assert "gradscope.recording" not in ALLOWED["gradscope.store"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(("gradscope.cli", "gradscope.reports"))))
def test_core_never_imports_presentation_libraries(name):
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for imported in names:
            assert imported.split(".")[0] not in PRESENTATION, f"{name} imports {imported}"


def test_no_module_over_the_line_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_diagnose_is_the_function_and_findings_the_module():
    assert callable(gradscope.diagnose) and not isinstance(gradscope.diagnose, types.ModuleType)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gradscope.diagnose")
    findings = importlib.import_module("gradscope.analysis.findings")
    assert findings.diagnose is gradscope.diagnose


#: Frameworks only their adapter in ``gradscope.integrations`` may import.
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("gradscope.integrations")))
def test_only_the_adapters_import_a_framework(name):
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for imported in names:
            assert imported.split(".")[0] not in FRAMEWORKS, f"{name} imports {imported}"
