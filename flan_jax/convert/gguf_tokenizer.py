"""A GGUF's tokenizer metadata -> `tokenizer.json` + `tokenizer_config.json` (HF `tokenizers`).

A GGUF carries no tokenizer.json: it stores the vocabulary, the merges, each token's type and the
special token ids under llama.cpp's keys, plus `tokenizer.ggml.pre`, the name of the pre-tokenizer
(how text is split into words before BPE) that llama.cpp hard-codes per name. This module rebuilds
the tokenizer those describe as an ordinary HF `tokenizers` file, so the rest of flan_jax (and
transformers, after `--to_hf`) reads it like any other:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, ...).
- `"llama"`: a sentencepiece BPE vocabulary (Llama 2, Mistral, Gemma): pieces with their scores,
  byte-fallback pieces `<0x..>`; the merges are rebuilt from the scores (as sentencepiece and
  transformers do), `"▁"` marks spaces and `add_space_prefix` adds one before the text.
- Pre-tokenizers: the regex sequence llama.cpp's llama-vocab.cpp uses for each name we know
  (`PRE_TOKENIZERS`); any other name is refused, since splitting differently from training gives
  other token ids without any error.
- Token type 3 (control, e.g. `<|im_start|>`) becomes a special added token and type 4
  (user-defined) a plain added token, so both stay whole in text, as llama.cpp matches them.
- tokenizer_config.json names BOS/EOS/PAD/UNK, says whether BOS is added, and carries the chat
  template (`tokenizer.chat_template`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flan_jax.convert.gguf_import import GGUFError

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order (each splits the pieces further).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
}
_CONTROL, _USER_DEFINED = 3, 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table that byte-level BPE spells its tokens with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return dict(sorted(table.items()))


def build_tokenizer(meta: Mapping[str, Any], *, source: str):
    """The `tokenizers.Tokenizer` a GGUF's metadata describes (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{source}: no tokenizer metadata (tokenizer.ggml.model); convert with --skip_tokenizer "
                        "and give the model's own tokenizer.json to config.data.tokenizer.path")
    if kind == "llama":
        return _sentencepiece_bpe(meta, source=source)
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model={kind!r} is not rebuilt (only 'gpt2', byte-level BPE, and "
                        "'llama', sentencepiece BPE); convert with --skip_tokenizer and use the model's own tokenizer.json")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer flan_jax does not know; known: "
                        f"{sorted(PRE_TOKENIZERS)}. Convert with --skip_tokenizer and use the model's tokenizer.json")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise GGUFError(f"{source}: a byte-level BPE tokenizer without tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        # Tokens are stored in the byte alphabet; a few files write some as plain text: respell those.
        if not set(token) <= alphabet and types[index] != _CONTROL:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens has {len(tokens) - len(vocab)} duplicate spellings")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                     fuse_unk=False, continuing_subword_prefix="", end_of_word_suffix=""))
    splits = PRE_TOKENIZERS[pre]
    if splits == (_GPT2_SPLIT,):
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_ in zip(tokens, types) if kind_ == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED])
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFError(f"{source}: the rebuilt tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} "
                        f"tokens, the file lists {len(tokens)}")
    return tokenizer


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a sentencepiece vocabulary implies: every split of a piece into two pieces,
    best-scoring merged piece first (sentencepiece's order; transformers' `generate_merges`)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(meta: Mapping[str, Any], *, source: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError(f"{source}: a sentencepiece tokenizer needs one tokenizer.ggml.scores entry per token")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer = Tokenizer(models.BPE(
        vocab={token: index for index, token in enumerate(tokens)}, merges=merges_from_scores(tokens, list(scores)),
        unk_token=tokens[int(unk_id)] if unk_id is not None else None, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if prefix else []))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    return tokenizer


def tokenizer_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens by name, whether BOS/EOS are added, the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[f"{role}_token"] = tokens[int(token_id)]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def tokenizer_files(meta: Mapping[str, Any], *, source: str) -> dict[str, str]:
    """{file name: text} of the tokenizer files to write beside a converted GGUF."""
    tokenizer = build_tokenizer(meta, source=source)
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False) + "\n",
    }
