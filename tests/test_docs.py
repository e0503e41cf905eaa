"""Figures in the README that come from the code are regenerated from it, never typed by hand:
this fails when they no longer match. And every pointer to a section of the README or of
docs/ leads to one that exists."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_flops_table_is_what_the_code_counts():
    flops = _bench("flops")
    current = flops.current_readme_block((ROOT / "README.md").read_text())
    assert current is not None, "README.md lost its flops-table markers"
    assert current == flops.readme_block(flops.measure()), "run `python bench/flops.py --readme`"


def _headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def test_every_pointer_to_a_section_names_one_that_exists():
    """`docs/planner.md, "The memory model"`, `README, "Tuning"` or `see "Planning"` in the
    README, docs/, the code, the benches and the tests: a reader following one finds that
    heading (its first words are enough: "The decisions" finds "The decisions, in order")."""
    readme = ROOT / "README.md"
    sources = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    sources += [*sorted((ROOT / "rigtrain").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py"))]
    sources += sorted((ROOT / "tests").glob("*.py"))
    to_docs = re.compile(r"(docs/[a-z-]+\.md),? \(?\"([^\"]+)\"")
    to_readme = re.compile(r"README(?:'s|,)? \(?\"([^\"]+)\"")
    to_own_section = re.compile(r"[Ss]ee \"([^\"]+)\"")
    pointers, broken = 0, []
    for source in sources:
        if source == Path(__file__):
            continue  # the examples above
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", source.read_text())  # a pointer may wrap, in a comment too
        found = [(ROOT / doc, title) for doc, title in to_docs.findall(text)]
        found += [(readme, title) for title in to_readme.findall(text)]
        if source == readme:
            found += [(readme, title) for title in to_own_section.findall(text)]
        for doc, title in found:
            pointers += 1
            if not doc.exists() or not any(heading.startswith(title) for heading in _headings(doc)):
                broken.append(f'{source.relative_to(ROOT)}: {doc.relative_to(ROOT)}, "{title}"')
    assert pointers >= 30  # the patterns still find the pointers
    assert not broken, broken


def _readme_examples(command_prefix: str) -> list[tuple[list[str], list[str]]]:
    """Each README code block that starts with `$ COMMAND ...`: (its arguments, the lines
    shown under it)."""
    examples, block = [], None
    for line in (ROOT / "README.md").read_text().split("\n"):
        if line.startswith("```"):
            if block and block[0].startswith(f"$ {command_prefix}"):
                examples.append((block[0].split()[2:], block[1:]))
            block = [] if block is None else None
        elif block is not None:
            block.append(line)
    return examples


def test_the_readme_plans_are_what_rigtrain_rig_prints_today():
    """The README's `rigtrain rig --rig FILE` examples are its output for that rig file, word
    for word and every whole number (micro-batch, accumulation, watts, warnings); the GiB
    figures (two decimals) may move with torch's version, which measures the step."""
    from conftest import run_cli

    examples = _readme_examples("rigtrain rig --rig")
    assert examples, "the README lost its `$ rigtrain rig --rig` example"
    figures = re.compile(r"\d+\.\d\d\b")
    for arguments, shown in examples:
        printed = run_cli(*arguments, cwd=ROOT, timeout=300)
        assert printed.returncode == 0, printed.stderr
        today = [figures.sub("#.##", line) for line in printed.stdout.rstrip("\n").split("\n")]
        assert [figures.sub("#.##", line) for line in shown] == today, (
            f"README's `rigtrain {' '.join(arguments)}` is out of date: paste its output again"
        )
