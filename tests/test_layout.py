"""The package graph of steerflow points one way.

Every module under ``steerflow/`` is parsed (``ast``, nothing is imported) and each import statement becomes an
edge between the *top-level* packages of the importing and the imported module. Counted as imports:

* ``import steerflow.x`` / ``from steerflow.x import y`` / relative ``from ..x import y`` at module level;
* the same **inside functions and methods** (a lazy import still needs the other package at run time, and
  hiding a loop inside a function is how loops go unnoticed);
* the same inside ``if TYPE_CHECKING:`` blocks and ``try`` blocks (an annotation that names a package above
  is a dependency on it too: use a protocol or duck typing instead);
* ``importlib.import_module("steerflow.x...")`` with a literal name (or an f-string whose literal head names
  the package).

Not seen: ``importlib.import_module`` with a computed name, which only the ``steerflow`` facade uses, for its
lazy ``steerflow.<subpackage>`` attributes.

Nodes are the subpackages (``paths``, ``solvers``, ...), the top-level modules (``_types``, ``plotting``,
``__main__``) and ``steerflow`` itself (the facade ``steerflow/__init__.py``; ``from steerflow import sample``).

The intended layers, lowest first; a package may import only packages of a *strictly lower* layer:

====  ==========================================================  ===========================================
 0    ``_types``, ``plotting``                                    foundations, import nothing of steerflow
 1    ``data``, ``paths``                                         densities and data sets; what x_t, u_t are
 2    ``models``                                                  velocity networks
 3    ``solvers``                                                 the one sampler loop, grids, ``Cost``
 4    ``metrics``                                                 distances, straightness (runs the sampler)
 5    ``couplings``, ``manifolds``, ``steering``,                 plug into the sampler / the paths;
      ``steerflow`` (the facade)                                  the facade re-exports paths/solvers/metrics
 6    ``training``, ``adapters``                                  the training loop; external pipelines
 7    ``straighten``, ``transport``                               reflow, distillation, c-rectified and
                                                                  multimarginal transport (train and sample)
 8    ``cli``                                                     parses and calls
 9    ``__main__``                                                ``python -m steerflow``
====  ==========================================================  ===========================================

Paths on a geometry (``GeodesicPath``, ``ReflectedPath``) live in ``paths`` and take their manifold or domain as
an argument; ``steerflow.manifolds.ReflectedPath`` is a re-export (manifolds → paths, downward).
"""
from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "steerflow"
FACADE = "steerflow"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_types", "plotting"),
    ("data", "paths"),
    ("models",),
    ("solvers",),
    ("metrics",),
    ("couplings", "manifolds", "steering", FACADE),
    ("training", "adapters"),
    ("straighten", "transport"),
    ("cli",),
    ("__main__",),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


# --- the parser --------------------------------------------------------------------------------------
def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(dotted: str, root: Path) -> bool:
    """Whether ``steerflow.a.b`` names a module or package under ``root``."""
    rel = Path(*dotted.split(".")[1:])
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _node(dotted: str) -> str:
    """The top-level package of a module name: ``steerflow.steering.base`` → ``steering``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _literal_head(arg: ast.expr) -> str | None:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value)
    return None


def imported_modules(source: str, module: str, is_package: bool, root: Path) -> list[tuple[str, int]]:
    """Every steerflow module (dotted name) that ``source`` imports anywhere, with the line of the import."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import name`` imports the submodule pkg.name when there is one, else pkg itself
            subs = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}", root)]
            out += [(m, node.lineno) for m in subs] or [(target, node.lineno)]
            if subs and len(subs) < len(node.names):
                out.append((target, node.lineno))
        elif isinstance(node, ast.Call) and "import_module" in (getattr(node.func, "attr", None),
                                                                 getattr(node.func, "id", None)):
            head = _literal_head(node.args[0]) if node.args else None
            if head and head.startswith("steerflow"):
                out.append((head.rstrip("."), node.lineno))
    return [(m, line) for m, line in out if m == "steerflow" or m.startswith("steerflow.")]


def package_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """``{a: {b: ["steerflow/x.py:12", ...]}}``: package ``a`` imports package ``b`` at those lines (a ≠ b)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        a = _node(module)
        graph[a]  # every package is a node, even one that imports nothing
        for target, line in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py",
                                             root):
            b = _node(target)
            if b != a:
                graph[a][b].append(f"{path.relative_to(root.parent)}:{line}")
    return {a: dict(bs) for a, bs in graph.items()}


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One loop ``[a, b, ..., a]`` of the graph, or ``None`` when it has none (depth-first search)."""
    colour: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(a: str) -> list[str] | None:
        colour[a] = 1
        stack.append(a)
        for b in sorted(graph.get(a, {})):
            if colour.get(b) == 1:
                return stack[stack.index(b):] + [b]
            if b not in colour:
                found = visit(b)
                if found:
                    return found
        stack.pop()
        colour[a] = 2
        return None

    for a in sorted(graph):
        if a not in colour:
            found = visit(a)
            if found:
                return found
    return None


def _describe(cycle: list[str], graph) -> str:
    hops = [f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:])]
    return "import loop between packages " + " -> ".join(cycle) + "\n" + "\n".join(hops)


# --- the parser finds what it must (so the checks below can fail) ---------------------------------------
def test_the_parser_sees_lazy_type_checking_relative_and_dynamic_imports(tmp_path):
    pkg = tmp_path / "steerflow"
    for sub in ("a", "b", "c", "d", "e"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..b import thing\n"
        "def f():\n    from steerflow.c.x import y\n    return y\n"
        "def g():\n    import importlib\n    return importlib.import_module(f'steerflow.d.{1}')\n")
    (pkg / "e" / "mod.py").write_text("from .. import e\nfrom . import mod\n")
    graph = package_graph(pkg)
    assert graph["a"] == {"b": ["steerflow/a/mod.py:3"], "c": ["steerflow/a/mod.py:5"],
                          "d": ["steerflow/a/mod.py:9"]}
    assert graph["e"] == {}  # imports inside its own package are not edges
    assert find_cycle(graph) is None
    (pkg / "c" / "back.py").write_text("import steerflow.a.mod\n")
    cycle = find_cycle(package_graph(pkg))
    assert cycle == ["a", "c", "a"]


# --- the checks on steerflow ---------------------------------------------------------------------------
@functools.cache
def _steerflow_graph() -> dict[str, dict[str, list[str]]]:
    return package_graph()


def test_every_package_has_a_layer():
    unplaced = sorted(set(_steerflow_graph()) - set(LAYER))
    assert not unplaced, f"place these packages in LAYERS of tests/test_layout.py: {unplaced}"


def test_no_import_loop_between_packages():
    graph = _steerflow_graph()
    cycle = find_cycle(graph)
    assert cycle is None, _describe(cycle, graph)


def test_imports_point_down_the_layers():
    graph = _steerflow_graph()
    bad = [f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]}) at {', '.join(sites)}"
           for a, bs in graph.items() if a in LAYER for b, sites in bs.items() if b in LAYER and LAYER[b] >= LAYER[a]]
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_library_never_imports_the_cli():
    graph = _steerflow_graph()
    bad = [f"{a}: {', '.join(bs['cli'])}" for a, bs in graph.items() if "cli" in bs and a not in ("cli", "__main__")]
    assert not bad, "library code imports steerflow.cli (move the shared logic into the library):\n" + "\n".join(bad)


@pytest.mark.parametrize("old, new", [("steerflow.paths", "GeodesicPath"), ("steerflow.manifolds", "ReflectedPath"),
                                      ("steerflow.manifolds.domains", "ReflectedPath"), ("steerflow.metrics", "Cost"),
                                      ("steerflow.metrics.cost", "Cost"), ("steerflow", "Cost")])
def test_moved_names_stay_importable(old, new):
    import importlib

    import steerflow.paths
    import steerflow.solvers.cost

    owner = {"GeodesicPath": steerflow.paths, "ReflectedPath": steerflow.paths, "Cost": steerflow.solvers.cost}[new]
    assert getattr(importlib.import_module(old), new) is getattr(owner, new)
