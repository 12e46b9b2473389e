"""Imports run one way: the import graph of nanogpt_jax/ has no circles (docs/README.md, "Layout").

The graph is read with the standard library's `ast` from every file of the package, so a new circle fails
here before it bites at import time. It counts every `import` and `from ... import`: at the top, inside
functions (lazy imports too), relative ones and those of packages' `__init__.py`. `from P import N` is an
edge to P.N when N is a module of the package, else to P; Python runs a package's `__init__` before any of
its modules, so that is not counted as an edge of its own.

The one circle allowed: model -> generate (GPT.generate and GPT.stream, the promised API, import the
sampler when called) and generate -> model (the sampler runs a GPT). nanogpt_jax/model.py's docstring says
why no other shape is better.
"""

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "nanogpt_jax"
ALLOWED = {frozenset({"nanogpt_jax.model", "nanogpt_jax.generate"})}


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """{"nanogpt_jax.bench.train": path, ...}; a package's __init__.py is the package's own name."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, by the rule in this file's docstring."""
    names = module_names(package)
    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, path in names.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]  # for relative imports
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in names:
                        graph[module].add(sub)
                    elif target in names:
                        graph[module].add(target)
    for module in graph:
        graph[module].discard(module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles_but_the_documented_one():
    graph = import_graph()
    bad = [c for c in circles(graph) if frozenset(c) not in ALLOWED]
    assert not bad, "import circles: " + "; ".join(
        ", ".join(f"{m} -> {sorted(graph[m] & c)}" for m in sorted(c)) for c in bad)


def test_the_graph_sees_lazy_relative_and_package_imports(tmp_path):
    """The reader itself: a circle through a function-level import, a relative import and an __init__."""
    pkg = tmp_path / "nanogpt_jax"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from nanogpt_jax import b\n",  # lazy, a module by name
        "b.py": "from .sub import c\n",  # relative
        "sub/__init__.py": "from nanogpt_jax.sub.c import thing\n",
        "sub/c.py": "import nanogpt_jax.a\nthing = 1\n",
        "d.py": "from nanogpt_jax.sub import thing\n",  # a name of a package: its __init__
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"nanogpt_jax": set(), "nanogpt_jax.a": {"nanogpt_jax.b"}, "nanogpt_jax.b": {"nanogpt_jax.sub.c"},
                     "nanogpt_jax.sub": {"nanogpt_jax.sub.c"}, "nanogpt_jax.sub.c": {"nanogpt_jax.a"},
                     "nanogpt_jax.d": {"nanogpt_jax.sub"}}
    assert circles(graph) == [{"nanogpt_jax.a", "nanogpt_jax.b", "nanogpt_jax.sub.c"}]


def layout_order(readme: Path = ROOT / "docs" / "README.md") -> list[str]:
    """The modules of docs/README.md's layout block, in the order it lists them (bench/ as one)."""
    text = readme.read_text()
    block = text[text.index("nanogpt_jax/    the library"):text.index("tests/          pytest")]
    order: list[str] = []
    for line in block.splitlines()[1:]:
        for module, package in re.findall(r"\b([a-z_]+)\.py\b|\b(bench)/", line):
            name = f"nanogpt_jax.{module or package}"
            if name not in order:
                order.append(name)
    return order


def test_the_layout_lists_every_module_from_the_ground_floor_up():
    """docs/README.md's layout lists each module below every module it imports (bench/ as one floor)."""
    graph = import_graph()
    floor = {name: i for i, name in enumerate(layout_order())}

    def floor_of(module: str) -> int:
        return floor["nanogpt_jax.bench" if module.startswith("nanogpt_jax.bench.") else module]

    modules = [m for m in graph if m != "nanogpt_jax"]
    assert [m for m in modules if m not in floor and not m.startswith("nanogpt_jax.bench.")] == []
    upward = [(m, d) for m in modules for d in graph[m] - {"nanogpt_jax"}
              if floor_of(d) > floor_of(m) and frozenset({m, d}) not in ALLOWED]
    assert upward == [], "imports of modules listed later in docs/README.md's layout"
