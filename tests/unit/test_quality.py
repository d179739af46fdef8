"""The codebase keeps its shape: import layering, lint and format, a thin CLI, no private cross-package imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
PACKAGES = ("pipelines", "cluster", "tuning", "serving", "raypeft")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "cmd",
    [("lint-imports",), ("ruff", "check", "."), ("ruff", "format", "--check", ".")],
    ids=["lint-imports", "ruff-check", "ruff-format"],
)
def test_tool_passes(cmd):
    r = _run(str(BIN / cmd[0]), *cmd[1:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_cli_is_a_thin_face():
    assert len((REPO / "raypeft/cli.py").read_text().splitlines()) <= 200


def test_no_package_imports_another_packages_private_names():
    offenders = []
    pattern = re.compile(r"^\s*from (\w+)(\.[\w.]+)? import ([^\n]+)", re.M)
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            for m in pattern.finditer(f.read_text()):
                other, names = m.group(1), m.group(3)
                if other in PACKAGES and other != pkg and re.search(r"(^|[\s,(])_\w", names):
                    offenders.append(f"{f.relative_to(REPO)}: {m.group(0).strip()}")
    assert not offenders, offenders


def _import_circles(graph) -> list[list[str]]:
    """Every set of the product's modules that import one another in a circle (strongly connected components
    of more than one module), lazy imports inside functions included, imports only for type checking not."""
    edges = {
        m: {i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] in PACKAGES} for m in graph.modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return circles


def test_no_module_of_the_product_imports_itself_through_others():
    import grimp

    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    assert not _import_circles(graph), _import_circles(graph)


def test_the_circle_finder_finds_a_circle():
    class Graph:  # a → b → c → a, and d on its own
        modules = {"pipelines.a", "pipelines.b", "pipelines.c", "pipelines.d"}
        imports = {"pipelines.a": {"pipelines.b"}, "pipelines.b": {"pipelines.c"}, "pipelines.c": {"pipelines.a"}}

        def find_modules_directly_imported_by(self, m):
            return self.imports.get(m, set())

    assert _import_circles(Graph()) == [["pipelines.a", "pipelines.b", "pipelines.c"]]


def test_no_product_function_is_longer_than_80_lines():
    import ast

    long = []
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if (n := node.end_lineno - node.lineno + 1) > 80:
                        long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_the_specs_path_through_the_worker_comes_back_to_a_file_at_most_six_times():
    """``tests/spec_path.py``: from ``train_worker``, the calls handed the spec or anything computed from it
    visit the worker's phases in order (docs/development.md, "How often the spec's path comes back")."""
    from tests import spec_path

    stops = spec_path.follow("pipelines.train.worker", "train_worker", {"config"}, spec_methods_too=False)
    files = list(dict.fromkeys(f for f, _ in stops))
    assert spec_path.returns(stops) <= 6, "\n".join(f"{f}: {fn}" for f, fn in stops)
    order = [f.split("/")[2 if f.startswith("pipelines/train/") else 1] for f in files]
    assert order.index("setup.py") < order.index("model") < order.index("inputs.py") < order.index("data")
    assert order.index("data") < order.index("checkpoint.py") < order.index("loop.py"), order


def test_the_path_counter_counts_a_return():
    from tests import spec_path

    assert spec_path.returns([("a", "f"), ("b", "g"), ("a", "h"), ("a", "i"), ("c", "j"), ("b", "k")]) == 2
