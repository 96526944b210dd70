"""T5 through the shared trainer, loader and evaluator: packing equality of the loss, a demo run
(train, evaluate, resume), SIGKILL + restart bitwise, an 8-device mesh equal to one device, and
bad input (wrong family's data or settings, over-long targets counted)."""

from __future__ import annotations

import json
import random
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

import flan_jax_tasks  # noqa: F401  (registers the built-in mixture the tokenizer and runs use)
from flan_jax.data import converters, features as features_lib, loader, tokenizer as tokenizer_lib
from flan_jax.model import registry, t5
from flan_jax.model.t5_config import T5Config
from flan_jax.train import checkpointing, loop, objectives, optimizer, partitioning, state as state_lib, step as step_lib
from tests import t5_fakes, test_resume, train_fakes


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    return t5_fakes.train_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"))


def test_trained_t5_tokenizer_follows_t5_conventions(t5_tokenizer):
    tok = tokenizer_lib.SentencePieceTokenizer(t5_tokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.extra_ids) == (0, 1, None, 100)
    assert tok.vocab_size == tok.num_pieces + 100 and tok.sentinel_id(0) == tok.vocab_size - 1
    ids = tok.encode("What is 2 plus 3?")
    assert tok.decode(ids + [tok.sentinel_id(0)] + ids + [tok.eos_id, 0]) == "What is 2 plus 3?<extra_id_0>What is 2 plus 3?"
    with pytest.raises(ValueError, match="no BOS"):
        converters.DECODER.check_tokenizer(tok)  # a decoder family cannot start its rows

    # transformers' T5Tokenizer over the same pieces, sentinels laid out as in its own default vocabulary
    # (and in google/flan-t5-*'s tokenizer.json): the same special ids.
    transformers = pytest.importorskip("transformers")
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    hf = transformers.T5Tokenizer(vocab=_pieces(tok) + sentinels, extra_ids=100)
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (tok.pad_id, tok.eos_id, 2) and len(hf) == tok.vocab_size
    assert hf.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [tok.sentinel_id(0), tok.sentinel_id(99)]


def _pieces(tok):
    return [(tok._sp.id_to_piece(i), tok._sp.get_score(i)) for i in range(tok.num_pieces)]


def _sft(config_overrides=None):
    config = train_fakes.tiny_config()
    config.model.family = "t5"
    for key, value in (config_overrides or {}).items():
        config.data[key] = value
    return config, objectives.get_objective(config)


def test_packed_rows_give_each_example_the_loss_it_has_alone(t5_tokenizer):
    tok = tokenizer_lib.SentencePieceTokenizer(t5_tokenizer)
    config = features_lib.FeatureConfig(seq_len=64, targets_len=24)
    texts = [("What is 2 plus 3?", "5"), ("Is the sky green? Options: yes, no", "no"), ("Repeat: red blue", "red blue")]
    examples = [converters.ENCDEC.featurize({"inputs": i, "targets": t}, tok, config)[0] for i, t in texts]
    cfg = T5Config(vocab_size=512, d_model=32, n_layers=2, n_decoder_layers=2, n_heads=2, head_dim=16, d_ff=64,
                   relative_buckets=8, relative_max_distance=32)
    model = nnx.jit(lambda: t5.T5(cfg, rngs=nnx.Rngs(1)))()
    exp_config, objective = _sft()

    parts = state_lib.ModelParts(lambda: model, *_one_device())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    @jax.jit
    def objective_loss(batch):
        prepared = objective.prepare(batch)
        ctx = objectives.ObjectiveContext(parts, params, {}, jax.random.key(0))
        return objective.loss_sum(ctx, {**batch, **prepared.features})[0], prepared.denominator

    def loss_sum(rows):
        batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in converters.ENCDEC.batch_keys}
        return tuple(float(x) for x in objective_loss(batch))

    packed, packed_count = loss_sum([converters.ENCDEC.build_row(examples, (64, 24))])
    alone = [loss_sum([converters.ENCDEC.pad_one(e, row_shape=(64, 24))]) for e in examples]
    assert packed_count == sum(n for _, n in alone) == sum(len(e["decoder_target_tokens"]) for e in examples)
    assert packed == pytest.approx(sum(loss for loss, _ in alone), rel=1e-5)


def _one_device():
    config = train_fakes.tiny_config()
    config.mesh.data = 1
    return partitioning.make_mesh(config.mesh, jax.devices()[:1]), partitioning.axis_rules(config.mesh)


def test_t5_demo_trains_evaluates_and_resumes(tmp_path, t5_tokenizer, cache_dir):
    overrides = t5_fakes.t5_demo_overrides(
        t5_tokenizer, eval__mixtures=("synthetic.sentiment.heldout_templates", "synthetic.extract_city"), eval__at_end=True)
    config = t5_fakes.t5_demo_config(overrides)
    loop.train(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["loss_weight_sum"] > 0
    results = json.loads((tmp_path / "eval" / "step_4.json").read_text())
    metrics = {name: set(task["metrics"]) for name, task in results["tasks"].items()}
    assert any("rank_classification" in m for m in metrics.values()) and all("loss" in m for m in metrics.values())
    assert any(m & {"exact_match", "rouge_l"} for m in metrics.values())
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions_4.jsonl").read_text().splitlines()]
    assert predictions and all(isinstance(p["prediction"], str) for p in predictions)

    config = t5_fakes.t5_demo_config({**overrides, "train.num_steps": 6, "train.allow_config_change": True, "eval.mixtures": ()})
    loop.train(config, tmp_path)  # resumes at step 4
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    model, saved_config, step = checkpointing.load_model(tmp_path)
    assert isinstance(model, t5.T5) and step == 6 and saved_config.model.family == "t5"


@pytest.fixture(scope="module")
def converted_hf_t5(tmp_path_factory):
    """(HF folder, converted checkpoint, its T5Config) of a tiny random FLAN-T5-layout model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flan_jax import convert

    root = tmp_path_factory.mktemp("converted_hf_t5")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=512, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.1))
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.1)
    hf.save_pretrained(root / "hf")
    cfg = convert.convert_from_hf(root / "hf", root / "converted")
    return root / "hf", root / "converted", cfg


def _init_from_overrides(converted_hf_t5, t5_tokenizer, **extra):
    from flan_jax import convert

    _, converted, cfg = converted_hf_t5
    overrides = {f"model.{k}": v for k, v in convert.config_model_overrides(cfg).items()}
    return t5_fakes.t5_demo_config({
        **t5_fakes.t5_demo_overrides(t5_tokenizer, **extra),
        **overrides, "checkpoint.init_from": str(converted), "model.dropout_rate": 0.0,
    })


def test_init_from_a_converted_hf_t5_trains_from_its_weights(tmp_path, t5_tokenizer, converted_hf_t5):
    from flan_jax import convert

    config = _init_from_overrides(converted_hf_t5, t5_tokenizer, train__num_steps=1, optimizer__learning_rate=0.0)
    loop.train(config, tmp_path / "run")
    model, _, _ = checkpointing.load_model(tmp_path / "run")
    _, converted = convert.load_converted(converted_hf_t5[1])
    trained, source = (jax.tree.leaves(tree) for tree in (nnx.state(model, nnx.Param), converted))
    assert len(trained) == len(source) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(trained, source))


def test_a_lora_run_on_a_converted_t5_ships_an_adapter_peft_loads(tmp_path, t5_tokenizer, converted_hf_t5):
    """The user's path: LoRA on a converted (FLAN-)T5 through the trainer (adapter-only
    checkpoints, the base untouched), then `--to_peft`, loaded by peft onto the original
    T5ForConditionalGeneration with our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    from flan_jax import convert
    from flan_jax.convert.__main__ import main as convert_main
    from flan_jax.model import lora

    hf_dir, converted_dir, _ = converted_hf_t5
    config = _init_from_overrides(converted_hf_t5, t5_tokenizer, train__num_steps=3, optimizer__learning_rate=3e-2)
    config.lora.update(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "wi_0", "wo"))
    loop.train(config, tmp_path / "run")
    model, _, _ = checkpointing.load_model(tmp_path / "run")
    adapted = dict(lora.adapters(model))
    assert {path.rsplit("/", 1)[-1] for path in adapted} == {"q", "v", "gate", "down"}
    assert any(path.startswith("decoder/layers/0/cross_attn/") for path in adapted)
    assert all(np.any(np.asarray(m.lora_b[...])) for m in adapted.values())  # every adapter trained
    _, base = convert.load_converted(converted_dir)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, value in traversals.flatten_mapping(nnx.to_pure_dict(base)).items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value), err_msg=str(path))  # frozen base

    assert convert_main([f"--to_peft={tmp_path / 'adapter'}", f"--workdir={tmp_path / 'run'}"]) == 0
    enc, dec = t5_fakes.random_ids((2, 9), 3, 512), t5_fakes.random_ids((2, 5), 4, 512)
    ours = t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    with_adapter = peft_lib.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    np.testing.assert_allclose(t5_fakes.hf_logits(with_adapter, enc, dec), ours, atol=1e-4, rtol=1e-4)
    del torch


NUM_STEPS = 12


def _command(workdir, tokenizer_path):
    overrides = t5_fakes.t5_demo_overrides(tokenizer_path, train__num_steps=NUM_STEPS, checkpoint__every_steps=3,
                                           checkpoint__keep=2, model__dropout_rate=0.1)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/flan_t5_demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def test_sigkill_and_restart_of_a_t5_run_is_bitwise_identical(tmp_path, t5_tokenizer, cache_dir):
    env = train_fakes.subprocess_env(cache_dir)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    test_resume._run(_command(reference, t5_tokenizer), env)
    rng = random.Random(17)
    for _ in range(3):
        if test_resume._kill_at_random_moment(_command(resumed, t5_tokenizer), env, resumed, rng, num_steps=NUM_STEPS):
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert test_resume._lines(resumed) < NUM_STEPS
    test_resume._run(_command(resumed, t5_tokenizer), env)
    ref, res = test_resume._records(reference), test_resume._records(resumed)
    assert [r["step"] for r in res] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "loss_weight_sum", "data_examples"):
        assert [r[key] for r in res] == [r[key] for r in ref], key  # exact, dropout included
    flat = [jax.tree.leaves(nnx.state(checkpointing.load_model(w)[0], nnx.Param)) for w in (reference, resumed)]
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(*flat))


def _t5_steps(mesh_shape, devices, batches):
    config = train_fakes.tiny_config()
    config.model.family = "t5"
    config.model.update(vocab_size=64, d_model=32, n_layers=1, n_decoder_layers=1, n_heads=4, head_dim=8, d_ff=64,
                        relative_buckets=8, relative_max_distance=16, dropout_rate=0.1)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:devices])
    rules = partitioning.axis_rules(config.mesh)
    cfg = registry.config_from(config.model)
    parts = state_lib.ModelParts(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.num_steps)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, seed=0, mesh=mesh)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    step_lib.check_batch(batches[0], config, mesh)
    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = train_step(state, partitioning.global_batch(batch, partitioning.batch_sharding(mesh, rules)))
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


def test_an_8_device_mesh_t5_step_equals_one_device():
    batches = [t5_fakes.random_packed_batch(0)] * 2  # the same batch twice: the 2nd loss must be lower
    ref_losses, ref_params = _t5_steps((1, 1, 1), 1, batches)
    losses, params = _t5_steps((2, 2, 2), 8, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[1] < ref_losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), params, ref_params)


# ---------------------------------------------------------------------- bad input
def test_one_familys_batch_given_to_the_other_names_the_missing_features():
    mesh, _ = _one_device()
    config, _ = _sft()
    with pytest.raises(KeyError, match=r"lacks \['encoder_input_tokens'.*family='t5'"):
        step_lib.check_batch(train_fakes.packed_batch(0), config, mesh)
    decoder_config = train_fakes.tiny_config()
    with pytest.raises(KeyError, match=r"lacks \['input_tokens'.*family='llama'"):
        step_lib.check_batch(t5_fakes.random_packed_batch(0), decoder_config, mesh)


def test_decoder_settings_for_t5_and_t5_settings_for_a_decoder_fail_before_training(tmp_path, t5_tokenizer):
    for change, match in ((dict(data__prefix_lm=True), "prefix_lm"), (dict(data__loss_on_inputs=True), "loss_on_inputs"),
                          (dict(model__rope_theta=5.0), "rope_theta")):
        config = t5_fakes.t5_demo_config(t5_fakes.t5_demo_overrides(t5_tokenizer, **change))
        with pytest.raises(ValueError, match=match):
            loop.train(config, tmp_path / "t5")
        assert not (tmp_path / "t5" / "checkpoints").exists()
    config = train_fakes.demo_config(train_fakes.demo_overrides(t5_tokenizer, data__targets_len=16))
    with pytest.raises(ValueError, match="targets_len"):
        loop.train(config, tmp_path / "decoder")
    config = train_fakes.demo_config(train_fakes.demo_overrides(t5_tokenizer))
    with pytest.raises(ValueError, match="no BOS"):  # a T5 tokenizer cannot feed a decoder
        loop.train(config, tmp_path / "decoder2")


def test_chat_settings_and_messages_examples_are_refused_for_t5(t5_tokenizer):
    """Chat templates are the decoder's way to lay out a conversation; T5 reads inputs/targets."""
    tok = tokenizer_lib.SentencePieceTokenizer(t5_tokenizer)
    converters.ENCDEC.check_tokenizer(tok)
    tok.chat_prompts = True  # what config.data.tokenizer.chat_template sets
    with pytest.raises(ValueError, match="chat_template"):
        converters.ENCDEC.check_tokenizer(tok)
    tok.chat_prompts = False
    feature_config = features_lib.FeatureConfig(seq_len=16, targets_len=8)
    example = {"task": "chat_task", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(ValueError, match="'chat_task'.*messages"):
        converters.ENCDEC.featurize(example, tok, feature_config)
    with pytest.raises(ValueError, match="conversation"):
        converters.ENCDEC.prompt_ids(tok, example["messages"][:1])


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_inputs_and_targets_are_cut_or_dropped_and_counted(t5_tokenizer, overlong):
    tok = tokenizer_lib.SentencePieceTokenizer(t5_tokenizer)
    config = train_fakes.tiny_config()
    config.data.update(seq_len=12, targets_len=4, batch_size=2, overlong=overlong, num_packing_bins=2)
    long = {"inputs": "What is 12 plus 30?", "targets": "forty two and more words", "task": "long"}
    short = {"inputs": "Hi", "targets": "ok", "task": "short"}
    records = [long, short, short, long] * 2  # each of the 2 row slots (every 2nd record) sees both
    import grain

    it = loader.make_train_iterator(config.data, tok, seed=0, process_index=0, process_count=1,
                                    examples=grain.MapDataset.source(records), converter=converters.ENCDEC)
    batch = next(it)
    assert batch["encoder_input_tokens"].shape == (2, 12) and batch["decoder_target_tokens"].shape == (2, 4)
    counts = it.stats.by_task
    if overlong == "drop":
        assert counts["long"].dropped == counts["long"].examples > 0
    else:
        assert counts["long"].response_truncated == counts["long"].examples > 0
        long_rows = batch["decoder_loss_weights"].sum(axis=1) == 4  # a cut response fills the row, no EOS
        assert long_rows.any() and not (batch["decoder_target_tokens"][long_rows] == tok.eos_id).any()
    assert counts["short"].truncated == counts["short"].dropped == 0
