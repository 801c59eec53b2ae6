"""The package's shape (issue 14): no import cycle between scm_fast's modules at import time, no
file over 600 lines, no class over 300 lines. Imports inside functions (lazy, at call time) do not
count as edges."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "scm_fast"
MAX_FILE, MAX_CLASS = 600, 300


def _module(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _top_level_imports(path, name):
    """scm_fast modules imported when `name` is imported (module-level statements only)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("scm_fast")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("scm_fast"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _statements(body):
    """Module-level statements, including those inside top-level try / if blocks."""
    for node in body:
        if isinstance(node, (ast.Try, ast.If)):
            yield from _statements(node.body + getattr(node, "orelse", []) +
                                   [s for h in getattr(node, "handlers", []) for s in h.body])
        else:
            yield node


def _graph():
    files = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: {d for d in _top_level_imports(p, m) if d in files and d != m} for m, p in files.items()}


def _parents(m):
    parts = m.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    graph = _graph()
    # importing a.b.c runs a/__init__ and a/b/__init__ first; a package importing its own submodules is
    # not a cycle, so a module's edges to the packages that contain it are dropped.
    graph = {m: {d for d in deps if d not in _parents(m)} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_files_and_classes_stay_small():
    big = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        n = len(text.splitlines())
        if n > MAX_FILE:
            big.append(f"{path.relative_to(PKG.parent)}: {n} lines (> {MAX_FILE})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS:
                big.append(f"{path.relative_to(PKG.parent)}: class {node.name} {node.end_lineno - node.lineno + 1} "
                           f"lines (> {MAX_CLASS})")
    assert not big, "split these: " + "; ".join(big)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check is not vacuous: two modules importing each other at the top are reported."""
    pkg = tmp_path / "scm_fast"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from scm_fast import b\n")
    (pkg / "b.py").write_text("import scm_fast.a\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "scm_fast.a -> scm_fast.b -> scm_fast.a" in str(err)
    else:
        raise AssertionError("the cycle a <-> b was not found")
