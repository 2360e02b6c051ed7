"""The package's shape: imports form no cycle (function-level imports included), point down the layers, modules
stay small, and every package folder is installed. Read from the source (AST), so nothing is imported."""

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


# Bottom to top; a module may import its own layer and those below it.
LAYERS = {
    "core": ("sftflow", "sftflow.configs"),
    "stages": ("sftflow.tasks",),
    # Used by the flows: the fence on deployment runs, the registry, sweeps; review sits here for want of a caller
    # below the CLI. Servers and deployments take the flows from their caller rather than importing them.
    "services": ("sftflow.stack", "sftflow.sweeps", "sftflow.release", "sftflow.review"),
    "flows": ("sftflow.flows",),
    "cli": ("sftflow.cli",),
}
# configs/loader.py asks the benchmark registry which files a config needs (a leaf with no heavy imports).
ALLOWED_UP = {("sftflow.configs.loader", "sftflow.tasks.evaluation.catalog")}


def package_of(name: str) -> str:
    """The top-level package a module belongs to: `sftflow` for the core's own modules."""
    parts = name.split(".")
    sub = ".".join(parts[:2])
    return sub if any(sub in pkgs for pkgs in LAYERS.values()) else "sftflow"


def layer_of(name: str) -> int:
    return next(i for i, pkgs in enumerate(LAYERS.values()) if package_of(name) in pkgs)


def test_every_package_has_a_layer():
    subpackages = {".".join(n.split(".")[:2]) for n, p in modules().items() if p.name == "__init__.py" and n != "sftflow"}
    layered = {pkg for pkgs in LAYERS.values() for pkg in pkgs}
    assert subpackages <= layered, f"packages with no layer in LAYERS: {sorted(subpackages - layered)}"


def test_dependencies_point_down():
    """The core imports no stage, service, flow or command; stages import none of the last three; services import
    no flow or command; flows import no command."""
    upward = [f"{name} -> {dep}" for name, deps in graph().items() for dep in deps
              if layer_of(dep) > layer_of(name) and (name, dep) not in ALLOWED_UP]
    assert upward == []


def test_the_layering_sees_an_upward_import():
    assert layer_of("sftflow.tracking") < layer_of("sftflow.tasks.training.train") < layer_of("sftflow.release.registry")
    assert layer_of("sftflow.sweeps.space") < layer_of("sftflow.flows.sweep") < layer_of("sftflow.cli.app")
    assert layer_of("sftflow.configs.loader") == layer_of("sftflow.errors")


def test_packages_form_no_cycle():
    """Collapsed to their packages, imports still form no cycle (a service may not lean on a flow that leans on it)."""
    def node(name):  # the core and its configs are one unit
        return "core" if layer_of(name) == 0 else package_of(name)

    g: dict[str, set[str]] = {}
    for name, deps in graph().items():
        g.setdefault(node(name), set())
        g[node(name)] |= {node(d) for d in deps if node(d) != node(name) and (name, d) not in ALLOWED_UP}
    assert len(g) == 1 + sum(len(pkgs) for pkgs in list(LAYERS.values())[1:]), sorted(g)
    assert cycles(g) == []


def test_every_package_folder_is_installed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {name.removesuffix(".__init__") for name, path in modules().items() if path.name == "__init__.py"}
    assert folders <= listed, f"package folders missing from pyproject's packages: {sorted(folders - listed)}"


def test_every_flow_enters_through_the_one_guard():
    """Each flow makes a FlowEntry (the deployment's fence, the environment, the parent run); none reads the fence
    or configures the environment on its own."""
    flows, own = {}, []
    for name, path in modules().items():
        if not name.startswith("sftflow.flows."):
            continue
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            if any(isinstance(d, ast.Call) and getattr(d.func, "id", None) == "flow" for d in fn.decorator_list):
                flows[f"{name}.{fn.name}"] = any(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "FlowEntry"
                                                 for c in ast.walk(fn))
        own += [f"{name}: {n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and n.attr in ("configure", "deployment_fence", "violations", "config_file_violations")]
    assert len(flows) >= 6 and all(flows.values()), flows
    assert own == []
