"""What every CLI shares (misc/cli.py): checked numbers and one-line errors for user mistakes."""
from __future__ import annotations

import argparse
import json

import pytest

import localize
import search
from misc import cli


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "many"])
def test_positive_int_refuses_what_is_not_a_whole_number_above_zero(text):
    with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1"):
        cli.positive_int(text)


def test_accepted_numbers_come_back_typed():
    assert cli.positive_int("7") == 7


@pytest.mark.parametrize("module, argv, flag", [
    (localize, ["-p", "m.pth.tar", "-i", "x.jpg", "-t", "a dog", "--size", "0"], "--size"),
    (localize, ["-p", "m.pth.tar", "-i", "x.jpg", "-t", "a dog", "--k", "-5"], "--k"),
    (search, ["--images", "f.npz", "-q", "a dog", "-k", "0"], "-k"),
    (search, ["--images", "f.npz", "-q", "a dog", "--nprobe", "x"], "--nprobe"),
])
def test_a_bad_number_is_one_line_naming_the_flag(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: argument {flag}") and "--help" in error


def test_an_undecodable_image_is_one_line_naming_it(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(SystemExit) as exit_:
        cli.run(localize.main, ["-p", str(tmp_path / "m.pth.tar"), "-i", str(bomb), "-t", "a dog"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and error.count("\n") == 1 and error.startswith(f"error: {bomb}: cannot read it")


def test_results_are_merged_into_one_file_with_nested_keys(tmp_path):
    from misc.store.files import update_results
    path = tmp_path / "results.json"
    update_results(path, "models.dsve.retrieval", {"rsum": 1.0})
    update_results(path, "models.dsve.pointing_game", {"accuracy": 50.0})
    update_results(path, "models.matchmap.retrieval", {"rsum": 2.0})
    update_results(path, "note", "kept")
    assert json.loads(path.read_text()) == {"models": {"dsve": {"retrieval": {"rsum": 1.0},
                                                                "pointing_game": {"accuracy": 50.0}},
                                                       "matchmap": {"retrieval": {"rsum": 2.0}}}, "note": "kept"}
