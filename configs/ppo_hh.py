"""InstructGPT's third stage: PPO against a reward model trained on Anthropic HH-RLHF pairs.

    python -m flan_jax.train --config=configs/reward_model_hh.py --workdir=workdirs/rm_hh
    python -m flan_jax.train --config=configs/ppo_hh.py:workdirs/rm_hh,POLICY --workdir=workdirs/ppo_hh

The argument after the colon is `REWARD_MODEL[,POLICY]`:
  * REWARD_MODEL: a `reward_model` run's workdir (configs/reward_model_hh.py) or a Hugging Face
    `*ForSequenceClassification` folder (num_labels=1, with its tokenizer.json);
  * POLICY: where the policy starts, an SFT run's workdir or converted HF weights (their model section
    and tokenizer are used). Without it the policy starts from the reward model run itself (its
    decoder and tokenizer; the LM head as that run left it), which only checks the pipeline.
Prompts are the HH-RLHF dialogues up to their last "Assistant:" (`hh_rlhf.harmless_base.split`,
training split; the 4 pairs with an empty response are skipped and counted, as in the reward model's
run); each completion is scored by the reward model's `score` head on `[BOS] dialogue completion`
(in its own vocabulary), and `-kl_coef (log pi - log pi_ref)` is added at every token (PPO, GAE,
a value head on the policy's trunk). On a CPU, a few steps:

    python -m flan_jax.train --config=configs/ppo_hh.py:workdirs/rm_hh --workdir=/tmp/ppo_hh \\
        --config.train.num_steps=3 --config.data.batch_size=8 --config.rl.group_size=2

Reads `$FLAN_JAX_DATA_DIR/hh_rlhf/harmless-base-test.jsonl.gz`.
"""

from flan_jax import default_config
from flan_jax.rl import recipes


def get_config(arg: str = "workdirs/rm_hh"):
    reward_model, _, policy = arg.partition(",")
    config = default_config.get_config()
    config.data.train_mixture = "hh_rlhf.harmless_base.split"
    config.data.on_bad_record = "skip"  # the file's 4 empty responses (counted and logged)
    config.data.seq_len = 1024
    config.data.batch_size = 32  # completions per step: 16 dialogues x 2 samples

    config.objective.name = "ppo"
    config.rl.group_size = 2
    config.rl.max_new_tokens = 64
    config.rl.temperature = 1.0
    config.rl.rewards = ("reward_model",)
    config.rl.reward_model = reward_model
    config.rl.kl_coef = 0.05  # InstructGPT's per-token penalty beta (their 1.3B: 0.02)
    config.rl.gamma, config.rl.lam = 1.0, 0.95
    config.rl.vf_coef = 0.1
    config.rl.epochs, config.rl.minibatches = 2, 2
    config.rl.on_long_prompt = "skip"  # dialogues longer than seq_len - max_new_tokens (counted)
    config.rl.no_eos_penalty = 0.0

    recipes.start_from(config, policy or reward_model)
    config.optimizer.learning_rate = 1e-6 if policy else 1e-5
    config.optimizer.warmup_steps = 10
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 200
    config.train.log_every = 5
    config.checkpoint.every_steps = 50
    return config
