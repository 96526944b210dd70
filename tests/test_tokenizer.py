"""Tokenizers: exact round trips, fixed special ids, deterministic training, workdir reuse, HF tokenizer.json."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest
import tokenizers
from data_fakes import data_config, fake_examples, register_fake_tasks, tiny_tokenizer, unregister_all

from flan_jax.data import tokenizer as tokenizer_lib

TRICKY = [
    "Question:\nWhat is 2 + 2?\n\nAnswer:",
    "two  spaces,   three, and a\ttab",
    "  leading and trailing  ",
    "unseen characters: 中文, émigré, 🙂, ÿ",
    "line one\r\nline two",
    "",
]


def _texts(n=200, seed=1):
    texts = []
    for example in fake_examples(n, seed=seed):
        texts += [example["inputs"], example["targets"]]
    return texts


def _tok_config(**fields):
    config = ml_collections.ConfigDict(
        {"kind": "sentencepiece", "path": "", "vocab_size": 350, "train_examples": 100, "bos_token": "", "eos_token": ""}
    )
    config.update(fields)
    return config


@pytest.mark.parametrize("text", TRICKY)
def test_trained_sentencepiece_round_trips_text_exactly(text):
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_trained_sentencepiece_has_fixed_special_ids_and_decode_drops_them():
    tok = tiny_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    ids = tok.encode("alpha beta")
    assert not {0, 1, 2, 3} & set(ids)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "alpha beta"
    assert tok.encode_batch(["alpha beta", "x\ny"]) == [ids, tok.encode("x\ny")]
    assert 300 < tok.vocab_size <= 400


def test_concatenated_encodings_decode_to_concatenated_text():
    """No dummy prefix: features concatenate encode(inputs) + encode(targets)."""
    tok = tiny_tokenizer()
    inputs, targets = "Is the sky blue?\nAnswer:", " yes"
    assert tok.decode(tok.encode(inputs) + tok.encode(targets)) == inputs + targets


def test_training_is_deterministic_and_depends_on_the_texts():
    first = tokenizer_lib.train_sentencepiece(_texts(), 350)
    second = tokenizer_lib.train_sentencepiece(_texts(), 350)
    other = tokenizer_lib.train_sentencepiece(_texts(seed=2), 350)
    assert first == second
    assert first != other


def test_load_tokenizer_trains_into_the_workdir_once_and_reuses_it(tmp_path):
    tok = tokenizer_lib.load_tokenizer(_tok_config(), workdir=tmp_path, train_texts=_texts())
    model_file = tmp_path / "tokenizer.model"
    assert model_file.is_file()
    saved = model_file.read_bytes()
    # A restart finds the file and must not retrain (no texts given this time).
    again = tokenizer_lib.load_tokenizer(_tok_config(), workdir=tmp_path)
    assert model_file.read_bytes() == saved
    assert again.encode("alpha\n  beta") == tok.encode("alpha\n  beta")
    by_path = tokenizer_lib.load_tokenizer(_tok_config(path=str(model_file)))
    assert by_path.vocab_size == tok.vocab_size


def test_load_tokenizer_errors_say_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="kind='bpe'"):
        tokenizer_lib.load_tokenizer(_tok_config(kind="bpe"))
    with pytest.raises(ValueError, match="no workdir"):
        tokenizer_lib.load_tokenizer(_tok_config())
    with pytest.raises(ValueError, match="no tokenizer path, no training texts"):
        tokenizer_lib.load_tokenizer(_tok_config(), workdir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer_lib.load_tokenizer(_tok_config(path=str(tmp_path / "missing.model")))
    with pytest.raises(ValueError, match="too small"):
        tokenizer_lib.train_sentencepiece(_texts(), 100)


def _write_hf_tokenizer(folder, special=("<pad>", "<s>", "</s>")):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special), initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_hf_tokenizer_json_round_trips_and_finds_bos_eos(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "hf")
    tok = tokenizer_lib.load_tokenizer(_tok_config(kind="hf", path=str(path)))
    assert tok.pad_id == 0
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # <s>, </s> after <pad>
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("alpha beta")
    assert tok.encode_batch(["alpha beta"]) == [ids]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "alpha beta"


def test_hf_tokenizer_special_tokens_from_config_file_or_fields(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "hf", special=("<|pad|>", "<|endoftext|>", "<|begin|>", "<|end|>"))
    # Only <|endoftext|> is a known name: it serves as both BOS and EOS (GPT-2 style).
    tok = tokenizer_lib.load_tokenizer(_tok_config(kind="hf", path=str(path)))
    assert tok.bos_id == tok.eos_id == 1
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>"})
    )
    tok = tokenizer_lib.load_tokenizer(_tok_config(kind="hf", path=str(path.parent)))
    assert (tok.bos_id, tok.eos_id) == (2, 3)
    tok = tokenizer_lib.load_tokenizer(_tok_config(kind="hf", path=str(path), eos_token="<|endoftext|>"))
    assert tok.eos_id == 1
    with pytest.raises(ValueError, match="no EOS token found"):
        tokenizer_lib.load_tokenizer(_tok_config(kind="hf", path=str(path), eos_token="<nope>"))


@pytest.fixture
def registered():
    names = register_fake_tasks("tok_", {"a": 40, "b": 20})
    yield
    unregister_all(names)


def test_load_tokenizer_trains_on_the_training_mixture_of_the_data_config(registered, tmp_path):
    config = data_config(train_mixture="tok_mix")
    config.tokenizer.vocab_size = 320
    config.tokenizer.train_examples = 30
    tok = tokenizer_lib.load_tokenizer(config, workdir=tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    assert tok.decode(tok.encode("#7: alpha\nAnswer: beta")) == "#7: alpha\nAnswer: beta"
    texts = tokenizer_lib.mixture_texts("tok_mix", num_examples=30)
    assert len(texts) == 60 and any(t.startswith("#") for t in texts)
    retrained = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 320))
    assert retrained.encode("alpha beta gamma") == tok.encode("alpha beta gamma")


def test_command_line_trains_from_a_mixture(tmp_path):
    out = tmp_path / "cli.model"
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from data_fakes import register_fake_tasks
        register_fake_tasks("tokcli_", {{"a": 40}})
        sys.argv = ["tokenizer", "--mixture=tokcli_mix", "--vocab_size=330", "--train_examples=40", "--out={out}"]
        runpy.run_module("flan_jax.data.tokenizer", run_name="__main__")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}" in result.stdout
    tok = tokenizer_lib.SentencePieceTokenizer(out)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)


def test_decode_drops_ids_past_the_vocabulary():
    """Models pad their embedding tables; an untrained model may emit those ids."""
    tok = tiny_tokenizer()
    ids = tok.encode("alpha beta")
    assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 7] + ids[1:]) == "alpha beta"
