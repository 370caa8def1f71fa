"""The shape of the code: small files, no import cycle, the library never imports the study package.

The import graph is built from the source text (``ast``), not by importing anything:

* every ``import`` / ``from ... import`` anywhere in a file counts, function-level (lazy) imports
  included; imports under ``if TYPE_CHECKING:`` do not (they never run);
* relative imports are resolved; ``from pkg import name`` points at ``pkg/name.py`` when that is a
  submodule, else at the module ``pkg/__init__.py`` took ``name`` from;
* a package ``__init__.py`` is transparent: its module-level imports from its own package are
  re-exports and stand for the module that defines the name, so ``pkg/__init__`` importing ``pkg/a`` and
  ``pkg/a`` importing a name re-exported by ``pkg/__init__`` is not a cycle. Its other imports (lazy ones,
  other packages) are its own code's dependencies: an import of a name the ``__init__`` defines itself
  leads to them. ``import pkg`` (or ``from pkg import *``) stands for the whole package.

A cycle is then a chain of files, each importing the next, back to the first — printed as such, with the
line of each import.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "prunekit"
MAX_LINES = 700
STUDIES = f"{PACKAGE}.studies"
MAY_IMPORT_STUDIES = (STUDIES, f"{PACKAGE}.cli")  # the study package itself and the command-line shell
#: the registry behind ``prunekit reproduce`` names the study modules for its lazy loader (no import statement)
MAY_NAME_STUDIES = (f"{PACKAGE}.reproduce",)


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    name: str | None  # the imported name of a ``from`` import; None: ``import module`` or ``*``
    lazy: bool  # inside a function body
    line: int


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@dataclass
class ImportGraph:
    """Modules of one package tree and the file → file import edges between them."""

    root: Path
    package: str
    files: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)
    imports: dict[str, list[Import]] = field(default_factory=dict)
    strings: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for path in sorted((self.root / self.package).rglob("*.py")):
            parts = list(path.relative_to(self.root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
                self.packages.add(".".join(parts))
            self.files[".".join(parts)] = path
        for mod in self.files:
            self._parse(mod)

    # -- reading one file
    def _absolute(self, mod: str, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        base = mod.split(".") if mod in self.packages else mod.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def _parse(self, mod: str) -> None:
        tree = ast.parse(self.files[mod].read_text(encoding="utf-8"), filename=str(self.files[mod]))
        out: list[Import] = []
        strings: list[tuple[str, int]] = []

        def walk(node: ast.AST, lazy: bool) -> None:
            if isinstance(node, ast.If) and _type_checking(node.test):
                for child in node.orelse:
                    walk(child, lazy)
                return
            if isinstance(node, ast.Import):
                out.extend(Import(a.name, None, lazy, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(mod, node.module, node.level)
                out.extend(Import(base, None if a.name == "*" else a.name, lazy, node.lineno) for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append((node.value, node.lineno))
            lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                walk(child, lazy)

        walk(tree, False)
        self.imports[mod] = [i for i in out if i.module == self.package or i.module.startswith(self.package + ".")]
        self.strings[mod] = strings

    # -- resolving an import to the files it depends on
    def _reexports(self, pkg: str) -> dict[str, tuple[str, str]]:
        """``name → (module, name there)`` for the module-level imports of ``pkg/__init__`` from ``pkg``."""
        out: dict[str, tuple[str, str]] = {}
        tree = ast.parse(self.files[pkg].read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                base = self._absolute(pkg, node.module, node.level)
                if base == pkg or base.startswith(pkg + "."):
                    for a in node.names:
                        if a.name != "*":
                            out[a.asname or a.name] = (base, a.name)
        return out

    def _is_reexport(self, pkg: str, imp: Import) -> bool:
        return not imp.lazy and imp.name is not None and (imp.module == pkg or imp.module.startswith(pkg + "."))

    def targets(self, module: str, name: str | None, seen: frozenset = frozenset()) -> set[str]:
        """The files that ``from module import name`` (or ``import module``) depends on."""
        key = (module, name)
        if key in seen:
            return set()
        seen = seen | {key}
        if name is not None and f"{module}.{name}" in self.files:
            return self.targets(f"{module}.{name}", None, seen)
        if module not in self.files:
            return set()  # not a module of the tree (yet): nothing to depend on
        if module not in self.packages:
            return {module}
        exported = self._reexports(module)
        if name is not None:
            if name in exported:
                return self.targets(*exported[name], seen)
            return {module}  # defined by the __init__ itself
        out = {module}
        for target in exported.values():
            out |= self.targets(*target, seen)
        return out

    def edges(self) -> dict[str, dict[str, int]]:
        """``edges[a][b]`` = line of the first import in ``a`` that makes it depend on ``b``."""
        out: dict[str, dict[str, int]] = {m: {} for m in self.files}
        for mod, imports in self.imports.items():
            for imp in imports:
                if mod in self.packages and self._is_reexport(mod, imp):
                    continue  # a re-export: transparent (see the module docstring)
                for target in self.targets(imp.module, imp.name):
                    if target != mod:
                        out[mod].setdefault(target, imp.line)
        return out

    # -- what the tests report
    def rel(self, mod: str) -> str:
        return str(self.files[mod].relative_to(self.root / self.package))

    def cycles(self) -> list[list[str]]:
        """Shortest cycles covering every file of every strongly connected component (as module names)."""
        edges = self.edges()
        found: list[list[str]] = []
        for comp in _strongly_connected(edges):
            if len(comp) < 2:
                continue
            covered: set[str] = set()
            for start in sorted(comp):
                if start in covered:
                    continue
                cycle = _shortest_cycle(edges, start, comp)
                covered.update(cycle)
                found.append(cycle)
        return found

    def show(self, cycle: list[str]) -> str:
        edges = self.edges()
        steps = [f"{self.rel(a)}:{edges[a][b]}" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        return " → ".join(steps + [self.rel(cycle[0])])


def _strongly_connected(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (import graphs can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: set[str] = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.add(top)
                    if top == node:
                        break
                comps.append(comp)
    return comps


def _shortest_cycle(edges: dict[str, dict[str, int]], start: str, within: set[str]) -> list[str]:
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges[node]):
            if nxt not in within:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


# ----------------------------------------------------------------------------------------------
# the checker on small trees (so that a green run of the real checks means something)


def _tree(tmp_path: Path, files: dict[str, str]) -> ImportGraph:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ImportGraph(tmp_path, "pkg")


def test_checker_finds_direct_lazy_and_chained_cycles(tmp_path):
    g = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .a import x\n",  # lazy imports count
        "c.py": "from pkg.d import y\n",
        "d.py": "from .e import z\n",
        "e.py": "import pkg.c\n",
    })
    shown = sorted(g.show(c) for c in g.cycles())
    assert shown == ["a.py:1 → b.py:2 → a.py", "c.py:1 → d.py:1 → e.py:1 → c.py"]


def test_checker_ignores_type_checking_and_reexports(tmp_path):
    g = _tree(tmp_path, {
        "__init__.py": "from .core import Thing\nfrom .sub import helper\n",
        "core.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .user import User\n",
        "user.py": "from . import Thing\n",  # resolved through the re-export to core.py
        "sub/__init__.py": "from .impl import helper\n\ndef hook():\n    from ..user import User\n",
        "sub/impl.py": "from .. import Thing\nfrom . import helper as h\n",
    })
    edges = g.edges()
    assert edges["pkg.user"] == {"pkg.core": 1}
    assert edges["pkg.sub.impl"] == {"pkg.core": 1}
    assert edges["pkg.sub"] == {"pkg.user": 4}  # the __init__'s own (lazy) import
    assert g.cycles() == []


def test_checker_follows_an_init_s_own_code(tmp_path):
    g = _tree(tmp_path, {
        "__init__.py": "VERSION = 1\n\ndef load():\n    from .a import x\n",
        "a.py": "from . import VERSION\n",  # VERSION is defined by __init__, whose own code imports a
    })
    assert [g.show(c) for c in g.cycles()] == ["__init__.py:4 → a.py:1 → __init__.py"]


# ----------------------------------------------------------------------------------------------
# the real checks


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(SRC, PACKAGE)


def test_no_source_file_is_over_700_lines(graph):
    sizes = {graph.rel(m): len(p.read_text(encoding="utf-8").splitlines()) for m, p in graph.files.items()}
    offenders = sorted((f for f, n in sizes.items() if n > MAX_LINES), key=lambda f: -sizes[f])
    assert not offenders, "files over 700 lines: " + ", ".join(f"{f} ({sizes[f]})" for f in offenders)


def _describe(graph: ImportGraph, cycles: list[list[str]]) -> str:
    return "\n".join(["import cycles (file:line of the import → ...):"] + [f"  {graph.show(c)}" for c in cycles])


def test_engine_has_no_import_cycle(graph):
    engine = f"{PACKAGE}.engine"
    cycles = [c for c in graph.cycles() if any(m == engine or m.startswith(engine + ".") for m in c)]
    assert not cycles, _describe(graph, cycles)


def test_no_import_cycle_between_files(graph):
    cycles = graph.cycles()
    assert not cycles, _describe(graph, cycles)


_MODULE_NAME = re.compile(rf"^{re.escape(STUDIES)}(\.\w+)*$")


def test_the_library_never_imports_the_study_package(graph):
    """Outside ``studies/`` and ``cli/`` nothing imports ``prunekit.studies`` — by a statement, lazily, or
    by naming one of its modules in a string (a lazy registry loader's module list), except the study
    registry itself (``MAY_NAME_STUDIES``), whose names only the CLI looks up."""
    bad = []
    for mod in graph.files:
        if any(mod == p or mod.startswith(p + ".") for p in MAY_IMPORT_STUDIES):
            continue
        for imp in graph.imports[mod]:
            full = f"{imp.module}.{imp.name}" if imp.name else imp.module
            if _MODULE_NAME.match(imp.module) or _MODULE_NAME.match(full):
                bad.append(f"{graph.rel(mod)}:{imp.line} imports {full}")
        if mod not in MAY_NAME_STUDIES:
            bad += [f"{graph.rel(mod)}:{line} names module '{s}'" for s, line in graph.strings[mod]
                    if _MODULE_NAME.match(s)]
    assert not bad, "library code imports the study package:\n  " + "\n  ".join(bad)
