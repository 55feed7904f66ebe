"""Every name a benchmark takes from keeper's packages exists.

Benchmarks run by hand, now and then, and most are too long for the suite: a rename in
keeper_train or keeper_core broke two of them unnoticed (``embed._mtime`` in pick.py's profile,
``train_head.controller_poll`` in train_head.py: both moved), which showed only when a session
ran them. This reads each script's imports from ``keeper_*`` and every ``module.name`` it uses
on a keeper module it imported, and checks them against the installed packages.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py")) + sorted(BENCHMARKS.glob("*/*.py"))


def _missing(script: Path) -> list[str]:
    tree = ast.parse(script.read_text(), filename=str(script))
    modules: dict[str, ModuleType] = {}
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keeper"):
            assert node.module is not None
            parent = importlib.import_module(node.module)
            for alias in node.names:
                bound = alias.asname or alias.name
                try:
                    modules[bound] = importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    if not hasattr(parent, alias.name):
                        missing.append(f"line {node.lineno}: {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keeper"):
                    importlib.import_module(alias.name)
                    # ``import a.b as c`` binds a.b; ``import a.b`` binds a
                    name = alias.name if alias.asname else alias.name.split(".")[0]
                    modules[alias.asname or name] = importlib.import_module(name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and not hasattr(modules[node.value.id], node.attr)
        ):
            missing.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_every_keeper_name_a_benchmark_uses_exists(script: Path) -> None:
    assert _missing(script) == []


def test_the_check_finds_a_renamed_function(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        "from keeper_train.jobs import embed\n"
        "from keeper_core.handback import no_such_function\n"
        "embed.file_mtime('x')\n"
        "embed._mtime('x')\n"
    )
    assert _missing(script) == [
        "line 2: keeper_core.handback.no_such_function",
        "line 4: embed._mtime",
    ]
