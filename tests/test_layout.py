"""The package's layering, read from the source: imports point one way and never in a circle.

Layers, lowest first: the foundation modules at the top of the package, then the subpackages in
LAYERS order. A module may import its own subpackage and any lower layer, never a higher one; the
public face (``lorakit/__init__.py``) imports the core alone, so ``import lorakit`` stays light.
Every import counts, also one inside a function: a lazy import hides a cycle, it does not remove it.
Imports under ``if TYPE_CHECKING:`` are annotations only: they do not count as pointing up a layer, but
they do count in a cycle (two modules that need each other's names to be read are one piece).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lorakit"
FOUNDATION = {"errors", "fileio", "plots", "testing"}
LAYERS = ["lora", "models", "data", "generate", "train", "plan", "analysis", "export", "serve", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, typing_too: bool = False) -> set[str]:
    """Every lorakit module ``path`` imports (``from a import b`` counts a.b when that is a module);
    ``typing_too``: also those under ``if TYPE_CHECKING:``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", typing_too)


def imports_in(source: str, name: str, is_package: bool = False, typing_too: bool = False) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(source)
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing_too:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorakit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "lorakit":
                target = node.module
            else:
                continue
            subs = {f"{target}.{a.name}" for a in node.names}
            found |= {s for s in subs if s in MODULES} or {target}
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


FILES = sorted(PKG.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}


def layer_of(module: str) -> int:
    """-1 for the foundation, the index in LAYERS for a subpackage, len(LAYERS) for the package face."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return len(LAYERS)
    if parts[1] in FOUNDATION:
        return -1
    return LAYERS.index(parts[1])


def graph(typing_too: bool = False) -> dict[str, set[str]]:
    return {module_name(p): {i for i in imports(p, typing_too) if i in MODULES} for p in FILES}


def test_every_module_belongs_to_a_known_layer():
    for module in MODULES:
        layer_of(module)  # raises ValueError for a subpackage missing from LAYERS


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG.parent)))
def test_imports_point_down(path):
    me = module_name(path)
    upward = [i for i in imports(path) if i in MODULES and layer_of(i) > layer_of(me)]
    assert not upward, f"{me} (layer {layer_of(me)}) imports higher layers: {upward}"


def test_the_public_face_imports_only_the_core():
    face = imports(PKG / "__init__.py")
    # lk.fit and the preference functions: imported by the face's __getattr__ on first use, never by `import lorakit`
    lazy = {"lorakit.train.api", "lorakit.data.preference", "lorakit.train.losses.preference",
            "lorakit.train.objectives.logps"}
    assert {m.split(".")[1] for m in face - lazy} <= {"lora", "errors"}, face


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of modules, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        colour[node] = "black"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    edges = graph(typing_too=True)  # an annotation-only import back is still a cycle
    # a package's __init__ re-exporting its own modules is not a cycle of responsibility
    edges = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in edges.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("lorakit.lora.layer") < layer_of("lorakit.train.loop") < layer_of("lorakit.cli.main")
    annotated = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import Engine\n"
    assert imports_in(annotated, "lorakit.serve.metrics") == set()
    assert imports_in(annotated, "lorakit.serve.metrics", typing_too=True) == {"lorakit.serve.engine"}


def test_test_modules_have_unique_basenames():
    """pytest imports test files by basename (no __init__.py in tests/): two of one name fail collection."""
    from collections import Counter

    names = Counter(p.name for p in Path(__file__).resolve().parent.rglob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
