"""The original release's files: its joint model ``model.pth.tar`` and its ImageNet classification network, built
here in exactly their layout (DataParallel prefixes, a pickled argparse.Namespace, ``best_rec`` a numpy float64,
the legacy torch file format of torch 1.0) with random weights and small dimensions, and checked against the paper's
equations evaluated directly on the raw tensors."""
from __future__ import annotations

import argparse
import pickletools
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from gensim.models import KeyedVectors
from torch import nn

import checkpoint as checkpoint_command
from misc.store import checkpoint
from misc import cli
from misc.errors import UserError
from models.config import ModelConfig
from misc.store.original import convert_original, infer_trunk, map_state, original_key
from misc.data.words import ORIGINAL_TEXT, TextOptions, load_word_vectors
from models.joint import build_model
from tests.conftest import ROOT, load_model, run_cli, run_in_process

MAPS, EMBED, WORD, LAYERS, TRUNK = 32, 24, 64, 2, "resnet18"  # WORD = the demo world's word vectors
PREFIX = "img_emb.module.base_layer."
CLI_FLAGS = ["--workers", "0", "--no-progress", "--device", "cpu"]


def original_trunk(name: str) -> nn.Sequential:
    """The original's trunk: a torchvision ResNet's children without avgpool and fc, as a Sequential."""
    return nn.Sequential(*list(torchvision.models.get_model(name, weights=None).children())[:-2])


def sru_layer(inputs: int, hidden: int) -> dict[str, torch.Tensor]:
    """Raw tensors of one SRU v1 layer: U has 4 column groups when a skip projection is needed, else 3."""
    groups = 4 if inputs != hidden else 3
    return {"weight": torch.randn(inputs, hidden * groups) / inputs ** 0.5, "weight_c": torch.randn(2 * hidden) / 2,
            "bias": torch.randn(2 * hidden) / 2, "scale_x": torch.ones(1)}


def original_state(seed: int, counters: bool) -> dict[str, torch.Tensor]:
    """A joint model's state dict in the original layout, random weights (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    state = {}
    for key, value in original_trunk(TRUNK).state_dict().items():
        if key.endswith("num_batches_tracked") and not counters:
            continue  # torch < 0.4.1 saved none
        if key.endswith(("running_mean", "bias")):
            value = torch.randn_like(value) / 10
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight")) or "downsample.1.weight" in key:
            value = torch.rand_like(value) + 0.5
        state[f"{PREFIX}0.{key}"] = value
    state[f"{PREFIX}1.weight"] = torch.randn(MAPS, 512, 1, 1) / 512 ** 0.5
    state[f"{PREFIX}1.bias"] = torch.randn(MAPS) / 10
    for layer in range(LAYERS):
        for name, value in sru_layer(WORD if layer == 0 else EMBED, EMBED).items():
            state[f"cap_emb.rnn.rnn_lst.{layer}.{name}"] = value
    state["fc.module.weight"] = torch.randn(EMBED, MAPS) / MAPS ** 0.5
    state["fc.module.bias"] = torch.randn(EMBED) / 10
    return state


@dataclass
class Original:
    model: Path  # model.pth.tar, legacy torch format, no num_batches_tracked
    model_zip: Path  # the same weights in the zip format, num_batches_tracked included
    classification: Path  # pretrained_classif_*.pth.tar
    words: Path  # utable.npy beside dictionary.txt
    vocabulary: list[str]


NUMPY2_SCALAR, NUMPY1_SCALAR = b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"


def save_original(path: Path, state: dict[str, torch.Tensor], zip_format: bool) -> Path:
    """The legacy file is the released one: pickled under numpy 1, whose scalar constructor is
    ``numpy.core.multiarray.scalar`` (numpy 2 writes ``numpy._core``; the pickle's name is rewritten)."""
    optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    args = argparse.Namespace(sru=LAYERS, dimemb=EMBED, name="tiny", batch_size=160, lr=0.001, lrd=0.5, fepoch=8,
                              max_epoch=20)
    recalls = np.array([[72.5, 91.0, 96.5], [49.0, 52.5, 59.0]])  # R@1,5,10 both ways; the original sums numpy
    torch.save({"epoch": 12, "state_dict": state, "best_rec": sum(recalls[0]) + sum(recalls[1]), "args_dict": args,
                "optimizer": optimizer}, path, _use_new_zipfile_serialization=zip_format)
    if not zip_format:
        written = path.read_bytes()
        assert written.count(NUMPY2_SCALAR) == 1
        path.write_bytes(written.replace(NUMPY2_SCALAR, NUMPY1_SCALAR))
    return path


def pickled_globals(path: Path) -> set[str]:
    """The globals the pickle of a zip-format torch file names, as "module name"."""
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    return {str(argument) for opcode, argument, _ in pickletools.genops(pickled) if opcode.name == "GLOBAL"}


@pytest.fixture(scope="module")
def original(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Original:
    folder = tmp_path_factory.mktemp("original")
    model = save_original(folder / "model.pth.tar", original_state(0, counters=False), zip_format=False)
    model_zip = save_original(folder / "model_zip.pth.tar", original_state(0, counters=True), zip_format=True)
    torch.manual_seed(1)
    classification = {f"base_layer.{key}": value for key, value in original_trunk(TRUNK).state_dict().items()}
    classification |= {"spaConv.weight": torch.randn(MAPS, 512, 1, 1), "spaConv.bias": torch.randn(MAPS),
                       "fc.weight": torch.randn(1000, MAPS), "fc.bias": torch.randn(1000)}
    torch.save({"state_dict": classification}, folder / "pretrained_classif.pth.tar",
               _use_new_zipfile_serialization=False)
    # A skip-thought style table: the demo world's (lower-case) words, two capitalised ones and UNK.
    demo_words = KeyedVectors.load_word2vec_format(str(tiny_world / "words" / "demo_word2vec.bin"), binary=True)
    vocabulary = [*demo_words.key_to_index, "A", "Two", "UNK"]
    (folder / "words").mkdir()
    np.save(folder / "words" / "utable.npy", np.random.default_rng(2).normal(size=(len(vocabulary), WORD))
            .astype(np.float32))
    (folder / "words" / "dictionary.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    return Original(model, model_zip, folder / "pretrained_classif.pth.tar", folder / "words" / "utable.npy",
                    vocabulary)


def raw(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path)["state_dict"]


def test_the_original_files_pickle_numpy_scalars_as_released(original):
    assert NUMPY1_SCALAR in original.model.read_bytes()
    assert {"numpy._core.multiarray scalar", "numpy dtype", "argparse Namespace"} <= pickled_globals(original.model_zip)
    for path in (original.model, original.model_zip):
        best = checkpoint.read(path)["best_rec"]
        assert type(best) is np.float64 and best == 420.5


def test_a_checkpoint_that_runs_code_is_refused(original, tmp_path):
    class WritesMarker:
        def __reduce__(self):
            return exec, (f"open({str(tmp_path / 'ran.txt')!r}, 'w').write('ran')",)

    crafted = tmp_path / "model.pth.tar"
    torch.save({**checkpoint.read(original.model_zip), "best_rec": WritesMarker()}, crafted)
    with pytest.raises(UserError, match=r"model\.pth\.tar holds Python objects \(\S*exec\), not plain data"):
        checkpoint.load(crafted)
    assert not (tmp_path / "ran.txt").exists()


# --------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("which", ["model", "model_zip"])
def test_conversion_maps_every_key_and_infers_the_config(original, which):
    converted = checkpoint.load(getattr(original, which))
    assert converted["format"] == "dsve-loc" and converted["epoch"] == 12
    assert converted["config"]["model"] == asdict(ModelConfig(trunk=TRUNK, maps_dim=MAPS, embed_dim=EMBED,
                                                              word_dim=WORD, sru_layers=LAYERS, weldon_k=15))
    assert converted["config"]["text"] == {"first_sentence": True, "lowercase_fallback": False}
    assert converted["config"]["train"]["batch_size"] == 160 and converted["config"]["word_vectors"] is None
    assert converted["origin"]["args"]["fepoch"] == 8 and converted["origin"]["best_rec"] == 420.5
    assert type(converted["origin"]["best_rec"]) is float  # plain data, not the pickled numpy scalar
    expected = build_model(converted["config"]["model"]).state_dict()
    assert converted["model"].keys() == expected.keys()
    assert all(converted["model"][key].shape == value.shape for key, value in expected.items())
    source = raw(getattr(original, which))
    assert sum(not key.endswith("num_batches_tracked") for key in converted["model"]) == \
        sum(not key.endswith("num_batches_tracked") for key in source)  # every original key, each used once
    torch.testing.assert_close(converted["model"]["image.trunk.layer3.1.conv2.weight"],
                               source[f"{PREFIX}0.6.1.conv2.weight"])
    torch.testing.assert_close(converted["model"]["text.rnn.rnn_lst.1.weight_c"],
                               source["cap_emb.rnn.rnn_lst.1.weight_c"])


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_trunk_is_recognised_from_its_block_counts(name):
    with torch.device("meta"):
        trunk = original_trunk(name).state_dict()
    mapped = map_state({f"{PREFIX}0.{key}": value for key, value in trunk.items()}, original_key, "x")
    assert infer_trunk(mapped, "x") == name


def test_the_papers_resnet152_layout_maps_completely_onto_the_paper_config():
    """Key names and shapes only (meta tensors): ResNet-152, D' = d = 2400, 620-d words, 4 SRU layers."""
    with torch.device("meta"):
        state = {f"{PREFIX}0.{key}": value for key, value in original_trunk("resnet152").state_dict().items()
                 if not key.endswith("num_batches_tracked")}
        state |= {f"{PREFIX}1.weight": torch.empty(2400, 2048, 1, 1), f"{PREFIX}1.bias": torch.empty(2400),
                  "fc.module.weight": torch.empty(2400, 2400), "fc.module.bias": torch.empty(2400)}
        for layer, (inputs, columns) in enumerate([(620, 9600), (2400, 7200), (2400, 7200), (2400, 7200)]):
            state |= {f"cap_emb.rnn.rnn_lst.{layer}.weight": torch.empty(inputs, columns),
                      f"cap_emb.rnn.rnn_lst.{layer}.weight_c": torch.empty(4800),
                      f"cap_emb.rnn.rnn_lst.{layer}.bias": torch.empty(4800),
                      f"cap_emb.rnn.rnn_lst.{layer}.scale_x": torch.empty(1)}
        converted = convert_original(
            {"state_dict": state, "args_dict": argparse.Namespace(sru=4, dimemb=2400)}, "model.pth.tar")
        assert converted["config"]["model"] == asdict(ModelConfig())  # the defaults are the paper's
        expected = build_model(converted["config"]["model"]).state_dict()
    checkpoint.check_state(expected, converted["model"], "model.pth.tar")
    assert converted["model"]["image.trunk.layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)


def test_unmapped_or_missing_keys_are_one_line_errors(original):
    state = raw(original.model)
    extra = {**state, f"{PREFIX}0.2.weight": torch.zeros(1), "img_emb.module.extra.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"2 keys .* no counterpart .*base_layer\.0\.2\.weight") as error:
        convert_original({"state_dict": extra}, "model.pth.tar")
    assert "\n" not in str(error.value)
    dropped = ("fc.module.bias", f"{PREFIX}0.5.0.bn1.running_mean")
    fewer = {key: value for key, value in state.items() if key not in dropped}
    converted = convert_original({"state_dict": fewer}, "model.pth.tar")
    with pytest.raises(UserError, match=r"weights do not fit the model: 2 missing \(image\.proj\.bias, "
                                          r"image\.trunk\.layer2\.0\.bn1\.running_mean\)"):
        checkpoint.load_weights(build_model(converted["config"]["model"]), converted["model"], "model.pth.tar")
    no_stage = {key: value for key, value in state.items() if not key.startswith(f"{PREFIX}0.5.")}
    with pytest.raises(UserError, match=r"\(2, 0, 2, 2\) basic blocks per stage, which is none of ResNet"):
        convert_original({"state_dict": no_stage}, "model.pth.tar")
    with pytest.raises(UserError, match="arguments say sru=3 but its tensors hold 2"):
        convert_original({"state_dict": state, "args_dict": argparse.Namespace(sru=3)}, "m")


def checkpoint_cli(args: list) -> int:
    """``python checkpoint.py ARGS`` in this process; returns the exit status."""
    try:
        cli.run(checkpoint_command.main, [str(arg) for arg in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.mark.slow
def test_convert_cli_writes_a_plain_checkpoint_of_the_same_model(original, tmp_path, capsys):
    out = tmp_path / "converted" / "dsve.pth.tar"
    result = subprocess.run([sys.executable, ROOT / "checkpoint.py", "convert", original.model, out], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"-> {out}: arch=dsve trunk=resnet18 maps_dim=32 embed_dim=24" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["dsve.pth.tar"]  # no temporary file left behind
    plain = torch.load(out, map_location="cpu", weights_only=True)  # no pickled class inside
    assert plain["origin"]["args"]["name"] == "tiny" and "optimizer" not in plain
    direct = checkpoint.load(original.model)
    assert plain["config"] == direct["config"] and plain["model"].keys() == direct["model"].keys()
    assert all(torch.equal(plain["model"][key], value) for key, value in direct["model"].items())

    assert checkpoint_cli(["inspect", original.model]) == 0
    printed = capsys.readouterr().out
    assert "original dsve-loc model" in printed and "first_sentence=True lowercase_fallback=False" in printed
    assert checkpoint_cli(["convert", out, tmp_path / "again.pth.tar"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not an original dsve-loc model.pth.tar" in error[0]


# --------------------------------------------------------------------------- the equations on the raw tensors

def weldon_by_sorting(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 2: mean of the k highest plus mean of the k lowest activations of each map."""
    ordered = maps.flatten(2).sort(dim=-1, descending=True).values
    return ordered[..., :k].mean(-1) + ordered[..., -k:].mean(-1)


def test_image_embedding_equals_the_equations_on_the_raw_tensors(original):
    state = raw(original.model)
    trunk = original_trunk(TRUNK)
    missing, unexpected = trunk.load_state_dict(
        {key.removeprefix(f"{PREFIX}0."): value for key, value in state.items() if key.startswith(f"{PREFIX}0.")},
        strict=False)
    assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing)
    images = torch.randn(2, 3, 160, 192)  # a 5 x 6 map: 30 positions for k = 15
    with torch.no_grad():
        maps = F.conv2d(trunk.eval()(images), state[f"{PREFIX}1.weight"], state[f"{PREFIX}1.bias"])  # G, eq. 3
        pooled = weldon_by_sorting(maps, 15)
        expected = F.normalize(F.linear(pooled, state["fc.module.weight"], state["fc.module.bias"]), dim=-1)  # eq. 1
        model = load_model(original.model)
        torch.testing.assert_close(model.image.feature_maps(images), maps, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.image(images), expected, atol=1e-5, rtol=1e-4)


def sru_by_recurrence(words: torch.Tensor, layers: list[dict[str, torch.Tensor]], hidden: int) -> torch.Tensor:
    """Stacked SRU v1 (tanh, skip term, no rescale) on one caption (T, word_dim) -> the last step's output (d,).

    U = x W, its columns interleaved per unit: (T, d, k) with k = 0 candidate, 1 forget, 2 reset, 3 skip projection
    (when the input size differs from d; else the skip term is x itself). With c and b split into forget and reset
    halves:  f = s(U1 + v_f c' + b_f),  r = s(U2 + v_r c' + b_r),  c = f c' + (1 - f) U0,
    h = r tanh(c) + (1 - r) skip.
    """
    inputs = words
    for layer in layers:
        steps = inputs.shape[0]
        u = (inputs @ layer["weight"]).view(steps, hidden, -1)
        v_forget, v_reset = layer["weight_c"].view(2, hidden)
        b_forget, b_reset = layer["bias"].view(2, hidden)
        cell, outputs = torch.zeros(hidden), []
        for t in range(steps):
            forget = torch.sigmoid(u[t, :, 1] + v_forget * cell + b_forget)
            reset = torch.sigmoid(u[t, :, 2] + v_reset * cell + b_reset)
            cell = forget * cell + (1 - forget) * u[t, :, 0]
            skip = u[t, :, 3] if u.shape[-1] == 4 else inputs[t]
            outputs.append(reset * torch.tanh(cell) + (1 - reset) * skip)
        inputs = torch.stack(outputs)
    return inputs[-1]


def test_text_embedding_equals_the_sru_recurrence_on_the_raw_tensors(original):
    state = raw(original.model)
    layers = [{name: state[f"cap_emb.rnn.rnn_lst.{i}.{name}"] for name in ("weight", "weight_c", "bias")}
              for i in range(LAYERS)]
    table = torch.from_numpy(np.load(original.words))
    captions = ["Two red circles. A blue square on the left", "a star on the left", "The big Star"]
    # The original release: first sentence only, every token looked up exactly as written, else UNK.
    tokens = [["Two", "red", "circles", "."], ["a", "star", "on", "the", "left"], ["The", "big", "Star"]]
    rows = [[original.vocabulary.index(t) if t in original.vocabulary else original.vocabulary.index("UNK")
             for t in caption] for caption in tokens]
    assert rows[0][2] == rows[2][0] == rows[2][2] == original.vocabulary.index("UNK")  # circles, The, Star
    expected = torch.stack([F.normalize(sru_by_recurrence(table[r], layers, EMBED), dim=0) for r in rows])

    saved = checkpoint.load(original.model)
    model = checkpoint.model_from(saved, original.model)
    words = checkpoint.load_words(saved, original.words)
    encoded = words.encode(captions)
    assert encoded.lengths.tolist() == [4, 5, 3] and encoded.oov == 3
    with torch.no_grad():
        got = model.text(encoded.words, encoded.lengths)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_text_options_first_sentence_and_exact_case(original):
    default = load_word_vectors(original.words)
    exact = load_word_vectors(original.words, ORIGINAL_TEXT)
    assert default.tokens("A red star. Two discs") == ["A", "red", "star", ".", "Two", "discs"]
    assert exact.tokens("A red star. Two discs") == ["A", "red", "star", "."]
    assert default.index("Star") == default.index("star") is not None and exact.index("Star") is None
    assert TextOptions() == TextOptions(first_sentence=False, lowercase_fallback=True)
    ours = {"config": {"model": {"word_dim": WORD}, "train": {"dataset": "demo"}, "word_vectors": None}}
    assert checkpoint.load_words(ours, original.words).options == TextOptions()  # no "text": this project's


# --------------------------------------------------------------------------- initialisation for training

def test_init_from_the_classification_file_loads_trunk_and_conv_only(original):
    config = checkpoint.load(original.model)["config"]["model"]
    model = build_model(config)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = checkpoint.init_from(model, original.classification)
    assert "trunk (resnet18) and the 1x1 conv" in report and "classifier is not used" in report
    source = raw(original.classification)
    after = model.state_dict()
    torch.testing.assert_close(after["image.trunk.layer4.1.bn2.running_var"], source["base_layer.7.1.bn2.running_var"])
    torch.testing.assert_close(after["image.adapt.weight"], source["spaConv.weight"])
    for key in ("image.proj.weight", "text.rnn.rnn_lst.0.weight"):
        assert torch.equal(after[key], before[key])  # left as initialised
    wrong = build_model({**config, "maps_dim": 16})
    with pytest.raises(UserError, match=r"another shape \(image\.adapt\.bias \(32,\) instead of \(16,\)"):
        checkpoint.init_from(wrong, original.classification)


@pytest.mark.parametrize("source", ["original", "ours"])
def test_init_from_a_joint_model_loads_every_weight(original, tmp_path, source):
    path = original.model
    if source == "ours":
        path = tmp_path / "ours.pth.tar"
        checkpoint.atomic_save(checkpoint.load(original.model), path)
    model = build_model(checkpoint.load(original.model)["config"]["model"])
    assert "every weight" in checkpoint.init_from(model, path)
    reference = load_model(original.model)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in model.state_dict().items())


# --------------------------------------------------------------------------- every CLI takes the original files

@pytest.mark.slow
def test_eval_retrieval_accepts_the_original_model(original, tiny_world):
    result = run_cli("eval_retrieval.py", "-p", original.model, "--dataset", "demo", "--words", original.words,
                     "--size", "128", "--batch-size", "8", "--protocols", "full", *CLI_FLAGS, world=tiny_world)
    assert "12 images, 60 captions" in result.stdout and "rsum" in result.stdout


@pytest.mark.slow
def test_extraction_and_localization_clis_accept_the_original_model(original, tiny_world, tmp_path, monkeypatch):
    images = tiny_world / "images" / "val2014"
    (tmp_path / "lines.txt").write_text("A red circle. Ignored\nTwo big squares\n", encoding="utf-8")
    words = ["--words", original.words]
    runs = {"image_features_extraction.py": ["-d", images, "-o", tmp_path / "images.npz", "--size", "128"],
            "text_features_extraction.py": ["-d", tmp_path / "lines.txt", "-o", tmp_path / "lines.npz", *words],
            "pointing_game.py": ["--dataset", "demo", *words, "--size", "128", "--limit", "2", "--json",
                                 tmp_path / "pg.json"],
            "semantic_seg.py": ["--dataset", "demo", *words, "--size", "128", "--limit", "2", "--json",
                                tmp_path / "seg.json"],
            "localize.py": ["-i", next(images.glob("*.jpg")), "-t", "a red circle", "-o", tmp_path / "overlay.png",
                            *words, "--size", "128", "--device", "cpu"]}
    for script, args in runs.items():
        flags = CLI_FLAGS if script != "localize.py" else []
        assert run_in_process(script, ["-p", original.model, *args, *flags], tiny_world, monkeypatch) == 0, script
    with np.load(tmp_path / "images.npz") as data:
        assert data["features"].shape == (len(list(images.glob("*.jpg"))), EMBED)
    with np.load(tmp_path / "lines.npz") as data:
        assert data["features"].shape == (2, EMBED)
    assert all((tmp_path / name).stat().st_size > 0 for name in ("pg.json", "seg.json", "overlay.png"))


# --------------------------------------------------------------------------- one-line errors

@pytest.mark.slow
def test_bad_checkpoint_files_are_one_line_errors(original, tiny_world, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(original.model.read_bytes()[: original.model.stat().st_size // 2])
    truncated_zip = tmp_path / "truncated_zip.pth.tar"
    truncated_zip.write_bytes(original.model_zip.read_bytes()[: original.model_zip.stat().st_size // 2])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    cases = {tmp_path / "notes.txt": "not a readable checkpoint", truncated: "not a readable checkpoint",
             truncated_zip: "not a readable checkpoint", tmp_path / "other.pth": "neither a DSVE-Loc checkpoint",
             original.classification: "classification network, not a joint model"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as error:
            checkpoint.load(path)
        assert "\n" not in str(error.value)
    result = run_cli("eval_retrieval.py", "-p", truncated, "--dataset", "demo", *CLI_FLAGS, world=tiny_world,
                     check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "truncated" in lines[0], result.stderr


def test_word_vector_problems_are_one_line_errors(original, tiny_world, tmp_path, monkeypatch, capsys):
    small = tmp_path / "small"
    small.mkdir()
    np.save(small / "utable.npy", np.zeros((len(original.vocabulary), 16), dtype=np.float32))
    (small / "dictionary.txt").write_text("\n".join(original.vocabulary) + "\n", encoding="utf-8")
    saved = checkpoint.load(original.model)
    with pytest.raises(UserError, match=r"utable\.npy are 16-d but \S*model\.pth\.tar expects 64-d"):
        checkpoint.load_words(saved, small / "utable.npy", original.model)
    args = ["-p", original.model, "--dataset", "demo", "--words", small / "utable.npy", *CLI_FLAGS]
    assert run_in_process("eval_retrieval.py", args, tiny_world, monkeypatch) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "16-d" in error[0] and "64-d" in error[0]
    (small / "dictionary.txt").unlink()
    with pytest.raises(UserError, match="dictionary.txt is missing"):
        checkpoint.load_words(saved, small / "utable.npy")
    assert run_in_process("eval_retrieval.py", args, tiny_world, monkeypatch) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "dictionary.txt is missing" in error[0]
    monkeypatch.setenv("DSVE_WORD_VECTORS", str(tmp_path / "nowhere" / "utable.npy"))
    with pytest.raises(UserError, match="config key 'word_vectors'"):  # converted models name no vectors
        checkpoint.load_words(saved)
