"""The layering rule, read off every module's imports: imports point down, no module-level cycle.

The order is declared once, in pyproject.toml's ``[tool.stalwart.layers]``. Every ``import`` of a
``stalwart`` module counts, lazy ones inside functions included (an upward import is upward
wherever it sits); only module-level imports outside ``if TYPE_CHECKING:`` make a cycle.
"""

from __future__ import annotations

import ast
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_PACKAGE = {"tests", "bench", "deploy", "docs", "configs", "runs", "build", "dist"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted, without the "stalwart." prefix
    target: str  # imported module, same form
    line: int
    module_level: bool


def declared_layers(root: Path = ROOT) -> dict[str, int]:
    """Top-level name (folder or leaf module) → layer index, bottom = 0."""
    order = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["stalwart"]["layers"]["order"]
    return {name: i for i, names in enumerate(order) for name in names}


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name (without "stalwart.") → file, for every module of the package."""
    out = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder == Path("."):
            dirs[:] = [d for d in dirs if d not in NOT_PACKAGE and not d.startswith(".")]
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                parts = [*rel_folder.parts, name.removesuffix(".py")]
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(folder) / name
    return dict(sorted(out.items()))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str, path: Path, known: frozenset[str] = frozenset()) -> list[Import]:
    """Every stalwart import of ``module``; ``known`` (module names) resolves from-imports of submodules."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(child):
                visit(child, False)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this package
                    base = package.split(".") if package else []
                    base = base[: len(base) - (child.level - 1)]
                    origin = ".".join(["stalwart", *base, *([child.module] if child.module else [])])
                else:
                    origin = child.module or ""
                # `from stalwart.model import llama` imports the submodule stalwart.model.llama
                names = [
                    f"{origin}.{a.name}" if f"{origin}.{a.name}".removeprefix("stalwart.") in known else origin
                    for a in child.names
                ]
            for name in names:
                if name == "stalwart" or name.startswith("stalwart."):
                    found.append(Import(module, name.removeprefix("stalwart").lstrip("."), child.lineno, module_level))
            visit(child, module_level)

    visit(tree, True)
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    layers = declared_layers(root)
    problems = []
    for module, path in package_modules(root).items():
        if not module:
            continue  # the package's own __init__
        own = layers.get(module.split(".")[0])
        if own is None:
            problems.append(f"{module}: its top-level folder is not in [tool.stalwart.layers]; add it there")
            continue
        for imp in imports_of(module, path):
            top = imp.target.split(".")[0]
            if not top:
                continue  # `import stalwart` / `from stalwart import __version__`
            theirs = layers.get(top)
            if theirs is None or theirs > own:
                problems.append(
                    f"{path.relative_to(root)}:{imp.line}: {module} imports stalwart.{imp.target}, which is above it"
                )
    return problems


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    modules = package_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for imp in imports_of(module, path, frozenset(modules)):
            if imp.module_level and imp.target in modules and imp.target != module:
                graph[module].add(imp.target)
    cycles, state = [], {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    return cycles


def test_imports_point_down_the_declared_layers():
    assert layer_violations() == []


def test_no_module_level_import_cycle():
    assert import_cycles() == []


def test_nothing_outside_cli_imports_cli():
    for module, path in package_modules().items():
        if module.split(".")[0] in ("cli", "__main__"):
            continue
        bad = [i for i in imports_of(module, path) if i.target.split(".")[0] == "cli"]
        assert not bad, f"{module} imports {[i.target for i in bad]}"


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package's shape: pyproject's layers plus two small modules."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for rel in (
        "errors.py",
        "model/__init__.py",
        "model/a.py",
        "model/b.py",
        "runtime/__init__.py",
        "runtime/train.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    return tmp_path


def test_a_planted_upward_import_is_caught(planted: Path):
    assert layer_violations(planted) == []
    (planted / "model" / "a.py").write_text(
        "def f():\n    from stalwart.runtime.train import x\n"
    )  # lazy, still upward
    (planted / "errors.py").write_text("from stalwart.model import a\n")
    problems = layer_violations(planted)
    assert len(problems) == 2 and any("model.a imports stalwart.runtime.train" in p for p in problems), problems
    assert any("errors imports stalwart.model" in p for p in problems), problems


def test_a_planted_cycle_and_an_undeclared_folder_are_caught(planted: Path):
    (planted / "model" / "a.py").write_text("from stalwart.model import b\n")
    (planted / "model" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stalwart.model import a\n"
    )
    assert import_cycles(planted) == []  # a type-only import is no cycle
    (planted / "model" / "b.py").write_text("import stalwart.model.a\n")
    assert import_cycles(planted) == [["model.a", "model.b", "model.a"]]
    (planted / "utils").mkdir()
    (planted / "utils" / "__init__.py").write_text("")
    assert any("utils: its top-level folder is not in" in p for p in layer_violations(planted))
