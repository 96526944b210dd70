"""Chat templates (sandboxed, char for char as transformers) and multi-turn chat SFT masks (vs TRL)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from flan_jax import data
from flan_jax.data import chat_features
from flan_jax.data.chat import ChatTemplate, ChatTemplateError
from flan_jax.data.errors import DataError
from flan_jax.data.features import FeatureConfig, featurize
from flan_jax.data.tokenizer import HFTokenizer

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# SmolLM2-Instruct's template (as its GGUF and tokenizer_config.json ship it): ChatML with a default system turn.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering with the assistant output marked, as TRL's *_training templates mark it.
CHATML_MARKED = CHATML.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}",
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": "It is 42."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "A colour?  "},
     {"role": "assistant", "content": "  Blue, or red.\n"}],
    [{"role": "user", "content": "émigré naïve 中文 😀\n\tTabs"}, {"role": "assistant", "content": "Unicode: ok"}],
]


def trl_templates() -> pathlib.Path:
    trl = pytest.importorskip("trl")
    return pathlib.Path(trl.__file__).parent / "chat_templates"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """A byte-level BPE tokenizer folder with ChatML special tokens and the SmolLM2 chat template."""
    import tokenizers

    import gguf_fakes

    texts = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant helpful AI named SmolLM"]
    vocab = gguf_fakes.byte_level_vocab(texts * 4, vocab_size=360, special=SPECIAL)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(vocab["tokens"])}, merges=[tuple(m.split(" ")) for m in vocab["merges"]]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_stock_templates_render_char_for_char_like_transformers(hf_tokenizer):
    """Every chat template TRL ships (Llama 3, Qwen 2.5/3, Gemma 1-4, Phi-3, ...), with and without a
    system message and the generation prompt, equals transformers' apply_chat_template."""
    files = sorted(trl_templates().glob("*.jinja"))
    rendered = 0
    for path in files:
        source = path.read_text()
        ours = ChatTemplate(source, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, name=path.name)
        for conversation in CONVERSATIONS + [CONVERSATIONS[0][:3]]:
            for generation_prompt in (False, True):
                try:
                    reference = hf_tokenizer.apply_chat_template(
                        conversation, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt,
                        bos_token="<s>", eos_token="</s>")
                except Exception:  # the template refuses this conversation: so must we
                    with pytest.raises(ChatTemplateError):
                        ours.render(conversation, add_generation_prompt=generation_prompt)
                    continue
                assert ours.render(conversation, add_generation_prompt=generation_prompt) == reference, path.name
                rendered += 1
    assert len(files) >= 40 and rendered >= 4 * len(files), (len(files), rendered)


def test_templates_cannot_reach_python_internals_or_mutate_inputs():
    messages = [{"role": "user", "content": "x"}]
    for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                   "{% set ns = namespace(_x=1) %}", "{{ raise_exception('nope') }}", "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render(messages)
    assert ChatTemplate("{{ messages.__class__ }}{{ messages[0].__class__ }}").render(messages) == ""  # undefined
    assert messages == [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}")


def test_assistant_mask_token_by_token_against_a_hand_built_expectation(tokenizer_dir):
    """Tokenizing piece by piece at the turn boundaries (special tokens and newlines, where byte-level
    BPE never merges) gives the expected ids, and each piece's role the expected mask."""
    tokenizer = HFTokenizer(tokenizer_dir)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for conversation in CONVERSATIONS:
        pieces = [] if conversation[0]["role"] == "system" else [(system, 0)]
        for message in conversation:
            pieces.append((f"<|im_start|>{message['role']}\n", 0))
            pieces.append((message["content"] + "<|im_end|>\n", int(message["role"] == "assistant")))
        expected_ids = [i for text, _ in pieces for i in tokenizer.encode(text)]
        expected_mask = [m for text, m in pieces for _ in tokenizer.encode(text)]
        ids, mask = chat_features.assistant_token_mask(conversation, tokenizer)
        assert ids == expected_ids
        assert mask == expected_mask


@pytest.mark.parametrize("ours, theirs", [
    ("chatml", "chatml_marked"),            # derived spans == TRL on the marked variant
    ("chatml_marked", "chatml_marked"),     # a marked template: its markers, as TRL
    ("llama3.jinja", "llama3_training.jinja"),
    ("qwen2_5_training.jinja", "qwen2_5_training.jinja"),
])
def test_masks_equal_trl_assistant_only_loss(tokenizer_dir, hf_tokenizer, tmp_path, ours, theirs):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def source(name):
        return {"chatml": CHATML, "chatml_marked": CHATML_MARKED}.get(name) or (trl_templates() / name).read_text()

    tokenizer = HFTokenizer(tokenizer_dir)
    tokenizer.chat_template = ChatTemplate(source(ours), special_tokens=tokenizer.special_token_texts(), name=ours)
    hf_tokenizer.chat_template = source(theirs)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    args = trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to=[], max_length=None,
                         bf16=False, use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tokenizer,
                             train_dataset=datasets.Dataset.from_dict({"messages": CONVERSATIONS}))
    for conversation, row in zip(CONVERSATIONS, trainer.train_dataset):
        ids, mask = chat_features.assistant_token_mask(conversation, tokenizer)
        assert ids == row["input_ids"]
        assert mask == [int(label != -100) for label in row["labels"]]


def test_templates_that_rewrite_earlier_turns_or_render_no_assistant_text_are_errors(tokenizer_dir):
    tokenizer = HFTokenizer(tokenizer_dir)
    conversation = CONVERSATIONS[0]
    # Qwen3's template drops past turns' reasoning, so earlier turns are not a prefix: refused by turn.
    rewriting = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last else m['content'][:2] }}\n{% endfor %}"
    tokenizer.chat_template = ChatTemplate(rewriting, name="rewriting")
    with pytest.raises(DataError, match="assistant turn 1"):
        chat_features.assistant_token_mask(conversation, tokenizer, task="t")
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    tokenizer.chat_template = ChatTemplate(silent, name="silent")
    with pytest.raises(DataError, match="task 't'.*silent renders no assistant tokens"):
        chat_features.assistant_token_mask(conversation, tokenizer, task="t")


@pytest.fixture
def messages_task():
    records = [{"id": str(i), "chat": conversation} for i, conversation in enumerate(CONVERSATIONS * 4)]
    task = data.Task("chat_test_task", data.InMemorySource({"train": records, "validation": records[:3]}), (),
                     messages_field="chat")
    data.register_task(task, replace=True)
    yield task
    data.unregister(task.name)


def test_messages_task_trains_on_every_assistant_turn(messages_task, tokenizer_dir):
    tokenizer = HFTokenizer(tokenizer_dir)
    example = next(iter(messages_task.get_dataset("train", shuffle=False)))
    assert example["messages"] == CONVERSATIONS[0] and example["targets"] == "It is 42."
    assert chat_features.eval_prompt(example) == CONVERSATIONS[0][:3]
    from flan_jax.eval import evaluator

    (prompt,), _ = evaluator.encode_prompts(tokenizer, [chat_features.eval_prompt(example)], 1000)
    assert prompt == tokenizer.encode(tokenizer.chat_template.render(CONVERSATIONS[0][:3], add_generation_prompt=True))
    features, _ = featurize(example, tokenizer, FeatureConfig(seq_len=256))
    ids, mask = chat_features.assistant_token_mask(CONVERSATIONS[0], tokenizer)
    assert features["input_tokens"].tolist() == ids[:-1] and features["target_tokens"].tolist() == ids[1:]
    assert features["loss_weights"].tolist() == mask[1:]  # position t is trained on token t + 1
    trained = [t for t, w in zip(features["target_tokens"], features["loss_weights"]) if w]
    assert tokenizer.decode(trained) == "Hi! How can I help?\nIt is 42.\n"  # both turns (the <|im_end|> ids are EOS)

    # The loader's packed batches carry the same weights.
    from flan_jax.data import loader

    import data_fakes

    config = data_fakes.data_config(train_mixture=messages_task.name, seq_len=128, batch_size=2)
    batch = next(loader.make_train_iterator(config, tokenizer, seed=0))
    assert 0 < batch["loss_weights"].sum() < (batch["segment_ids"] > 0).sum()


def test_bad_conversations_name_the_record_and_field():
    bad = [{"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
           {"chat": [{"role": "user", "content": "only a question"}]},
           {"chat": [{"role": "robot", "content": "x"}]}]
    # Checked when the dataset is built (a sample of records, the last one included), before training.
    with pytest.raises(DataError, match="record 1.*field 'chat'.*no assistant turn"):
        data.Task("chat_bad", data.InMemorySource({"train": bad[:2]}), (), messages_field="chat").get_dataset("train")
    with pytest.raises(DataError, match="record 2.*role='robot'"):
        data.Task("chat_bad", data.InMemorySource({"train": bad[:1] * 2 + bad[2:]}), (),
                  messages_field="chat").get_dataset("train")
    with pytest.raises(DataError, match="takes no templates"):
        data.Task("chat_bad2", data.InMemorySource({"train": bad}), [("{x}", "{y}")], messages_field="chat")


def test_chat_prompts_render_plain_examples_and_eval_prompts(tokenizer_dir):
    from flan_jax import default_config
    from flan_jax.data import tokenizer as tokenizer_lib
    from flan_jax.eval import scoring

    config = default_config.get_config().data.tokenizer
    config.update(kind="hf", path=str(tokenizer_dir), chat_template="tokenizer", system_prompt="Answer briefly.")
    tokenizer = tokenizer_lib.load_tokenizer(config)
    example = {"inputs": "A colour?  ", "targets": "  Blue, or red.\n", "task": "t"}
    features, _ = featurize(example, tokenizer, FeatureConfig(seq_len=256))
    ids, mask = chat_features.assistant_token_mask(CONVERSATIONS[1], tokenizer)
    assert features["target_tokens"].tolist() == ids[1:] and features["loss_weights"].tolist() == mask[1:]
    prompt = scoring.encode_prompt(tokenizer, example["inputs"])
    assert prompt == tokenizer.encode(ChatTemplate(CHATML).render(CONVERSATIONS[1][:2], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt  # the prompt is exactly what training conditioned the answer on

    config.chat_template = ""
    with pytest.raises(ValueError, match="system_prompt needs chat_template"):
        tokenizer_lib.load_tokenizer(config)
    config.update(system_prompt="", chat_template=str(tokenizer_dir / "missing.jinja"))
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        tokenizer_lib.load_tokenizer(config)


def test_sentencepiece_offsets_are_characters_not_bytes():
    import data_fakes

    tokenizer = data_fakes.tiny_tokenizer()
    text = "alpha émigré 中文 beta\n  gamma"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a <= b for a, b in offsets) and all(b1 <= a2 for (_, b1), (a2, _) in zip(offsets, offsets[1:]))
    assert np.all(np.diff([a for a, _ in offsets]) >= 0)
