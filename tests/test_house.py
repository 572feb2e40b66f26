"""The house rules of ../shared/DESIGN.md that a reader relies on, checked on the source itself."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
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


def test_models_import_nothing_from_misc():
    """One direction between the packages: misc/ builds on models/, never the other way round."""
    for path in ROOT.glob("models/*.py"):
        assert not {name for name in imported_modules(path) if name.split(".")[0] == "misc"}, path.name


def argument_parsing(path: Path) -> set[str]:
    """What in a file builds or reads command-line arguments: argparse's parser and its calls, and parameters typed
    as an argparse namespace (reading the namespace the original release pickled is not parsing)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in ("ArgumentParser", "add_argument", "parse_args"):
            found.add(node.attr)
        if isinstance(node, ast.arg) and node.annotation is not None and "Namespace" in ast.unparse(node.annotation):
            found.add(f"parameter {node.arg}: {ast.unparse(node.annotation)}")
    return found


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: str(path.relative_to(ROOT)))
def test_only_misc_cli_parses_arguments(path):
    if path != ROOT / "misc" / "cli.py":
        assert not argument_parsing(path)


@pytest.mark.parametrize("cli", CLIS)
def test_clis_are_thin(cli):
    assert len((ROOT / f"{cli}.py").read_text(encoding="utf-8").splitlines()) < 200


def arch_checks(path: Path) -> int:
    """Comparisons of a model's ``arch`` with a system's name (``x.arch == "matchmap"``, ``!=`` too)."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            count += any(isinstance(side, ast.Attribute) and side.attr == "arch" for side in sides)
    return count


def test_code_outside_models_rarely_asks_which_system_it_holds(tmp_path):
    """Each model owns its system (models/system.py): at most two places outside models/ compare ``arch``."""
    probe = tmp_path / "probe.py"  # the counter itself: two comparisons, one of them reversed, and two non-checks
    probe.write_text('a = cfg.arch == "dsve"\nb = "matchmap" != m.config.arch\nc = cfg.arch\nd = x.trunk == "y"\n')
    assert arch_checks(probe) == 2
    outside = [*ROOT.glob("*.py"), *ROOT.glob("misc/**/*.py")]
    found = {str(path.relative_to(ROOT)): arch_checks(path) for path in outside if arch_checks(path)}
    assert sum(found.values()) <= 2, found


GLOBAL_STATE = """
import importlib, logging, os, sys, warnings
import faiss, gensim, inflect, matplotlib, nltk, numpy, pyarrow, pycocotools.coco, safetensors, skimage, sru, timm
import torch, torch.utils.tensorboard, torchvision, tqdm, visual_genome  # theirs: imported before ours

def state():
    loggers = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return dict(os.environ), [repr(entry) for entry in warnings.filters], loggers

for name in sys.argv[1:]:
    environment, filters, levels = state()
    importlib.import_module(name)
    after_environment, after_filters, after_levels = state()
    changed = [what for what, same in (
        ("environment", environment == after_environment), ("warning filters", filters == after_filters),
        ("log levels", all(after_levels.get(logger, level) == level for logger, level in levels.items())
         and all(level == logging.NOTSET for logger, level in after_levels.items() if logger not in levels)))
        if not same]
    if changed:
        print(name, changed)
"""


@pytest.mark.slow
def test_importing_the_library_changes_no_global_state():
    """Importing any library module leaves the environment, the warning filters and the log levels as they were
    (the extension folder is the CLIs' and the Makefile's to set, not an import's)."""
    modules = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for path in LIBRARY if path.name != "webapp.py"]  # gradio is the web page's: it registers its own
    result = subprocess.run([sys.executable, "-c", GLOBAL_STATE, *modules], cwd=ROOT, capture_output=True,
                            text=True, check=True,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")})
    assert result.stdout == ""
