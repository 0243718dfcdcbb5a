"""The core's import structure: no import cycles, every module imports alone, never prefect or ray.

Covers both core packages, distill/ and dp4tl/ (dp4tl may import distill, never the reverse).
"""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("distill", "dp4tl")
MODULES = sorted(
    f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg for pkg in PACKAGES for path in (REPO / pkg).glob("*.py")
)


def _imports(module: str) -> set[str]:
    """Core modules `module` imports anywhere in its file (top level or deferred inside functions)."""
    path = REPO / (module.replace(".", "/") + ("/__init__.py" if module in PACKAGES else ".py"))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in MODULES and n != module}
    return found


def test_the_core_has_no_import_cycles():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def test_distill_never_imports_dp4tl():
    offenders = {m: sorted(d for d in _imports(m) if d.startswith("dp4tl")) for m in MODULES if m.startswith("distill")}
    assert not {m: d for m, d in offenders.items() if d}


CHECK = """
import sys
import {module}
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "ray", "tasks", "flows"))
assert not bad, f"{module} imports {{bad}}"
"""


def test_every_core_module_imports_alone_in_a_fresh_interpreter():
    def run(module: str) -> tuple[str, subprocess.CompletedProcess]:
        code = CHECK.format(module=module)
        return module, subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, MODULES))
    failed = {m: r.stderr.strip().splitlines()[-1] for m, r in results if r.returncode != 0}
    assert not failed, failed
    assert len(results) >= 20
