"""The house rules of ../shared/DESIGN.md that a reader relies on, checked on the source itself."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIS = sorted(path.stem for path in ROOT.glob("*.py"))
LIBRARY = sorted([*ROOT.glob("misc/**/*.py"), *ROOT.glob("models/*.py")])


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as dotted names (``from misc import demo`` gives misc.data.demo)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("maths", ["misc/eval/localization.py", "misc/eval/segmentation.py", "misc/train/losses.py",
                                   "models/weldon.py"])
def test_maths_modules_import_no_io_layer(maths):
    forbidden = {"misc.store.checkpoint", "misc.data.demo", "misc.store.files", "misc.inference", "misc.cli"}
    assert not imported_modules(ROOT / maths) & forbidden


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: str(path.relative_to(ROOT)))
def test_library_code_imports_no_cli(path):
    # the console scripts run the top-level scripts through misc.cli.run
    allowed = {"misc.cli", "misc.cli.run"} if path == ROOT / "misc" / "commands.py" else set()
    assert not (imported_modules(path) - allowed) & ({"misc.cli"} | set(CLIS))


@pytest.mark.parametrize("cli", CLIS)
def test_no_cli_imports_another_cli(cli):
    assert not imported_modules(ROOT / f"{cli}.py") & (set(CLIS) - {cli})


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: str(path.relative_to(ROOT)))
def test_library_files_stay_short_enough_to_read_in_one_sitting(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 350
