"""The layout shows the architecture: parts named for their concerns, imports flowing one way, small modules.

Read from the source itself (ast), so it holds for every import, lazy and TYPE_CHECKING ones included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "proxy"

# Each part's rank: a part may import only parts of a lower rank (and itself). The modules directly in proxy/
# (errors, limits, tokens) and the settings (config/) are the floor everything stands on; among themselves only the
# module cycle test applies. `proxy.__main__` is the entry point: it runs the command line.
FLOOR = {"proxy", "config"}
RANK = {
    "proxy": 0,
    "config": 0,
    "telemetry": 1,
    "mock": 2,
    "stores": 2,
    "upstream": 2,
    "accounts": 3,
    "embeddings": 4,
    "http": 5,
    "console": 4,  # below http, which serves it: the console imports nothing of the HTTP layer
    "cli": 6,
}
TOP_LEVEL_MAX = 6
MODULE_MAX_LINES = 400
FUNCTION_MAX_LINES = 80
PHASE_MAX_LINES = 60
SCRIPT_MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    base = name.split(".") if _is_package(path) else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("proxy"):
                    yield _resolve(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join([*anchor, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("proxy"):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else _resolve(target, known)


def _resolve(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: {t for t in _imports(n, p, known) if t != n and t in known} for n, p in mods.items()}


def _part(module: str) -> str:
    bits = module.split(".")
    if len(bits) == 1:
        return "proxy"
    return bits[1] if (PKG / bits[1]).is_dir() else "proxy"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_parents(module: str) -> set[str]:
    bits = module.split(".")
    return {".".join(bits[:i]) for i in range(1, len(bits))}


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # a package's __init__ naming its own public surface is not a cycle with the modules it re-exports
    pruned = {n: {t for t in ts if t not in _package_parents(n)} for n, ts in graph.items()}
    assert _cycles(pruned) == []


def test_imports_flow_one_way_between_parts() -> None:
    wrong = []
    for name, targets in _graph().items():
        for target in targets:
            src, dst = _part(name), _part(target)
            if src == dst or (src in FLOOR and dst in FLOOR) or name == "proxy.__main__":
                continue
            if RANK[src] <= RANK[dst]:
                wrong.append(f"{name} -> {target}")
    assert sorted(wrong) == []


def test_every_part_is_named_and_few_modules_stay_loose() -> None:
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert len(loose) <= TOP_LEVEL_MAX, loose
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts <= set(RANK), parts - set(RANK)


def test_modules_and_functions_stay_small() -> None:
    big_modules, big_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MODULE_MAX_LINES:
            big_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                limit = PHASE_MAX_LINES if name.startswith("proxy.embeddings") else FUNCTION_MAX_LINES
                if length > limit:
                    big_functions.append(f"{name}.{node.name} ({length})")
    assert big_modules == [] and big_functions == []


def test_console_scripts_stay_small() -> None:
    scripts = list((PKG / "console").rglob("*.js"))
    assert scripts
    assert [s.name for s in scripts if s.read_text().count("\n") > SCRIPT_MAX_LINES] == []


def test_every_module_imports_on_its_own() -> None:
    """First in a fresh interpreter, each module imports (no import-order cycle hidden by what was loaded before)."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(n for n in _modules() if not n.endswith('__main__'))!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
