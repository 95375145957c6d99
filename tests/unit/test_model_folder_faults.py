"""Bad model folders fail with one short line naming the file, the problem and the fix.

Every fault is made on a copy: of the shipped procedural weights folder (`load_bundle`) or of a
tiny SkyReels checkpoint written by `save_transformer` (`load_transformer`). The CLI relays the
message as its single stderr line, so no library traceback ever reaches the user.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from pipelines.procedural.bundle import WEIGHTS_DIR, load_bundle
from pipelines.skyreels_v2.checkpoint import CheckpointError, load_transformer, save_transformer
from pipelines.skyreels_v2.model import WanDFTransformer
from pipelines.skyreels_v2.sizes import config_for

MAX_MESSAGE = 600  # characters: a clear line, never a dump of the file
UNREADABLE = "not a readable safetensors file (truncated or corrupt:"


# ----------------------------------------------------------------------------- helpers

def tiny_checkpoint(folder: Path, max_shard_bytes: int | None = None) -> Path:
    """The tiny SkyReels size with seeded random weights, saved the official way."""
    torch.manual_seed(0)
    save_transformer(WanDFTransformer(config_for("tiny")).eval(), str(folder), max_shard_bytes=max_shard_bytes)
    return folder


def procedural_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(WEIGHTS_DIR, tmp_path / "weights"))


def truncate(path: Path) -> None:
    """Keep the first half of the bytes, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def one_line_error(load, *fragments: str) -> str:
    """Run `load`, expect one CheckpointError of one short line holding every fragment."""
    with pytest.raises(CheckpointError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- the copies are good

def test_untouched_copies_load(tmp_path):
    assert isinstance(load_transformer(str(tiny_checkpoint(tmp_path / "ckpt"))), WanDFTransformer)
    assert load_bundle(procedural_copy(tmp_path)).codec.channels == 16


# ----------------------------------------------------------------------------- truncated safetensors

def test_truncated_single_file_names_it_and_the_fix(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    truncate(folder / "model.safetensors")
    one_line_error(lambda: load_transformer(str(folder)),
                   f"{folder}/model.safetensors: {UNREADABLE}", "re-download or re-export it")


def test_truncated_shard_of_an_index_names_that_shard(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt", max_shard_bytes=200_000)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    truncate(folder / shards[-1])
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}/{shards[-1]}: {UNREADABLE}")


@pytest.mark.parametrize("name", ["model.safetensors", "text_encoder.safetensors", "codec.safetensors"])
def test_truncated_procedural_file_names_it(tmp_path, name):
    folder = procedural_copy(tmp_path)
    truncate(folder / name)
    one_line_error(lambda: load_bundle(folder), f"{folder}/{name}: {UNREADABLE}", "re-download or re-export it")


def test_empty_and_garbage_safetensors_are_unreadable(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    for content in (b"", b"\xff" * 64):
        (folder / "model.safetensors").write_bytes(content)
        one_line_error(lambda: load_transformer(str(folder)), f"{folder}/model.safetensors: {UNREADABLE}")


# ----------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    ("{\"dim\": 32,", "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object {...}, found an array"),
    ("\"dim\"", "expected a JSON object {...}, found a string"),
])
def test_config_that_is_not_a_json_object(tmp_path, content, problem):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").write_text(content)
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}/config.json: {problem}")


@pytest.mark.parametrize("changes, problem", [
    ({"dim": "32"}, "dim must be a positive int"),
    ({"qk_norm": "yes"}, "qk_norm must be true or false"),
    ({"patch_size": 2}, "patch_size must be an array"),
    ({"model_type": "i2v"}, "model_type must be 't2v'"),
    ({"num_heads": 5}, "dim must be a multiple of num_heads"),
    ({"hidden_size": 32}, "unknown WanDFConfig field(s) ['hidden_size']"),
])
def test_config_with_a_bad_field(tmp_path, changes, problem):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    edit_json(folder / "config.json", **changes)
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}/config.json: ", problem, "fix config.json")


@pytest.mark.parametrize("changes, kinds", [
    ({"ffn_dim": 96}, ["mis-shaped key(s)"]),
    ({"num_layers": 1}, ["unexpected key(s): blocks.1."]),
])
def test_config_whose_shape_the_weights_do_not_fit(tmp_path, changes, kinds):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    edit_json(folder / "config.json", **changes)
    one_line_error(lambda: load_transformer(str(folder)), "weights do not fit the model config.json describes",
                   *kinds, "fix config.json or re-download the checkpoint")


def test_missing_config_is_named(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}/config.json: missing")


def test_quoted_file_content_stays_short(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    good_config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(json.dumps("x" * 2_000_000))
    message = one_line_error(lambda: load_transformer(str(folder)), "found a string")
    assert "x" * 81 not in message
    (folder / "config.json").write_text("{" + "y" * 2_000_000)
    one_line_error(lambda: load_transformer(str(folder)), "not valid JSON")
    (folder / "config.json").write_text(good_config)
    edit_json(folder / "config.json", **{"z" * 1_000_000: 1})
    one_line_error(lambda: load_transformer(str(folder)), "unknown WanDFConfig field")


# ----------------------------------------------------------------------------- index json

@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    ("{\"weight_map\": {", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ("{\"metadata\": {}}", "\"weight_map\" must be a non-empty object"),
    ("{\"weight_map\": {\"head.head.weight\": 3}}", "\"weight_map\" values must be shard file names"),
])
def test_invalid_index(tmp_path, content, problem):
    folder = tiny_checkpoint(tmp_path / "ckpt", max_shard_bytes=200_000)
    (folder / "model.safetensors.index.json").write_text(content)
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}/model.safetensors.index.json: {problem}")


def test_index_naming_a_missing_shard(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt", max_shard_bytes=200_000)
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    victim.unlink()
    one_line_error(lambda: load_transformer(str(folder)), "model.safetensors.index.json: names shard(s) that are "
                   f"not in the folder: {victim.name}", "re-download")


def test_procedural_index_naming_a_missing_shard(tmp_path):
    folder = procedural_copy(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["head.head.bias"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(lambda: load_bundle(folder), "model-00002-of-00002.safetensors")


# ----------------------------------------------------------------------------- the folder itself

def test_folder_that_does_not_exist(tmp_path):
    one_line_error(lambda: load_transformer(str(tmp_path / "nope")), "nope: not a checkpoint folder (no such folder)")
    one_line_error(lambda: load_bundle(tmp_path / "nope"), "nope: not a procedural weights folder (no such folder)")


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    one_line_error(lambda: load_transformer(str(tmp_path / "model.bin")), "a file, not a folder")


def test_folder_without_safetensors(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    one_line_error(lambda: load_transformer(str(folder)), f"{folder}: no *.safetensors file",
                   "a checkpoint folder holds config.json and model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: load_transformer(str(empty)), "no *.safetensors file")


# ----------------------------------------------------------------------------- procedural JSON files

@pytest.mark.parametrize("name", ["pipeline.json", "text_encoder.json", "codec.json"])
@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    ("   \n", "empty file"),
    ("{\"patch\": 4,,}", "not valid JSON"),
    ("null", "expected a JSON object {...}, found null"),
])
def test_procedural_json_that_is_not_an_object(tmp_path, name, content, problem):
    folder = procedural_copy(tmp_path)
    (folder / name).write_text(content)
    one_line_error(lambda: load_bundle(folder), f"{folder}/{name}: {problem}", "re-train the folder")


@pytest.mark.parametrize("name, changes, problem", [
    ("pipeline.json", {"shift": "3"}, "\"shift\" must be a number"),
    ("pipeline.json", {"reference_block": 1}, "\"reference_block\" must be true/false"),
    ("pipeline.json", {"overlap_frames": 40}, "overlap_frames must be in"),
    ("pipeline.json", {"height": 30}, "\"height\" must be a positive multiple of the codec patch 4"),
    ("text_encoder.json", {"vocab": "a red circle"}, "\"vocab\" must be a non-empty array of words"),
    ("text_encoder.json", {"vocab": ["a", "a"]}, "\"vocab\" must hold distinct words"),
    ("text_encoder.json", {"text_len": "8"}, "\"text_len\" must be an integer >= 2"),
    ("text_encoder.json", {"layers": 2}, "unknown key(s) 'layers'"),
    ("codec.json", {"patch": "4"}, "\"patch\" must be a positive integer"),
    ("codec.json", {"channels": 8}, "expected (8, 48)"),
])
def test_procedural_json_with_a_bad_field(tmp_path, name, changes, problem):
    folder = procedural_copy(tmp_path)
    edit_json(folder / name, **changes)
    one_line_error(lambda: load_bundle(folder), problem)


def test_text_encoder_weights_that_do_not_fit_its_json(tmp_path):
    folder = procedural_copy(tmp_path)
    edit_json(folder / "text_encoder.json", text_dim=32)
    one_line_error(lambda: load_bundle(folder), f"{folder}/text_encoder.safetensors: does not fit text_encoder.json",
                   "mis-shaped key(s)")


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("kind, bad_file", [("procedural", "model.safetensors"), ("procedural", "pipeline.json"),
                                            ("skyreels", "config.json")])
def test_cli_prints_one_line_naming_the_bad_file(tmp_path, capsys, kind, bad_file):
    folder = procedural_copy(tmp_path) if kind == "procedural" else tiny_checkpoint(tmp_path / "ckpt")
    if bad_file.endswith(".safetensors"):
        truncate(folder / bad_file)
    else:
        (folder / bad_file).write_text("")
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", str(folder), "--prompt", "a red circle moves right", "--frames", "8",
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"{folder}/{bad_file}" in err
    assert not out.exists()
