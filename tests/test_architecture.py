"""The shape of the code, read from the source with ``ast`` so it stays true: stages are leaves over the library.

* a module in ``stages/`` imports ``pipeline`` modules and never another stage;
* a module in ``pipeline/`` never imports ``stages``;
* every stage module reads only the config sections and keys its spec declares (its hash inputs), where it
  reads them directly as ``cfg.<section>.<key>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.stage import STAGES

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((REPO / "stages").glob("*.py")), ids=lambda p: p.name)
def test_a_stage_imports_the_library_and_no_other_stage(path):
    stages = sorted(m for m in _imports(path) if m == "stages" or m.startswith("stages."))
    assert stages == [], f"{path.name} imports {stages}: stages hand each other paths, not code"


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_a_stage(path):
    stages = sorted(m for m in _imports(path) if m == "stages" or m.startswith("stages."))
    assert stages == [], f"{path.relative_to(REPO)} imports {stages}"


def _config_reads(path: Path) -> set[str]:
    """``section.key`` of every ``cfg.<section>.<key>`` / ``ctx.cfg.<section>.<key>`` in a file."""
    from pipeline.config import valid_keys

    keys = set(valid_keys())
    reads = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            owner = node.value.value
            is_cfg = (isinstance(owner, ast.Name) and owner.id == "cfg") or (
                isinstance(owner, ast.Attribute) and owner.attr == "cfg")
            if is_cfg and f"{node.value.attr}.{node.attr}" in keys:
                reads.add(f"{node.value.attr}.{node.attr}")
    return reads


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_reads_only_the_config_it_declares(name):
    spec = STAGES[name]
    path = REPO / "stages" / f"{spec.entry.split(':')[0].split('.')[-1]}.py"
    from pipeline.config import PipelineConfig, load_config

    declared = spec.reads + (spec.reads_if(load_config(None, ["tune.mode=compare"])) if spec.reads_if else ())
    covered = [r for r in _config_reads(path) if not any(r == k or r.startswith(k + ".") for k in declared)]
    assert covered == [], f"stage {name} reads {covered} without declaring them: a change would not rerun it"
    assert isinstance(PipelineConfig(), PipelineConfig)
