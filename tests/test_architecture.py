"""docs/architecture.md: dependencies point one way, cli -> {tune, sweep} -> train -> {rig, profile,
evaluate, data, model} -> config; model/ never imports DeepSpeed; and no module imports, however
indirectly, a module that imports it. Read from the source (imports inside functions too), so a
stray import fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rigtrain"

# part -> what it must never import
FORBIDDEN = {
    "profile": ("rigtrain.model", "rigtrain.data", "rigtrain.train", "rigtrain.rig", "rigtrain.cli", "deepspeed"),
    "rig": ("rigtrain.model", "rigtrain.data", "rigtrain.train", "rigtrain.cli", "deepspeed"),
    "config": ("rigtrain.model", "rigtrain.data", "rigtrain.train", "rigtrain.cli", "torch", "deepspeed"),
    "model": ("rigtrain.data", "rigtrain.train", "rigtrain.cli", "deepspeed"),
    "data": ("rigtrain.model", "rigtrain.train", "rigtrain.cli", "deepspeed"),
    "evaluate": ("rigtrain.train", "rigtrain.rig", "rigtrain.profile", "rigtrain.cli", "deepspeed"),
    "train": ("rigtrain.cli", "rigtrain.tune", "rigtrain.sweep"),
    "tune": ("rigtrain.cli", "rigtrain.sweep"),
    "sweep": ("rigtrain.cli", "rigtrain.tune"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_dependencies_point_down(part):
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for name in imports_of(path):
            bad = [f for f in FORBIDDEN[part] if name == f or name.startswith(f + ".")]
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {name}"


def rigtrain_modules_imported_by(path: Path) -> set[str]:
    """The modules of the package that this file imports (`from a.b import c` is a.b.c when
    c is a module, else a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import each other round a loop (Tarjan's strongly
    connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_cycle_finder_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    # A package's __init__ importing its own modules is not a loop through them.
    graph = {
        name: {m for m in rigtrain_modules_imported_by(path) if m != name and not name.startswith(m + ".")}
        for name, path in MODULES.items()
    }
    assert import_cycles(graph) == []


def test_files_and_functions_stay_short():
    """docs/architecture.md: one idea per file. A file past 400 lines or a function past 80
    holds more than one; split it along its ideas (as rig/plan.py and train/trainer.py were)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: "
                    f"{node.end_lineno - node.lineno + 1} lines"
                )
    assert long == []


def test_imports_inside_functions_say_why():
    """An import inside a function is for a heavy or optional dependency (or one that must
    wait, like torch after OMP_NUM_THREADS), and says which on its line or the one above.
    The command-line modules import each command's work inside it by rule (their docstrings
    say so: `rigtrain --help` and bad input answer at once)."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.startswith("cli"):
            continue
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    if not said:
                        silent.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert silent == [], "move these imports to the top of the module, or say why they wait: " + ", ".join(silent)


def defined_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level (what `from it import NAME` finds)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # names defined under a guard count too
            names |= defined_names_in(node)
    return names


def defined_names_in(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
            found.add(child.name)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            found |= {(a.asname or a.name).split(".")[0] for a in child.names}
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            found.add(child.id)
    return found


def test_every_name_the_benchmarks_take_from_rigtrain_is_still_there():
    """bench/ scripts run by hand, not in the suite: a name removed or renamed in rigtrain
    (bench/motion.py's read_run, bench/gradient_comm.py's free_port) broke them unseen."""
    missing = []
    for script in sorted((PACKAGE.parent / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rigtrain")):
                continue
            module = MODULES.get(node.module)
            assert module is not None, f"{script.name}: no module {node.module}"
            for alias in node.names:
                if alias.name not in defined_names(module) and f"{node.module}.{alias.name}" not in MODULES:
                    missing.append(f"{script.relative_to(PACKAGE.parent)}: {node.module}.{alias.name}")
    assert not missing, missing
