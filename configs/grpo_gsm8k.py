"""GRPO on GSM8K with the numeric-answer reward: the task's own `gsm8k_accuracy` on each sampled solution.

    python -m flan_jax.train --config=configs/grpo_gsm8k.py:INIT --workdir=workdirs/grpo_gsm8k

Meant for a GPU and a pretrained (or SFT-tuned) model; INIT (after the colon) is where the policy
starts: an SFT run's workdir (its model section and tokenizer are used), or converted Hugging Face
weights (`python -m flan_jax.convert --from_hf=HF_DIR --out=INIT`: its model_config.json and
tokenizer.json). Prompts are the `gsm8k` task's training questions with its FLAN CoT templates
(question + "Let's think step by step."-style trigger); the reward is 1 when the final number of the
completion (after "So the answer is", else its last number) equals the reference's, through the
task's metric: no reward code. Evaluated on the test split with greedy decoding.

On a CPU, as a pipeline check with a tiny model from scratch (nothing learns in a few steps):

    python -m flan_jax.train --config=configs/grpo_gsm8k.py --workdir=/tmp/gsm8k_check \\
        --config.train.num_steps=2 --config.data.batch_size=8 --config.rl.group_size=4 \\
        --config.rl.max_new_tokens=32 --config.eval.max_examples_per_task=8 --config.eval.max_new_tokens=32

Reads `$FLAN_JAX_DATA_DIR/gsm8k/{train,test}.jsonl`.
"""

from flan_jax import default_config
from flan_jax.rl import recipes


def get_config(init: str = ""):
    config = default_config.get_config()
    config.data.train_mixture = "gsm8k"
    config.data.seq_len = 512  # question (<= ~200 tokens) + a worked solution
    config.data.batch_size = 64  # completions per step: 8 questions x 8 samples
    config.data.tokenizer.vocab_size = 4000  # only when training one (no INIT)
    config.data.tokenizer.train_examples = 7473

    config.objective.name = "grpo"
    config.rl.group_size = 8
    config.rl.max_new_tokens = 256
    config.rl.temperature = 1.0
    config.rl.rewards = ("task_metric",)  # gsm8k_accuracy of the completion's final number
    config.rl.kl_coef = 0.04
    config.rl.loss_type = "dr_grpo"
    config.rl.scale_rewards = "none"  # Dr. GRPO: no std division, no length normalisation
    config.rl.no_eos_penalty = 0.5  # an unfinished solution gives no answer: discourage running on
    config.rl.on_long_prompt = "skip"

    recipes.start_from(config, init)
    config.model.dtype = "bfloat16"  # compute; parameters stay float32 (on an NVIDIA GPU add --config.model.attention=cudnn)
    config.optimizer.learning_rate = 1e-6 if init else 1e-4
    config.optimizer.warmup_steps = 10
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 500
    config.train.log_every = 5
    config.checkpoint.every_steps = 50

    config.eval.mixtures = ("gsm8k",)
    config.eval.split = "test"
    config.eval.max_examples_per_task = 200
    config.eval.max_new_tokens = 256
    config.eval.every_steps = 100
    config.eval.at_start = True
    return config
