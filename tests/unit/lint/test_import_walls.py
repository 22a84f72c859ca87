"""The walls of docs/architecture.md hold, and `make lint` (lint-imports) fails when one is broken.

The packages are copied to a temporary tree so a forbidden import can be added without touching the
checkout; the unmodified copy must pass, so the failure comes from that one import alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("launcher", "experiments", "trainer", "services")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(tree / ".importlinter"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("walls")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", out / ".importlinter")
    return out


def test_the_tree_keeps_every_contract(tree):
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("services/teacher/scorer.py", "import trainer.losses", "Service processes never import"),
        ("services/common/config.py", "import services.worker.loop", "services.common imports no server"),
        ("trainer/losses.py", "import services.common.experience", "loss and head maths import nothing"),
        ("trainer/data.py", "import experiments.report", "Layers"),
        ("services/rollout/app.py", "import services.teacher.batcher", "servers do not import each other"),
    ],
)
def test_a_forbidden_import_breaks_lint(tree, module, line, contract):
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # deliberately forbidden\n")
    try:
        result = lint(tree)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    report = result.stdout.split("Broken contracts", 1)[1]
    assert contract in report and line.split()[-1] in report, result.stdout
