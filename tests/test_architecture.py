"""STYLE.md: dependencies point one way, cli -> train -> {rig, profile, evaluate, data, model} -> config, and
model/ never imports DeepSpeed. Read from the source, so a stray import fails here."""

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
    "train": ("rigtrain.cli",),
}


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
