"""bench/run.py: rerunning some benchmarks replaces only their sections of the results file; a full run starts afresh.
The benchmarks themselves are replaced by a stand-in here (they take minutes and their timings are not tested)."""
from __future__ import annotations

import sys

import pytest

from bench import run

OLD = ("# Benchmark results\n\nan old header\n\n"
       "## search\n\n`python bench/bench_search.py` (173 s)\n\n```\nsearch rows\n```\n\n"
       "## help\n\n`python bench/bench_help.py` (60 s)\n\n```\nhelp rows\n```\n\n"
       "## retrieval\n\n`python bench/bench_retrieval.py` (151 s)\n\n```\nold retrieval rows\n```\n")


def test_sections_are_found_by_their_command_line():
    sections = run.sections_of(OLD)
    assert list(sections) == ["bench_search.py", "bench_help.py", "bench_retrieval.py"]
    assert sections["bench_help.py"] == "## help\n\n`python bench/bench_help.py` (60 s)\n\n```\nhelp rows\n```\n"


def test_fresh_sections_replace_theirs_and_keep_the_others_in_benchmark_order():
    fresh = {"bench_retrieval.py": "## retrieval\n\n`python bench/bench_retrieval.py` (9 s)\n\n```\nnew\n```\n"}
    text = run.results_text(OLD, fresh)
    assert text.startswith(run.HEADER) and "an old header" not in text
    assert "old retrieval rows" not in text and "\nnew\n" in text
    assert text.index("help rows") < text.index("\nnew\n") < text.index("search rows")  # BENCHMARKS order
    assert run.sections_of(text) == {**run.sections_of(OLD), **fresh}


@pytest.fixture()
def bench_dir(tmp_path, monkeypatch):
    """run.py pointed at a folder of stand-in benchmarks whose 'run' prints one row and, for bench_help, fails."""
    for name in run.BENCHMARKS:
        (tmp_path / name).write_text(f'"""Benchmark: title of {name}.\n\nmore\n"""\n', encoding="utf-8")
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "run", lambda script, flags: (int(script.name == "bench_help.py"), 2.0,
                                                            f"machine: stand-in\nrow of {script.name}\n"))
    return tmp_path


def main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["run.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        run.main()
    return exit_.value.code


def test_named_run_keeps_the_rest_of_the_file(bench_dir, monkeypatch):
    (bench_dir / "RESULTS.md").write_text(OLD, encoding="utf-8")
    assert main(monkeypatch, "bench_retrieval.py") == 0
    sections = run.sections_of((bench_dir / "RESULTS.md").read_text(encoding="utf-8"))
    assert list(sections) == ["bench_help.py", "bench_retrieval.py", "bench_search.py"]
    assert sections["bench_search.py"] == run.sections_of(OLD)["bench_search.py"]
    assert sections["bench_retrieval.py"].startswith("## title of bench_retrieval.py.\n\n"
                                                     "`python bench/bench_retrieval.py` (2 s; started ")
    assert "row of bench_retrieval.py" in sections["bench_retrieval.py"]


def test_full_run_starts_afresh_and_reports_a_failure(bench_dir, monkeypatch):
    (bench_dir / "RESULTS.md").write_text(OLD, encoding="utf-8")
    assert main(monkeypatch) == 1
    text = (bench_dir / "RESULTS.md").read_text(encoding="utf-8")
    assert list(run.sections_of(text)) == run.BENCHMARKS and "old retrieval rows" not in text
    assert "`python bench/bench_help.py` (FAILED with exit status 1 after 2 s; started " in text


def test_unknown_name_is_a_usage_error_and_writes_nothing(bench_dir, monkeypatch, capsys):
    assert main(monkeypatch, "bench_nope.py") == 2
    assert "no benchmark named bench_nope.py" in capsys.readouterr().err
    assert not (bench_dir / "RESULTS.md").exists()
