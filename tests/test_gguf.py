"""GGUF import on tiny files written with llama.cpp's conventions, against transformers' own GGUF loading."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from flan_jax import convert  # noqa: E402
from flan_jax.convert import gguf_import  # noqa: E402
from flan_jax.convert.__main__ import main  # noqa: E402
from flan_jax.data.tokenizer import HFTokenizer  # noqa: E402

import gguf_fakes  # noqa: E402
from test_convert import our_model, randomize  # noqa: E402

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    "The capital of France is Paris. It has 2,148,271 inhabitants (2020).",
    "def add(a, b):\n    return a + b  # two spaces  then 12 digits 123456789012\n",
    "Question: what's 7 x 6?\nAnswer: 42.\n\n\tTabs, émigré, naïve, 中文, emoji 😀.",
] * 3
TEXTS = CORPUS + ["  leading spaces", "trailing   ", "<|im_start|>user\nhi 12<|im_end|>\n", "a  1  22   333", "x\r\ny"]
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def vocab() -> dict:
    return gguf_fakes.byte_level_vocab(CORPUS, vocab_size=320, special=SPECIAL)


def hf_model(kind: str, vocab_size: int, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[kind]
    model = model_class(config_class(vocab_size=vocab_size, **{**SIZES, **extra})).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def llama(vocab):
    return hf_model("llama", len(vocab["tokens"]), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, llama, vocab) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("gguf")
    ids = {"bos": 1, "eos": 2, "pad": 0}
    return {qtype: gguf_fakes.write_gguf(folder / f"tiny-{qtype}.gguf", llama, arch="llama", qtype=qtype,
                                         vocab=vocab, special_ids=ids)
            for qtype in gguf_import.SUPPORTED_TYPES}


def transformers_gguf(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("qtype", gguf_import.SUPPORTED_TYPES)
def test_dequantised_tensors_equal_transformers_gguf_load(gguf_files, llama, qtype):
    cfg, params = convert.load_gguf_params(gguf_files[qtype])
    ours = convert.hf_tensors(cfg, params)
    reference = {k: v.numpy() for k, v in transformers_gguf(gguf_files[qtype]).state_dict().items()}
    assert set(ours) == set(reference)
    for key, value in ours.items():  # dequantisation and the undone q/k permutation: bitwise
        assert np.array_equal(value, reference[key]), key
    original = {k: v.numpy() for k, v in llama.state_dict().items()}
    error = max(float(np.abs(ours[k] - original[k]).max()) for k in ours)
    # F32 is exact; each quantised type stays within its rounding (a wrong block layout is ~1.0 off).
    assert error <= {"F32": 0.0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 6e-3}.get(qtype, 0.08), (qtype, error)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16))
    np.testing.assert_allclose(np.asarray(our_model(cfg.replace(attention="reference"), params)(jnp.asarray(ids))),
                               logits_of(transformers_gguf(gguf_files[qtype]), ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2", "gemma", "qwen3", "phi3"])
def test_other_architectures_give_the_original_model(tmp_path, vocab, kind):
    """No row permutation for Qwen2/3 and Phi-3 (their biases, QK-norms and fused projections are
    read as they are); Gemma's norms lose llama.cpp's + 1. (transformers 5.23's own GGUF loading
    is no reference here: it ignores Qwen3's key_length and defaults Phi-3's pad id outside the
    vocabulary; the original model is the ground truth anyway.)"""
    extra = {"gemma": {"head_dim": 16}, "qwen3": {"head_dim": 8}, "phi3": {"pad_token_id": 0}}.get(kind, {})
    model = hf_model(kind, len(vocab["tokens"]), **extra)
    path = gguf_fakes.write_gguf(tmp_path / f"{kind}.gguf", model, arch=kind, qtype="F32")
    cfg, params = convert.load_gguf_params(path)
    assert cfg.family == kind and {"qwen2": cfg.qkv_bias, "gemma": cfg.norm_scale_plus_one,
                                   "qwen3": cfg.qk_norm == "head", "phi3": True}[kind]
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for key, value in convert.hf_tensors(cfg, params).items():
        np.testing.assert_allclose(value, original[key], atol=1e-6, err_msg=key)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 12))
    np.testing.assert_allclose(np.asarray(our_model(cfg.replace(attention="reference"), params)(jnp.asarray(ids))),
                               logits_of(model, ids), atol=1e-4, rtol=1e-4)


def test_cli_writes_checkpoint_tokenizer_and_exports_what_transformers_loads(gguf_files, tmp_path, capsys):
    source = gguf_files["Q8_0"]
    assert main([f"--from_gguf={source}", f"--out={tmp_path / 'ours'}"]) == 0
    assert "config.checkpoint.init_from" in capsys.readouterr().out
    cfg, params = convert.load_converted(tmp_path / "ours")
    assert cfg.n_layers == 2 and cfg.n_kv_heads == 2 and not cfg.tie_embeddings
    # A scanned run reads the same (per-layer stored) checkpoint stacked: the same arrays.
    from flan_jax.model import layout

    stacked_cfg, stacked = convert.load_converted(tmp_path / "ours", stacked=True)
    assert stacked_cfg.scanned and stacked["layers"]["attn"]["q"]["kernel"].shape[0] == 2
    unstacked = convert.checkpoint.flatten(layout.unstack(stacked))
    assert all(np.array_equal(np.asarray(v), np.asarray(unstacked[k])) for k, v in convert.checkpoint.flatten(params).items())
    assert json.loads((tmp_path / "ours" / "hf_config.json").read_text())["eos_token_id"] == 2
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)

    # --from_hf on a folder that holds one .gguf (a Hub download) is the same conversion.
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / source.name).write_bytes(source.read_bytes())
    assert main([f"--from_hf={folder}", f"--out={tmp_path / 'ours2'}"]) == 0
    _, params2 = convert.load_converted(tmp_path / "ours2")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(convert.checkpoint.flatten(params).values(), convert.checkpoint.flatten(params2).values()))

    # The HF export of the imported model is transformers' own GGUF load, tensor for tensor.
    assert main([f"--to_hf={tmp_path / 'hf'}", f"--checkpoint={tmp_path / 'ours'}"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = transformers_gguf(source).state_dict()
    assert set(exported.state_dict()) == set(reference)
    for key, value in exported.state_dict().items():
        assert torch.equal(value, reference[key]), key
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = HFTokenizer(tmp_path / "ours")
    assert [exported_tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS] == ours.encode_batch(TEXTS)


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, llama, vocab, pre):
    path = gguf_fakes.write_gguf(tmp_path / "tok.gguf", llama, arch="llama", vocab=vocab, pre=pre,
                                 special_ids={"bos": 1, "eos": 2})
    assert main([f"--from_gguf={path}", f"--out={tmp_path / 'ours'}"]) == 0
    ours = HFTokenizer(tmp_path / "ours")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in TEXTS:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, text
    assert ours.encode("<|im_start|>user") [0] == vocab["tokens"].index("<|im_start|>")  # control tokens stay whole
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tmp_path, llama, vocab):
    """llama.cpp's 'smollm' splits every digit off first (SmolLM's tokenizer.json: Digits(individual)
    then ByteLevel). transformers 5.23's GGUF loader does not know the name and falls back to GPT-2's
    split, which differs exactly where whitespace runs precede a digit; the reference here is the
    transformers tokenizer with SmolLM's own pre-tokenizer put back."""
    from tokenizers import pre_tokenizers

    path = gguf_fakes.write_gguf(tmp_path / "tok.gguf", llama, arch="llama", vocab=vocab, pre="smollm")
    assert main([f"--from_gguf={path}", f"--out={tmp_path / 'ours'}"]) == 0
    ours = HFTokenizer(tmp_path / "ours")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    plain = [reference(t, add_special_tokens=False).input_ids for t in TEXTS]
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert ours.encode_batch(TEXTS) == [reference(t, add_special_tokens=False).input_ids for t in TEXTS]
    differs = [t for t, a, b in zip(TEXTS, ours.encode_batch(TEXTS), plain) if a != b]
    assert differs and all(any(c.isdigit() for c in t) for t in differs)


def test_sentencepiece_gguf_tokenizer_matches_sentencepiece_and_transformers(tmp_path, llama):
    """Llama 2 / Mistral / Gemma-style vocabularies: pieces and scores, merges rebuilt from them.

    Equal to transformers' GGUF tokenizer everywhere, and to sentencepiece itself except on text that
    starts with whitespace, where sentencepiece adds its dummy-prefix space on top (transformers'
    Metaspace, and so ours, does not add one before a leading space)."""
    import sentencepiece as spm

    vocab, model_bytes = gguf_fakes.sentencepiece_vocab(CORPUS * 3, vocab_size=400)
    path = gguf_fakes.write_gguf(tmp_path / "sp.gguf", llama, arch="llama", vocab=vocab)
    assert main([f"--from_gguf={path}", f"--out={tmp_path / 'ours'}"]) == 0
    ours = HFTokenizer(tmp_path / "ours")
    assert ours.add_bos and (ours.bos_id, ours.eos_id) == (1, 2)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    texts = [t for t in TEXTS if "<|" not in t] + ["x\u2028y \u00e9\u0301", "   ", "\n"]
    for text in texts:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, text
        if not text[:1].isspace():
            assert ours.encode(text) == sp.encode(text), text
            assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)), text
    assert any(vocab["types"][i] == 6 for text in texts for i in ours.encode(text))  # byte fallback was used


# ------------------------------------------------------------------------------------ bad files
def assert_refused(path: pathlib.Path, tmp_path: pathlib.Path, capsys, *expected: str) -> None:
    out = tmp_path / "out"
    assert main([f"--from_gguf={path}", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err, err
    for text in expected:
        assert text in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_truncated_and_corrupt_gguf_name_the_file_and_tensor(gguf_files, tmp_path, capsys):
    data = gguf_files["Q4_0"].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) - 100])
    assert_refused(bad, tmp_path, capsys, "truncated: tensor 'output.weight'")
    bad.write_bytes(data[:200])  # inside the metadata
    assert_refused(bad, tmp_path, capsys, "not a complete GGUF file")
    bad.write_bytes(b"PK\x03\x04" + data[4:])
    assert_refused(bad, tmp_path, capsys, "not a GGUF file")


def test_metadata_that_disagrees_with_a_tensor_names_the_tensor_and_metadata_key(llama, vocab, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(llama.config, "intermediate_size", 80)  # the metadata says 80, the tensors hold 96
    bad = gguf_fakes.write_gguf(tmp_path / "ff.gguf", llama, arch="llama", vocab=vocab)
    assert_refused(bad, tmp_path, capsys, "(GGUF tensor 'blk.0.ffn_gate.weight')", "llama.feed_forward_length=80",
                   "llama.embedding_length=64")


def test_unknown_and_unsupported_tensor_types_are_refused_by_name(gguf_files, llama, tmp_path, capsys):
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(gguf_files["F32"].read_bytes())
    reader = gguf.GGUFReader(bad, "r+")
    reader.tensors[3].field.parts[4][0] = 99  # the tensor info's GGML type
    name = reader.tensors[3].name
    del reader
    assert_refused(bad, tmp_path, capsys, f"tensor {name!r} has GGML type 99")

    f64 = gguf_fakes.write_gguf(tmp_path / "f64.gguf", llama, arch="llama", tensor_types={"blk.1.ffn_up.weight": "F64"})
    assert_refused(f64, tmp_path, capsys, "blk.1.ffn_up.weight (F64)", "supported: ('F32'")


def test_unsupported_architectures_and_features_are_refused_before_writing(llama, tmp_path, capsys):
    writer = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_refused(tmp_path / "bert.gguf", tmp_path, capsys, "general.architecture='bert' is not supported")

    moe = gguf_fakes.write_gguf(tmp_path / "moe.gguf", llama, arch="llama", extra_metadata=lambda w: w.add_expert_count(8))
    assert_refused(moe, tmp_path, capsys, "llama.expert_count=8: mixture-of-experts")
    yarn = gguf_fakes.write_gguf(tmp_path / "yarn.gguf", llama, arch="llama",
                                 extra_metadata=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN))
    assert_refused(yarn, tmp_path, capsys, "rope.scaling.type='yarn' is not supported")
    no_tokenizer = gguf_fakes.write_gguf(tmp_path / "plain.gguf", llama, arch="llama")
    assert_refused(no_tokenizer, tmp_path, capsys, "no tokenizer metadata", "--skip_tokenizer")
    assert main([f"--from_gguf={no_tokenizer}", f"--out={tmp_path / 'weights'}", "--skip_tokenizer"]) == 0
    assert not (tmp_path / "weights" / "tokenizer.json").exists()
