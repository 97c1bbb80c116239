"""No import cycle among the repository's modules: every `import` statement of every module (at the top and
inside functions), resolved to the repository's files, forms a graph without a loop."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"__pycache__", "node_modules", "build", "dist"}  # and every hidden folder (.venv, .git, .base...)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name (from the root, as the code imports it) -> file, for every .py file of the tree."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        names = list(parts[:-1]) + ([] if path.name == "__init__.py" else [path.stem])
        if names:
            modules[".".join(names)] = path
    return modules


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name `path` imports, anywhere in it (relative imports made absolute), including
    `from a import b` as `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package, `level - 1` packages up
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join(parent + ([base] if base else []))
            if base:
                names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the repository modules its import statements run: the module itself and every package above
    it (importing a.b.c runs a/__init__.py and a/b/__init__.py). A script's bare names also resolve to
    files beside it (benchmarks/ and tests/ run with their own folder on sys.path)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        folder = path.parent.relative_to(root).parts
        targets = set()
        for imported in imported_names(path, package):
            candidates = [imported]
            if folder and "." not in imported:  # a bare name: the file beside the script, if there is one
                candidates.insert(0, ".".join(folder + (imported,)))
            for candidate in candidates:
                if candidate in modules:
                    parts = candidate.split(".")
                    targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                   if ".".join(parts[:i]) in modules)
                    break
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of the graph as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_repository_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert "losses" in graph and len(graph) > 20  # the walk found the repository's modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    """The checker itself: the loop this repository had (losses imported the kernel inside functions, the kernel
    imported losses at the top) is reported; moving the shared names to a third module removes it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "kernel.py").write_text("from losses import MARGIN\n")
    (tmp_path / "losses.py").write_text("MARGIN = 0.69\n\ndef pick():\n    from pkg import kernel\n    return kernel\n")
    assert find_cycle(import_graph(tmp_path)) == ["losses", "pkg.kernel", "losses"]

    (tmp_path / "shared.py").write_text("MARGIN = 0.69\n")
    (tmp_path / "pkg" / "kernel.py").write_text("from shared import MARGIN\n")
    (tmp_path / "losses.py").write_text("from shared import MARGIN\n\ndef pick():\n    from pkg import kernel\n")
    assert find_cycle(import_graph(tmp_path)) is None
    # relative imports and a package's own __init__ count too
    (tmp_path / "pkg" / "__init__.py").write_text("from .kernel import MARGIN\n")
    (tmp_path / "pkg" / "kernel.py").write_text("import pkg\n")
    assert find_cycle(import_graph(tmp_path)) == ["pkg", "pkg.kernel", "pkg"]
