"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, for GGUF tests.

`write_gguf(path, hf_model, arch=..., qtype=...)` takes a transformers model and writes its
weights with llama.cpp's conventions (GGUF tensor names from the gguf package's tables, Llama q/k
rows permuted, Gemma norms stored as w + 1, 1-D tensors kept F32, 2-D weights in `qtype`) and its
hyper-parameters under llama.cpp's metadata keys. The tests then compare our import with
transformers' own GGUF loading of the same file and with the original model.
"""

from __future__ import annotations

import pathlib

import numpy as np

LLAMA_CPP_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotate-half q/k rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab(texts: list[str], vocab_size: int = 300, special: tuple[str, ...] = ()) -> dict:
    """A small byte-level BPE trained on `texts`: {"tokens", "types", "merges"} as a GGUF stores them."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in special else 1 for t in tokens]
    return {"tokens": tokens, "types": types, "merges": merges}


def sentencepiece_vocab(texts: list[str], vocab_size: int = 300) -> tuple[dict, bytes]:
    """A small sentencepiece BPE model (byte fallback, dummy prefix, no normalisation) and its
    vocabulary as llama.cpp's _set_vocab_sentencepiece stores it: ({"tokens", "scores", "types",
    "kind": "llama", "space_prefix", "special_ids"}, the model's bytes)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, hard_vocab_limit=False, character_coverage=1.0, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(n)]
    vocab = {"tokens": [sp.id_to_piece(i) for i in range(n)], "scores": [sp.get_score(i) for i in range(n)],
             "types": types, "kind": "llama", "space_prefix": True, "special_ids": {"bos": 1, "eos": 2, "unk": 0}}
    return vocab, model.getvalue()


def write_gguf(
    path: pathlib.Path,
    hf_model,
    *,
    arch: str,
    qtype: str = "F32",
    vocab: dict | None = None,
    pre: str = "smollm",
    special_ids: dict[str, int] | None = None,
    chat_template: str | None = None,
    tensor_types: dict[str, str] | None = None,
    extra_metadata=None,
) -> pathlib.Path:
    """Writes `hf_model` as a GGUF of architecture `arch` (see the module docstring)."""
    import gguf

    config = hf_model.config
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}", gguf.LlamaFileType.ALL_F32)))
    if vocab is not None and vocab.get("kind") == "llama":  # sentencepiece: scores, no merges
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["types"])
        writer.add_add_space_prefix(vocab["space_prefix"])
        special_ids = {**vocab["special_ids"], **(special_ids or {})}
        for role, token_id in special_ids.items():
            getattr(writer, f"add_{role}_token_id")(token_id)
        writer.add_add_bos_token(True)
    elif vocab is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for role, token_id in (special_ids or {}).items():
            getattr(writer, f"add_{role}_token_id")(token_id)
        writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if extra_metadata is not None:
        extra_metadata(writer)

    for hf_name, tensor in hf_model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        data = tensor.detach().float().numpy()
        base, suffix = hf_name.rsplit(".", 1)
        for proj, heads in LLAMA_CPP_PERMUTED.items():
            if arch == "llama" and f".{proj}" in base:
                data = llama_cpp_permute(data, getattr(config, heads))
        if arch in ("gemma", "gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1
        name = f"{table.get_name(base)}.{suffix}"
        kind = (tensor_types or {}).get(name, qtype if data.ndim == 2 else "F32")
        ggml_type = gguf.GGMLQuantizationType[kind]
        if kind in ("F32", "F16", "F64"):
            writer.add_tensor(name, data.astype(np.dtype(kind.lower().replace("f", "float"))))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)  # byte rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
