"""The package stands alone: no import cycles (imports inside functions count too), no import
of a top-level script, no ``sys.path`` edit. The walker is tested on tiny fake packages first,
so a walker that sees nothing cannot pass the real check."""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "llama_engine"


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module under ``root/package``."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imported(node: ast.AST, module: str, is_init: bool) -> list[str]:
    """Dotted names an import statement may bind (the module, and module.name for each name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_init else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _edits_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def walk(root: Path, package: str) -> tuple[dict[str, set], set, set]:
    """-> (import graph between the package's modules, imports of top-level scripts as
    'module->script', modules touching sys.path). Every import statement counts, wherever
    it is written (module level, function, class)."""
    mods = package_modules(root, package)
    scripts = {p.stem for p in root.glob("*.py")}
    edges: dict[str, set] = {m: set() for m in mods}
    script_imports, path_edits = set(), set()
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py"):
                if target in mods and target != name:
                    edges[name].add(target)
                if target.split(".")[0] in scripts:
                    script_imports.add(f"{name}->{target.split('.')[0]}")
            if _edits_sys_path(node):
                path_edits.add(name)
    return edges, script_imports, path_edits


def cycles(edges: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in edges:
        if v not in index:
            visit(v)
    return out


# -- the walker itself ---------------------------------------------------------------------------
def _fake(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, src in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
    return tmp_path


def test_walker_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _fake(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .a import x\n",
        "pkg/c.py": "import pkg.a\n",
    })
    edges, _, _ = walk(root, "pkg")
    assert cycles(edges) == [["pkg.a", "pkg.b"]]


def test_walker_finds_script_imports_and_sys_path(tmp_path):
    root = _fake(tmp_path, {
        "script.py": "",
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from .. import a\n",
        "pkg/a.py": "import sys\ndef g():\n    sys.path.insert(0, '.')\n    import script\n",
    })
    edges, script_imports, path_edits = walk(root, "pkg")
    assert script_imports == {"pkg.a->script"}
    assert path_edits == {"pkg.a"}
    assert edges["pkg.sub"] == {"pkg", "pkg.a"}  # relative import from a subpackage's __init__
    assert cycles(edges) == []


# -- the package -----------------------------------------------------------------------------
def test_package_imports_no_script_and_never_edits_sys_path():
    edges, script_imports, path_edits = walk(REPO, PACKAGE)
    assert len(edges) > 20, "the walker found too few modules"
    assert script_imports == set()
    assert path_edits == set()


def test_package_has_no_import_cycle():
    """Imports written inside functions count: a cycle cannot hide there."""
    edges, _, _ = walk(REPO, PACKAGE)
    assert cycles(edges) == []


def test_package_imports_outside_the_repository(tmp_path):
    """The package works from any working directory with only itself on the path."""
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / PACKAGE).symlink_to(REPO / PACKAGE)
    code = ("import llama_engine.runner, llama_engine.builder, llama_engine.serving.llm_engine, "
            "llama_engine.smoothquant, llama_engine.trtllm")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_design_doc_names_every_module():
    """docs/design.md's module table stays true to the package: a module added or renamed
    without its row fails here."""
    text = (REPO / "docs" / "design.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in sorted((REPO / PACKAGE).rglob("*.py"))
               if f"`{p.relative_to(REPO).as_posix()}`" not in text]
    assert missing == [], f"docs/design.md does not name {missing}"
