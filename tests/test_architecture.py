"""The package's shape: imports form no cycle (function-level imports included), modules stay small, and every
package folder is installed. Read from the source (AST), so nothing is imported."""

import ast
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS = {name: REPO / folder for name, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}
MAX_LINES = 300


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module the package installs."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's own modules this file imports, anywhere in it (a function-level import ties modules too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    g = graph()
    assert len(g) > 40 and g["sftflow.flows.sft_pipeline"], "the graph should see the whole package"
    assert cycles(g) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_longer_than_the_layout_allows():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_dependencies_point_down():
    """The core imports no stage, flow or operation; stages import no flow or operation."""
    below = {"sftflow.tasks": ("sftflow.flows", "sftflow.ops"),
             "sftflow": ("sftflow.tasks", "sftflow.flows", "sftflow.ops")}
    upward = []
    for name, deps in graph().items():
        layer = "sftflow.tasks" if name.startswith("sftflow.tasks") else \
            "sftflow" if not name.startswith(("sftflow.flows", "sftflow.ops", "sftflow.configs")) else None
        upward += [f"{name} -> {d}" for d in deps if layer and d.startswith(below[layer])]
    assert upward == []


def test_every_package_folder_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {name.removesuffix(".__init__") for name, path in modules().items() if path.name == "__init__.py"}
    assert folders <= listed, f"package folders missing from pyproject's packages: {sorted(folders - listed)}"
