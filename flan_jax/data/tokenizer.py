"""Tokenizers with explicit BOS/EOS/PAD ids: sentencepiece `.model` files and HF `tokenizer.json`.

The rest of the pipeline needs only `encode`, `encode_batch`, `decode`, `bos_id`, `eos_id`, `pad_id`,
`add_bos` and `vocab_size` (docs/design.md §3), so both kinds sit behind one small interface. Chat
formatting adds `encode_with_offsets` (character offsets, to map a chat template's assistant text
to tokens), `chat_template` (the model's own, or the one the config names) and `chat_prompts`
(whether plain inputs/targets examples and evaluation prompts go through that template too).

`add_bos`: whether a sequence starts with BOS. Tokenizers trained here and sentencepiece models
always do; an HF tokenizer follows its tokenizer_config.json (`add_bos_token`; SmolLM2 says false,
its chat template starts every turn with `<|im_start|>` itself) and defaults to true.

`pad_id` is always 0. Padding positions are masked out by `segment_ids == 0` and zero loss weights, so
what id 0 means in an external vocabulary (often `<unk>`) never matters. Tokenizers trained here for a
decoder put `<pad>` at 0, `<unk>` at 1, `<s>` (BOS) at 2 and `</s>` (EOS) at 3.

T5's conventions (`convention="t5"`, what a T5 family run trains; also what Google's T5 / FLAN-T5
`spiece.model` files have): `<pad>` 0 (also the decoder start token), `</s>` (EOS) 1, `<unk>` 2, no BOS,
and 100 sentinel ids `<extra_id_0>` ... `<extra_id_99>` after the sentencepiece pieces, counted down
from the top (`<extra_id_0>` is the last id), as Hugging Face's T5Tokenizer adds them. A sentencepiece
model with those special ids is read as a T5 tokenizer (sentinels included) automatically.

A tokenizer trained here round-trips text exactly (`decode(encode(s)) == s`): newlines, tabs and
repeated spaces survive (JAX_STACK_NOTES gotcha 8), unseen characters fall back to bytes, and no
dummy prefix space is added, so `encode(inputs) + encode(targets)` decodes to `inputs + targets`.

Train one from a registered mixture:

  python -m flan_jax.data.tokenizer --mixture=NAME --vocab_size=8000 --out=/tmp/tok.model [--convention=t5]
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import sentencepiece as spm

from flan_jax.data import chat
from flan_jax.data.chat import ChatTemplate

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# Tokens tried, in order, when an HF tokenizer.json does not say which token is BOS / EOS
# (tokenizer.json has no such field; it lives in tokenizer_config.json when that file exists).
_HF_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_HF_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>")

# Fixed seed for sentencepiece's internal sampling, so the same texts always give the same model.
_TRAINING_SEED = 1234

CONVENTIONS = ("decoder", "t5")
T5_EXTRA_IDS = 100  # sentinels of T5's span corruption, <extra_id_0> = the last id
# Special ids (pad, unk, bos, eos) of a tokenizer trained for each convention (-1: none).
_SPECIAL_IDS = {"decoder": (PAD_ID, UNK_ID, BOS_ID, EOS_ID), "t5": (0, 2, -1, 1)}


class Tokenizer:
    """The tokenizer interface the data pipeline, trainer and evaluator rely on."""

    bos_id: int | None  # None: the vocabulary has no BOS (T5); decoder families refuse such a tokenizer
    eos_id: int
    pad_id: int = PAD_ID
    vocab_size: int
    add_bos: bool = True
    chat_template: ChatTemplate | None = None  # for `messages` examples (and every prompt with chat_prompts)
    chat_prompts: bool = False  # True: inputs/targets examples and eval prompts are rendered as chats
    system_prompt: str = ""  # with chat_prompts: a system message before each rendered example

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the features stage adds those)."""
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character range in `text`."""
        raise NotImplementedError

    def special_token_texts(self) -> dict[str, str]:
        """bos_token / eos_token text, for chat templates that write them."""
        return {}


    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for several texts in one native call (much faster than a Python loop)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; PAD/BOS/EOS ids are dropped.

        So are ids past the tokenizer's vocabulary: models often pad their embedding table beyond
        it (for efficient sharding), and an untrained or badly tuned model may emit those ids.
        """
        raise NotImplementedError

    def _known(self, ids: Iterable[int]) -> list[int]:
        return [int(i) for i in ids if int(i) not in self._special and 0 <= int(i) < self.vocab_size]

    def _special_ids(self) -> set[int]:
        return {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (`.model` file or serialized proto bytes).

    A model with T5's special ids (pad 0, EOS 1, unk 2, no BOS) gets T5's 100 sentinel ids on top
    of its pieces (`extra_ids`, decoded as "<extra_id_N>"); `extra_ids=` sets another number.
    """

    def __init__(self, model: str | os.PathLike | bytes, *, name: str = "", extra_ids: int | None = None):
        if isinstance(model, bytes):
            self._sp = spm.SentencePieceProcessor(model_proto=model)
            self.name = name or "<in-memory sentencepiece model>"
        else:
            path = pathlib.Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"sentencepiece model {path} does not exist")
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self.name = name or str(path)
        self.num_pieces = self._sp.get_piece_size()
        bos = self._sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"sentencepiece model {self.name} has no EOS piece (eos_id={self.eos_id}); train it with "
                "eos_id set, e.g. with train_sentencepiece()"
            )
        t5_style = (self._sp.pad_id(), self._sp.unk_id(), bos, self.eos_id) == _SPECIAL_IDS["t5"]
        self.extra_ids = (T5_EXTRA_IDS if t5_style else 0) if extra_ids is None else int(extra_ids)
        self.vocab_size = self.num_pieces + self.extra_ids
        self._special = self._special_ids()
        self.add_bos = self.bos_id is not None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def sentinel_id(self, index: int) -> int:
        """The id of `<extra_id_{index}>` (T5: counted down from the last id)."""
        if not 0 <= index < self.extra_ids:
            raise ValueError(f"{self.name} has {self.extra_ids} sentinel ids; <extra_id_{index}> is not one")
        return self.vocab_size - 1 - index

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # sentencepiece encodes a list on a fresh thread pool: only worth it for many texts
        # (for 2 texts it is ~3x slower than 2 calls).
        if len(texts) < 64:
            return [self._sp.encode(text) for text in texts]
        return self._sp.encode(list(texts))

    def special_token_texts(self) -> dict[str, str]:
        texts = {"eos_token": self._sp.id_to_piece(self.eos_id)}
        if self.bos_id is not None:  # T5's vocabulary has none
            texts["bos_token"] = self._sp.id_to_piece(self.bos_id)
        return texts

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # sentencepiece reports byte offsets into the UTF-8 text: mapped back to characters.
        proto = self._sp.encode(text, out_type="proto")
        char_of_byte = [i for i, c in enumerate(text) for _ in c.encode("utf-8")] + [len(text)]
        ids = [piece.id for piece in proto.pieces]
        offsets = [(char_of_byte[piece.begin], char_of_byte[piece.end] if piece.end > piece.begin else char_of_byte[piece.begin])
                   for piece in proto.pieces]
        return ids, offsets

    def decode(self, ids: Iterable[int]) -> str:
        known = self._known(ids)
        if not self.extra_ids or all(i < self.num_pieces for i in known):
            return self._sp.decode(known)
        text, run = [], []
        for i in known:  # sentinels are written out, the pieces between them decoded together
            if i < self.num_pieces:
                run.append(i)
                continue
            text += [self._sp.decode(run), f"<extra_id_{self.vocab_size - 1 - i}>"]
            run = []
        return "".join([*text, self._sp.decode(run)])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, read with the `tokenizers` library (no transformers needed).

    BOS/EOS come from `bos_token`/`eos_token` when given, else from a `tokenizer_config.json` beside the
    file, else from the usual names (`<s>`, `<|endoftext|>`, ...). Models without a BOS token (GPT-2)
    use their EOS token as BOS, as they were trained.
    """

    def __init__(self, path: str | os.PathLike, *, bos_token: str = "", eos_token: str = ""):
        import tokenizers  # local import: only needed for this kind

        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"HF tokenizer file {path} does not exist")
        self.name = str(path)
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        named = chat.special_tokens_of(config)
        # BOS may be absent (T5); the decoder families refuse such a tokenizer (data.converters).
        self.bos_id = self._find_token(bos_token or named.get("bos_token"), _HF_BOS_CANDIDATES, "BOS", required=bool(bos_token))
        self.eos_id = self._find_token(eos_token or named.get("eos_token"), _HF_EOS_CANDIDATES, "EOS")
        self.add_bos = bool(config.get("add_bos_token", self.bos_id is not None))
        self._special_texts = {**named, "eos_token": self._tok.id_to_token(self.eos_id)}
        if self.bos_id is not None:
            self._special_texts["bos_token"] = self._tok.id_to_token(self.bos_id)
        self.chat_template = chat.ChatTemplate.from_tokenizer_dir(path.parent)
        self._special = self._special_ids()

    def _find_token(self, wanted: str | None, candidates: Sequence[str], role: str, required: bool = True) -> int | None:
        names = [wanted] if wanted else list(candidates)
        for token in names:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        if not required:
            return None
        raise ValueError(
            f"HF tokenizer {self.name}: no {role} token found (tried {names}); "
            f"set config.data.tokenizer.{role.lower()}_token"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def special_token_texts(self) -> dict[str, str]:
        return dict(self._special_texts)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._known(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _read_tokenizer_config(path: pathlib.Path) -> dict[str, Any]:
    """An HF tokenizer_config.json as a dict ({} when absent); a parse error names the file."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


# --------------------------------------------------------------------------- training


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, convention: str = "decoder") -> bytes:
    """Trains a unigram sentencepiece model on `texts` and returns its serialized bytes.

    Deterministic: the same texts in the same order give byte-identical models (single thread, no input
    sampling or shuffling, fixed seed). Settings keep text exact (gotcha 8), split digits and fall back to
    bytes for unseen characters. `vocab_size` is an upper bound: a small corpus gives a smaller vocabulary
    rather than an error (check `Tokenizer.vocab_size`). `convention` sets the special ids (module
    docstring); "t5" trains `vocab_size - 100` pieces so that with the sentinels the vocabulary is at
    most `vocab_size`.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"tokenizer convention {convention!r}: expected one of {CONVENTIONS}")
    pieces = vocab_size - (T5_EXTRA_IDS if convention == "t5" else 0)
    if pieces < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: 256 byte pieces + 4 special ids"
            + (" + T5's 100 sentinel ids" if convention == "t5" else "") + " need room"
        )
    pad_id, unk_id, bos_id, eos_id = _SPECIAL_IDS[convention]
    spm.set_random_generator_seed(_TRAINING_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t),
        model_writer=model,
        vocab_size=pieces,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        pad_id=pad_id,
        unk_id=unk_id,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def mixture_texts(mixture: str, *, split: str = "train", num_examples: int, seed: int = 0) -> list[str]:
    """Inputs and targets of the first `num_examples` examples of a registered task or mixture."""
    from flan_jax import data  # local import: the registry imports tasks/, which may import this module

    dataset = data.get(mixture).get_dataset(split, seed=seed, shuffle=True)
    texts = []
    for example in itertools.islice(iter(dataset), num_examples):
        texts.append(example["inputs"])
        texts.append(example["targets"])
    if not texts:
        raise ValueError(f"mixture {mixture!r} split {split!r} has no examples to train a tokenizer on")
    return texts


def write_atomically(path: pathlib.Path, content: bytes) -> None:
    """Writes `content` so that neither a reader nor a crash sees a half-written file (flan_jax/atomic_write.py)."""
    from flan_jax import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write.write_bytes(path, content)


# --------------------------------------------------------------------------- loading


def load_tokenizer(
    tok_config: Any,
    *,
    workdir: str | os.PathLike | None = None,
    train_texts: Iterable[str] | None = None,
    train_mixture: str = "",
    train_split: str = "train",
    convention: str = "decoder",
) -> Tokenizer:
    """The tokenizer `config.data.tokenizer` describes (see flan_jax/default_config.py).

    With an empty `tok_config.path`, a sentencepiece model is trained into `workdir/tokenizer.model`
    (reused when already there, so a resumed run keeps its vocabulary) from `train_texts`, or else
    from the first `tok_config.train_examples` examples of `train_mixture`.
    `config.data` itself may be passed instead of `config.data.tokenizer`: its `train_mixture` and
    `train_split` are then used. `convention` ("decoder" or "t5", the model family's) sets the special
    ids of a tokenizer trained here; a reused or given tokenizer is read as it is.
    """
    if "tokenizer" in tok_config:  # the whole data config
        train_mixture = train_mixture or tok_config.train_mixture
        train_split = tok_config.get("train_split", train_split)
        tok_config = tok_config.tokenizer
    kind = tok_config.kind
    if kind not in ("sentencepiece", "hf"):
        raise ValueError(f"config.data.tokenizer.kind={kind!r}: expected 'sentencepiece' or 'hf'")
    if tok_config.path:
        if kind == "hf":
            tokenizer: Tokenizer = HFTokenizer(
                tok_config.path,
                bos_token=tok_config.get("bos_token", ""),
                eos_token=tok_config.get("eos_token", ""),
            )
        else:
            tokenizer = SentencePieceTokenizer(tok_config.path)
        return with_chat_settings(tokenizer, tok_config)

    if kind != "sentencepiece":
        raise ValueError("config.data.tokenizer.path is empty: only a sentencepiece tokenizer can be trained")
    if workdir is None:
        raise ValueError("config.data.tokenizer.path is empty and no workdir was given to train a tokenizer into")
    path = pathlib.Path(workdir) / "tokenizer.model"
    if path.is_file():
        logging.info("Reusing the tokenizer trained earlier in %s", path)
        return with_chat_settings(SentencePieceTokenizer(path), tok_config)
    if train_texts is None:
        if not train_mixture:
            raise ValueError("no tokenizer path, no training texts and no mixture to train a tokenizer on")
        train_texts = mixture_texts(train_mixture, split=train_split, num_examples=tok_config.train_examples)
    logging.info("Training a %d-id sentencepiece tokenizer (%s ids) into %s", tok_config.vocab_size, convention, path)
    write_atomically(path, train_sentencepiece(train_texts, tok_config.vocab_size, convention=convention))
    return with_chat_settings(SentencePieceTokenizer(path), tok_config)


def with_chat_settings(tokenizer: Tokenizer, tok_config: Any) -> Tokenizer:
    """Applies `config.data.tokenizer.chat_template` / `system_prompt` (see default_config.py).

    "" keeps plain inputs/targets examples as they are (a `messages` task still uses the
    tokenizer's own template); "tokenizer" renders every example and evaluation prompt with the
    tokenizer's own template; any other value is the path of a .jinja template to use instead.
    """
    choice = tok_config.get("chat_template", "") or ""
    tokenizer.system_prompt = tok_config.get("system_prompt", "") or ""
    if not choice:
        if tokenizer.system_prompt:
            raise ValueError("config.data.tokenizer.system_prompt needs chat_template ('tokenizer' or a .jinja path)")
        return tokenizer
    if choice != "tokenizer":
        tokenizer.chat_template = ChatTemplate.from_file(choice, special_tokens=tokenizer.special_token_texts())
    elif tokenizer.chat_template is None:
        raise ValueError(f"config.data.tokenizer.chat_template='tokenizer', but {tokenizer!r} has no chat template "
                         "(tokenizer_config.json 'chat_template' or chat_template.jinja); give a .jinja path instead")
    tokenizer.chat_prompts = True
    return tokenizer


def main(argv: Sequence[str]) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    texts = mixture_texts(FLAGS.mixture, split=FLAGS.split, num_examples=FLAGS.train_examples, seed=FLAGS.seed)
    out = pathlib.Path(FLAGS.out)
    write_atomically(out, train_sentencepiece(texts, FLAGS.vocab_size, convention=FLAGS.convention))
    tokenizer = SentencePieceTokenizer(out)
    print(f"Wrote {out}: {tokenizer.vocab_size} pieces from {len(texts) // 2} examples of {FLAGS.mixture!r}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("mixture", None, "registered task or mixture to read texts from", required=True)
    flags.DEFINE_integer("vocab_size", 8000, "upper bound on the number of pieces")
    flags.DEFINE_string("out", None, "path of the .model file to write", required=True)
    flags.DEFINE_integer("train_examples", 50_000, "examples (inputs and targets) to train on")
    flags.DEFINE_string("split", "train", "split of the mixture")
    flags.DEFINE_integer("seed", 0, "seed of the mixture's example order")
    flags.DEFINE_enum("convention", "decoder", CONVENTIONS, "special ids: decoder (pad 0 unk 1 BOS 2 EOS 3) or t5")
    app.run(main)
