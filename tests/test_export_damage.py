"""Export folders handed from one person to another are input like any file (issue 27): a damaged or mismatched
file is one line naming it, found from the headers before the model is built or anything large is allocated; the
files of an export follow the umask like every other output."""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
from pathlib import Path

import pytest

from misc.errors import UserError
from misc.store import checkpoint
from tests.test_export import data_root, trained  # noqa: F401  (fixtures: a tiny trained checkpoint)


@pytest.fixture
def exported(trained: Path, tmp_path: Path) -> Path:  # noqa: F811
    out = tmp_path / "exported"
    checkpoint.export_file(trained, out)
    return out


def edit_config(folder: Path, section: str, key: str, value: object) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"][section][key] = value
    (folder / "config.json").write_text(json.dumps(meta))


def refused(folder: Path) -> str:
    with pytest.raises(UserError) as error:
        checkpoint.load(folder)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_config_that_is_not_json_names_the_file(exported):
    (exported / "config.json").write_text("{not json")
    assert refused(exported).startswith(f"{exported / 'config.json'} is not a readable export configuration")


def test_missing_or_damaged_weights_name_the_file(exported):
    weights = exported / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])  # cut short: the header describes data that is not there
    assert refused(exported).startswith(f"{weights} is damaged")
    weights.write_bytes(struct.pack("<Q", 2 ** 40) + data[8:])  # a header length of 1 TiB
    assert refused(exported).startswith(f"{weights} is damaged (ValueError: its header claims {2 ** 40} bytes")
    weights.unlink()
    assert refused(exported).startswith(f"{weights} is damaged")


def test_a_config_that_does_not_fit_its_weights_names_the_tensor_and_both_shapes(exported):
    edit_config(exported, "model", "embed_dim", 24)  # the weights are 16-d
    assert refused(exported) == (f"{exported / 'config.json'} does not fit {exported / 'model.safetensors'}: "
                                 f"model.embed_dim = 24 makes tensor image.proj.weight 24 long on axis 0, but it is "
                                 f"[16, 16] there")


def test_absurd_dimensions_are_refused_before_anything_large_is_allocated(exported):
    edit_config(exported, "model", "embed_dim", 2 ** 40)  # 4 TB for one SRU layer, were it built
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    message = refused(exported)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert "does not fit" in message and str(2 ** 40) in message
    assert grown < 1_000_000  # less than 1 GB more at the peak (the tensors' headers, never their data)


def test_word_vectors_that_do_not_match_their_vocabulary_are_one_line(exported):
    with (exported / "vocab.txt").open("a", encoding="utf-8") as vocab:
        vocab.write("extra\n")
    assert refused(exported).startswith(f"{exported / 'words.safetensors'} holds 7 vectors of 8 dimensions but "
                                        f"vocab.txt has 8 words")


def test_every_file_of_an_export_follows_the_umask(trained, tmp_path):  # noqa: F811
    old = os.umask(0o022)
    try:
        out = tmp_path / "exported"
        checkpoint.export_file(trained, out)
    finally:
        os.umask(old)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644), modes
    copy = shutil.copytree(out, tmp_path / "copy")
    assert checkpoint.load(copy)["config"]["model"]["embed_dim"] == 16  # an intact copy still loads
