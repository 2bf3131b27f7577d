"""The package's shape, read from its own source: imports go one way, no circles, no private reach-ins.

Stages, bottom to top (docs/architecture.md): a module may import from its own stage or a lower one.
Every import counts, including those inside functions: a lazy import is still a dependency. Imports
under `if TYPE_CHECKING:` never run (they name types for annotations) and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sparseseg"

#: (stage, module prefixes), bottom first. "sparseseg" stands for the package's __init__ only, so a new
#: top-level module must be given a stage here.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("sparseseg", "sparseseg.errors", "sparseseg.io", "sparseseg.seeding", "sparseseg.device",
              "sparseseg.labels")),
    ("data", ("sparseseg.data",)),
    ("backbones", ("sparseseg.backbones",)),
    ("config", ("sparseseg.config",)),
    ("features", ("sparseseg.features",)),
    ("selection", ("sparseseg.selection",)),
    ("head and expansion", ("sparseseg.head", "sparseseg.expansion")),
    ("loop", ("sparseseg.loop", "sparseseg.scribbles", "sparseseg.distributed")),
    ("applications", ("sparseseg.annotate", "sparseseg.compare", "sparseseg.scribblegen", "sparseseg.report")),
    ("cli", ("sparseseg.cli", "sparseseg.__main__")),
]
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> int:
    """Index in STAGES of the longest matching prefix."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != "sparseseg"
            if (module == prefix or below) and len(prefix) > length:
                best, length = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no stage: add it to STAGES (and docs/architecture.md)")
    return best


def _imports(path: Path, module: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every sparseseg import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for part in node.body for n in ast.walk(part)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("sparseseg")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("sparseseg"):
                continue
            names = [alias.name for alias in node.names]
            # `from sparseseg.selection import uncertainty` imports the submodule
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(sub, [], node.lineno) for sub in subs]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest:
                out.append((base, rest, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def test_every_module_has_a_stage():
    for module in _modules():
        _stage(module)


def test_imports_go_from_higher_stages_to_lower_ones_only():
    bad = []
    for module, imports in _graph().items():
        for target, _, line in imports:
            if _stage(target) > _stage(module):
                bad.append(f"{module}:{line} imports {target} "
                           f"({STAGES[_stage(module)][0]} -> {STAGES[_stage(target)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {m: sorted({t for t, _, _ in imports if t in _modules() and t != m}) for m, imports in _graph().items()}
    # a package's __init__ importing its own submodules is not a circle of jobs; leave those edges out
    for m, targets in graph.items():
        graph[m] = [t for t in targets if not t.startswith(m + ".")]
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cli_sits_on_top_and_registers_on_one_app():
    graph = {m: {t for t, _, _ in imports} for m, imports in _graph().items()}
    commands = {m for m in graph if m.startswith("sparseseg.cli.")} - {"sparseseg.cli.app", "sparseseg.cli.__main__"}
    assert commands >= {"sparseseg.cli.compare", "sparseseg.cli.annotate", "sparseseg.cli.scribblegen"}
    assert not graph["sparseseg.cli.app"] & commands  # the app module imports no command module
    assert all("sparseseg.cli.app" in graph[m] for m in commands)  # every command module registers on it
    outside = {m: sorted(t for t in deps if t == "sparseseg.cli" or t.startswith("sparseseg.cli."))
               for m, deps in graph.items() if not m.startswith("sparseseg.cli")}
    assert not any(outside.values()), outside  # nothing below the CLI imports it


def _top_package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_no_private_name_is_imported_across_packages():
    bad = []
    for module, imports in _graph().items():
        for target, names, line in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and _top_package(target) != _top_package(module):
                bad.append(f"{module}:{line} imports {', '.join(private)} from {target}")
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_longer_than_the_limit(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)}: {lines} lines > {MAX_LINES}; split it by job"


def test_the_checks_catch_what_they_look_for(tmp_path):
    # The helpers on a small fake package: an upward import, a private name and a circle are seen.
    src = tmp_path / "src" / "sparseseg"
    (src / "data").mkdir(parents=True)
    (src / "loop").mkdir()
    (src / "__init__.py").write_text("")
    (src / "data" / "__init__.py").write_text("")
    (src / "loop" / "__init__.py").write_text("")
    (src / "data" / "a.py").write_text("from sparseseg.loop.b import _hidden\n")
    (src / "loop" / "b.py").write_text("def f():\n    import sparseseg.data.a\n"
                                     "if TYPE_CHECKING:\n    from sparseseg.cli import app\n")
    known = {"sparseseg", "sparseseg.data", "sparseseg.loop", "sparseseg.data.a", "sparseseg.loop.b"}
    got = _imports(src / "data" / "a.py", "sparseseg.data.a", known)
    assert got == [("sparseseg.loop.b", ["_hidden"], 1)]
    assert _stage("sparseseg.data.a") < _stage("sparseseg.loop.b")
    assert _imports(src / "loop" / "b.py", "sparseseg.loop.b", known) == [("sparseseg.data.a", [], 2)]
    with pytest.raises(AssertionError, match="belongs to no stage"):
        _stage("sparseseg_other.x")
