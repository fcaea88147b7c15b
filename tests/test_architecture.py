"""The layering docs/architecture.md describes, checked: scaffold_lib imports only go down (core <- store <- data <-
student <- evaluation <- top-level modules), the library never imports Dagster, and pipelines/ holds no stage logic
(no warehouse writes, no registry calls: those are the stage functions' job); every package imported is declared;
functions and modules stay short enough to read."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "scaffold_lib"
LAYERS = {"core": 0, "store": 1, "data": 2, "student": 3, "evaluation": 4}
TOP = 5  # serving, config, checks, stages, runner, experiment, cli


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_library_imports_only_go_down_the_layers():
    upward = []
    for path in LIB.rglob("*.py"):
        own = layer_of(module_name(path))
        for target in imports(path):
            if target.startswith("scaffold_lib.") and layer_of(target) > own:
                upward.append(f"{module_name(path)} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_dagster():
    """(dagster_pipes, the protocol a launched training job speaks back to Dagster, is the one exception: it is a
    small standalone package, and only the torchrun entry point uses it, when Dagster started it.)"""
    offenders = [
        module_name(p)
        for p in LIB.rglob("*.py")
        if any((t == "dagster" or t.startswith(("dagster.", "dagster_"))) and t != "dagster_pipes" for t in imports(p))
    ]
    assert not offenders


def distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    """A package scaffold_lib or pipelines imports is in pyproject's dependencies (or an optional group), not merely
    brought in by another one that may drop it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for group in project["optional-dependencies"].values() for s in group]
    declared = {distribution(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs}
    providers = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in [*LIB.rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]:
        for top in {target.split(".")[0] for target in imports(path)}:
            if top in sys.stdlib_module_names or top in {"scaffold_lib", "pipelines"}:
                continue
            if not {distribution(d) for d in providers.get(top, [top])} & declared:
                undeclared.add(f"{module_name(path)} imports {top}")
    assert not undeclared, "\n".join(sorted(undeclared))


WRITES = (
    "insert_new",
    "upsert",
    "register_model",
    "log_scores",
    "promote_if_better",
    "set_champion",
    "start_run",
    "log_metrics",
)


def test_pipelines_only_wire():
    """No warehouse writes or registry calls under pipelines/: every asset calls a stage function for those."""
    offenders = []
    for path in (REPO / "pipelines").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in WRITES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    assert not offenders, "\n".join(offenders)


FUNCTION_LINES, MODULE_LINES = 80, 420
LONG_BECAUSE = "Longer than 80 lines because"  # how a longer function's docstring gives its reason


def test_functions_are_short_or_say_why_they_are_not():
    """Every function and method in scaffold_lib/ and pipelines/, from `def` to its last line (docstring and nested
    functions included), is at most 80 lines, unless its docstring says "Longer than 80 lines because …"."""
    long = []
    for path in [*LIB.rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES and LONG_BECAUSE not in " ".join((ast.get_docstring(node) or "").split()):
                long.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} has {lines} lines and no reason")
    assert not long, "\n".join(long)


def test_library_modules_are_short():
    long = [
        f"{path.relative_to(REPO)} has {lines} lines"
        for path in LIB.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MODULE_LINES
    ]
    assert not long, "\n".join(long)
