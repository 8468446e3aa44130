"""The layout's rules, read from the source with ``ast`` (docs/ARCHITECTURE.md).

import-linter (``lint-imports`` in .ci/run, contracts in pyproject.toml) checks
the layers; these tests add what it does not see the same way: every import,
function-local ones and ``if TYPE_CHECKING:`` ones included, so that no cycle
hides inside a function, and the rule that a private name stays in its module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"peftspec": ROOT / "peftspec", "peftspec_plugins": ROOT / "plugins"}
MAX_LINES = 400  # a file past this is split, not grown (issue 23)


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """``(target module, imported name or None, line)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:  # `from pkg import module`
                    yield full, None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            # `import a.b.c` also runs a and a.b: count the deepest module that exists
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_local_imports():
    # the checks below are only as good as the graph: a known local import is in it
    # (tests/test_layers.py itself would not be; peftspec.core.registry imports
    # importlib.metadata inside a function, an external module, so take one of ours)
    assert "peftspec.core.state" in _graph()["peftspec.core.plan"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_counting_function_local_imports():
    assert _cycles(_graph()) == []


def test_no_private_name_is_imported_across_modules():
    found = [f"{path.relative_to(ROOT)}:{line}: {target}.{imported}"
             for name, path in MODULES.items()
             for target, imported, line in _imports(name, path)
             if imported and imported.startswith("_") and not imported.startswith("__")
             and target.split(".")[0] in PACKAGES and target != name]
    assert found == []


def test_nothing_inside_peftspec_imports_the_package_root_but_the_top():
    # The root is the facade over every layer: a module it imports, directly or not,
    # must never import it back. Only the conformance kit (above everything) and the
    # deprecated aliases may.
    allowed = {"peftspec.testing"}
    found = [f"{path.relative_to(ROOT)}:{line}"
             for name, path in MODULES.items()
             if name.startswith("peftspec.") and name not in allowed
             for target, _, line in _imports(name, path) if target == "peftspec"]
    assert found == []


def test_no_source_file_is_over_the_limit():
    over = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
            for path in MODULES.values() if len(path.read_text().splitlines()) > MAX_LINES}
    assert over == {}, f"split these: over {MAX_LINES} lines: {over}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("peftspec_plugins")))
def test_built_in_plugins_import_only_the_public_plugin_api(name):
    allowed = {"peftspec", "peftspec.plugin_api"}
    bad = [f"line {line}: {target}" for target, _, line in _imports(name, MODULES[name])
           if target.split(".")[0] == "peftspec" and target not in allowed]
    assert bad == []


def test_the_architecture_doc_names_only_modules_that_exist():
    import importlib
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert len(text.splitlines()) <= 120  # two pages
    missing = []
    for dotted in sorted(set(re.findall(r"\bpeftspec(?:\.[a-z_]+)+", text))):
        module, _, attr = dotted.rpartition(".")
        if dotted in MODULES or (module in MODULES and hasattr(importlib.import_module(module), attr)):
            continue
        missing.append(dotted)
    for short in sorted(set(re.findall(r"`(core|formats|models|data|train)\.([a-z_]+)", text))):
        if f"peftspec.{short[0]}.{short[1]}" not in MODULES:
            missing.append(".".join(short))
    assert missing == []


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items()
                                        if p.name == "__init__.py" and n.startswith("peftspec")))
def test_each_package_says_what_lives_there(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc) > 80 and "TODO" not in doc


@pytest.mark.parametrize("old, new, name", [("peftspec.method", "peftspec.core.method",
                                             "FreezeMethod"),
                                            ("peftspec.frozen", "peftspec.core.packed",
                                             "PackedWeight")])
def test_documented_old_paths_still_work_and_warn(old, new, name):
    import importlib

    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(old), "no_such_name")
