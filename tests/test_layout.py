"""Issue 15: the package's shape. The layers contract itself is import-linter's (pyproject.toml, run by
.ci/run); these check what it does not: no import cycle anywhere (imports inside functions included), no
file over 600 lines, the model file free of Triton and profiling, and the layers written down in
docs/ARCHITECTURE.md as pyproject.toml states them."""

from __future__ import annotations

import re
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fasttune"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(m: str) -> None:
        index[m] = low[m] = counter[0]
        counter[0] += 1
        stack.append(m)
        on_stack.add(m)
        for d in sorted(graph.find_modules_directly_imported_by(m)):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = []
            while True:
                x = stack.pop()
                on_stack.discard(x)
                component.append(x)
                if x == m:
                    break
            if len(component) > 1 or m in graph.find_modules_directly_imported_by(m):
                found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("fasttune")  # as import-linter builds it: imports inside functions too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_file_is_over_600_lines():
    files = [p for d in ("src", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_the_model_is_the_math_alone():
    text = (SRC / "models" / "model.py").read_text().lower()
    for word in ("triton", "profil", "region", "fasttune.ops"):
        assert word not in text, f"models/model.py mentions {word!r}"


def test_the_architecture_doc_lists_the_layers_of_the_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    listed = re.search(r"```layers\n(.*?)```", doc, re.S)
    assert listed, "docs/ARCHITECTURE.md has no ```layers block"
    lines = [line.split("#")[0].strip() for line in listed.group(1).splitlines()]
    assert [line for line in lines if line] == contract["layers"]
    for layer in contract["layers"]:
        for name in layer.split("|"):
            module = name.strip().removeprefix("fasttune.").replace(".", "/")
            assert (SRC / module).is_dir() or (SRC / f"{module}.py").is_file(), f"{name} does not exist"
