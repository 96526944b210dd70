"""What a resume may change: every field of the default config falls in one documented kind."""

import pytest

from flan_jax import default_config
from flan_jax.train import checkpointing, config_change, exit_codes


def test_fields_fall_in_the_documented_kinds():
    expected = {
        "optimizer.learning_rate": "meaning", "optimizer.schedule": "meaning", "optimizer.grad_accum_steps": "meaning",
        "train.num_steps": "meaning", "loss.z_loss": "meaning", "model.dtype": "meaning", "data.loss_on_inputs": "meaning",
        "model.d_model": "incompatible", "model.vocab_size": "incompatible", "data.batch_size": "incompatible",
        "data.tokenizer.path": "incompatible", "data.train_mixture": "incompatible", "seed": "incompatible",
        "model.kernels": "free", "model.scan_layers": "free", "model.remat": "free", "checkpoint.keep": "free", "eval.mixtures": "free",
        "mesh.data": "free", "train.log_every": "free", "train.allow_config_change": "free",
        "lora.rank": "incompatible", "lora.targets": "incompatible", "trainable.paths": "incompatible",
        "trainable.frozen_dtype": "incompatible", "lora.alpha": "meaning", "lora.dropout": "meaning",
        "lora.init_from": "free",
        # Preference tuning: the objective and its reference source shape the state and batch;
        # its coefficients change what the run computes (allowed on request).
        "objective.name": "incompatible", "objective.reference": "incompatible", "objective.beta": "meaning",
        "objective.label_smoothing": "meaning", "objective.sft_weight": "meaning", "objective.simpo_gamma": "meaning",
        "objective.margin": "meaning",
        # Online RL: the prompt stream's shape, updates per step and the PPO-ptx stream are the
        # checkpoint's; rewards, sampling and loss coefficients change what it computes.
        "rl.group_size": "incompatible", "rl.max_new_tokens": "incompatible", "rl.on_long_prompt": "incompatible",
        "rl.epochs": "incompatible", "rl.minibatches": "incompatible", "rl.ptx_coef": "incompatible",
        "rl.ptx_mixture": "incompatible", "rl.ptx_batch_size": "incompatible", "rl.reward_model_batch_size": "free",
        "rl.rewards": "meaning", "rl.reward_model": "meaning", "rl.temperature": "meaning", "rl.kl_coef": "meaning",
        "rl.epsilon": "meaning", "rl.loss_type": "meaning", "rl.scale_rewards": "meaning", "rl.vf_coef": "meaning",
    }
    assert {field: config_change.kind(field) for field in expected} == expected
    every = config_change.flatten(checkpointing.config_to_dict(default_config.get_config()))
    assert {config_change.kind(field) for field in every} == {"free", "meaning", "incompatible"}


def test_only_real_differences_are_reported_and_refused_as_documented():
    defaults = checkpointing.config_to_dict(default_config.get_config())
    saved = checkpointing.config_to_dict(default_config.get_config())
    del saved["train"]["allow_config_change"]  # a checkpoint of an older flan_jax: the field is new
    current = checkpointing.config_to_dict(default_config.get_config())
    assert config_change.differences(saved, current, defaults) == {}
    current["optimizer"]["learning_rate"] = 5e-4
    current["checkpoint"]["keep"] = 7
    assert config_change.differences(saved, current, defaults) == {
        "checkpoint.keep": (3, 7), "optimizer.learning_rate": (1e-3, 5e-4)}
    with pytest.raises(exit_codes.ConfigMismatchError, match=r"config.optimizer.learning_rate \(0.001 -> 0.0005\)"):
        config_change.check_resume(saved, current, defaults, allow=False, checkpoint="ckpt")
    assert config_change.check_resume(saved, current, defaults, allow=True, checkpoint="ckpt") == {
        "optimizer.learning_rate": [1e-3, 5e-4]}  # the free change is logged, not recorded
    current["model"]["n_layers"] = 8
    with pytest.raises(exit_codes.ConfigMismatchError, match=r"Cannot resume ckpt.*config.model.n_layers \(4 -> 8\)"):
        config_change.check_resume(saved, current, defaults, allow=True, checkpoint="ckpt")
