"""The package's structure: the runtime starts without the DSL, no two project modules import each
other at module level (directly or around a longer loop), and no runtime module grows long without
saying why."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packages() -> dict[str, str]:
    """Folder at the repository root → the package it is installed as (pyproject.toml's package-dir)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {folder: pkg for pkg, folder in package_dir.items()}


PACKAGES = _packages()
# What only the DSL needs: a runtime process must not import it.
DSL_ONLY = ("radixlm.api", "radixlm.ir", "radixlm.interpreter", "radixlm.state", "radixlm.tracer",
            "radixlm.backend", "requests", "openai")


def project_modules() -> dict[str, str]:
    """Dotted module name → file, for every module of the three packages."""
    mods: dict[str, str] = {}
    for folder, pkg in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    parts = os.path.relpath(os.path.join(dirpath, f), base)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    mods[".".join([pkg, *parts])] = os.path.join(dirpath, f)
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, and inside module-level if/try/with
    blocks, but not in functions, classes or ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, (ast.Import, ast.ImportFrom)):
                found.append(st)
            elif isinstance(st, ast.If):
                if not _is_type_checking(st.test):
                    visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                for h in st.handlers:
                    visit(h.body)
                visit(st.orelse)
                visit(st.finalbody)
            elif isinstance(st, (ast.With, ast.For, ast.While)):
                visit(st.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports at module level."""
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # ``import radixlm.runtime.x.y`` → the deepest real module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        path.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


# "~400 lines": the bound, with a tenth of slack so a small fix need not split a module.
MAX_RUNTIME_MODULE_LINES = 440
LENGTH_REASON = "Length:"  # a module docstring line that says why this module is longer


def test_no_long_runtime_module_without_a_reason():
    too_long = []
    for name, path in project_modules().items():
        if not name.startswith("radixlm.runtime"):
            continue
        with open(path, encoding="utf-8") as f:
            src = f.read()
        n = src.count("\n")
        if n > MAX_RUNTIME_MODULE_LINES and LENGTH_REASON not in (ast.get_docstring(ast.parse(src)) or ""):
            too_long.append(f"{os.path.relpath(path, ROOT)} ({n} lines)")
    assert not too_long, (f"over {MAX_RUNTIME_MODULE_LINES} lines: split by job, or say why in a "
                          f"'{LENGTH_REASON}' line of the module docstring: {too_long}")


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert len(graph) > 50 and {"lang", "runtime", "kernels"} <= set(PACKAGES)
    assert "radixlm.runtime.protocol" in graph["radixlm.runtime.scheduler"]
    assert "radixlm.runtime.sampling_params" in graph["radixlm.runtime.protocol"]
    assert "radixlm.runtime.attention" in graph["radixlm.runtime.model_runner"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " → ".join(cycle or [])


@pytest.mark.slow
@pytest.mark.parametrize("module", ["radixlm.runtime.scheduler", "radixlm.runtime.server.launcher",
                                    "radixlm.runtime.engine"])
def test_the_runtime_imports_without_the_dsl(module):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m.startswith({DSL_ONLY!r})))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} imported DSL modules: {out.stdout.strip()}"


@pytest.mark.slow
def test_the_dsl_names_still_resolve():
    code = ("import radixlm as sgl; names = sgl.__all__; "
            "missing = [n for n in names if getattr(sgl, n, None) is None]; "
            "print(missing, type(sgl.global_config).__name__, callable(sgl.gen))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] GlobalConfig True"
