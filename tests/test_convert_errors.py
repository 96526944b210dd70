"""Bad input for conversion: every error names the file, tensor and field; nothing half-written is left."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import convert  # noqa: E402
from flan_jax.convert.__main__ import main  # noqa: E402

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    return path


def copy_of(good_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    hf = tmp_path / "hf"
    shutil.copytree(good_dir, hf)
    return hf


def assert_nothing_written(parent: pathlib.Path, out: pathlib.Path) -> None:
    """No OUT folder, and no leftover staging folder either."""
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if ".partial-" in p.name] == []


def convert_fails(hf: pathlib.Path, out: pathlib.Path, capsys) -> str:
    assert main([f"--from_hf={hf}", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_nothing_written(out.parent, out)
    return err


def test_truncated_safetensors_names_the_file_and_leaves_nothing(good_dir, tmp_path, capsys):
    hf = copy_of(good_dir, tmp_path)
    weights = hf / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    err = convert_fails(hf, tmp_path / "out", capsys)
    assert str(weights) in err and "truncated or corrupt" in err

    weights.write_bytes(b"\x00" * 7)  # not even a header
    assert str(weights) in convert_fails(hf, tmp_path / "out", capsys)

    weights.write_bytes(good)  # the retry with the same --out works: no "already holds a checkpoint"
    assert main([f"--from_hf={hf}", f"--out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "model_config.json").is_file()
    assert "init_from = " + repr(str((tmp_path / "out").absolute())) in (tmp_path / "out" / "config_overrides.py.txt").read_text()


@pytest.mark.parametrize("field, value, tensor, fields", [
    # The first tensor in the file's (alphabetical) order that disagrees is reported.
    ("num_attention_heads", 6, "model.layers.0.self_attn.o_proj.weight", "hidden_size=32, num_attention_heads=6, head_dim=8"),
    ("intermediate_size", 40, "model.layers.0.mlp.down_proj.weight", "hidden_size=32, intermediate_size=40"),
    ("vocab_size", 60, "lm_head.weight", "vocab_size=60, hidden_size=32"),
])
def test_shape_mismatch_names_tensor_file_and_config_fields(good_dir, tmp_path, capsys, field, value, tensor, fields):
    hf = copy_of(good_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config[field] = value
    if field == "num_attention_heads":
        config["head_dim"] = 8  # keep hidden_size fixed so only the head count disagrees
    (hf / "config.json").write_text(json.dumps(config))
    err = convert_fails(hf, tmp_path / "out", capsys)
    assert f"tensor {tensor!r} has shape" in err, err
    assert str(hf / "model.safetensors") in err and str(hf / "config.json") in err
    assert fields in err, err
    assert "cannot reshape" not in err


def test_invalid_config_json_names_the_file_and_position(good_dir, tmp_path, capsys):
    hf = copy_of(good_dir, tmp_path)
    (hf / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
    err = convert_fails(hf, tmp_path / "out", capsys)
    assert f"{hf / 'config.json'}: not valid JSON" in err and "line 2" in err
    (hf / "config.json").write_text('["a list"]')
    assert "expected a JSON object" in convert_fails(hf, tmp_path / "out", capsys)
    (hf / "config.json").write_text(json.dumps({**SIZES, "model_type": "llama", "hidden_act": "relu"}))
    err = convert_fails(hf, tmp_path / "out", capsys)
    assert str(hf / "config.json") in err and "'relu'" in err


def test_failure_after_layers_were_written_leaves_no_checkpoint(good_dir, tmp_path, capsys):
    """The last tensor is missing: layers were already saved when the error comes, yet nothing remains."""
    from safetensors.numpy import load_file, save_file

    hf = copy_of(good_dir, tmp_path)
    tensors = load_file(hf / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, hf / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder is a valid --out, and stays as it was on failure
    assert main([f"--from_hf={hf}", f"--out={out}"]) == 2
    assert "model.norm.weight" in capsys.readouterr().err
    assert out.is_dir() and list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_a_non_empty_out_folder_is_refused_before_any_work(good_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([f"--from_hf={good_dir}", f"--out={out}"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_failed_hf_export_leaves_nothing_and_refuses_non_empty_folders(good_dir, tmp_path, monkeypatch):
    cfg, params = convert.load_hf_params(good_dir)
    from flan_jax.convert import hf_export

    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        hf_export.write_hf(tmp_path / "hf", cfg, params)
    assert calls and not pathlib.Path(calls[0]).exists()
    assert_nothing_written(tmp_path, tmp_path / "hf")
    monkeypatch.undo()

    hf_export.write_hf(tmp_path / "hf", cfg, params)
    with pytest.raises(FileExistsError, match="--to_hf"):
        hf_export.write_hf(tmp_path / "hf", cfg, params)
    _, back = convert.load_hf_params(tmp_path / "hf")
    assert all(np.array_equal(back[p], np.asarray(v)) for p, v in params.items())
