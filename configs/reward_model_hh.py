"""A reward model on Anthropic HH-RLHF (harmless-base pairs), InstructGPT's Bradley-Terry loss.

    python -m flan_jax.train --config=configs/reward_model_hh.py:INIT --workdir=workdirs/rm_hh

INIT (after the colon) is where the model starts from:
  * an SFT run's workdir (its newest checkpoint and its tokenizer), e.g. workdirs/demo, or
  * converted Hugging Face weights (`python -m flan_jax.convert --from_hf=HF_DIR --out=INIT`): its
    tokenizer.json is used, and config.model must describe the architecture (add the lines the
    converter printed, saved in INIT/config_overrides.py.txt, as --config.model.<field>=... flags);
  * nothing (`configs/reward_model_hh.py` alone): a small model from scratch with a tokenizer trained
    on the pairs, only to check the pipeline.
The `score` head is new in every case (initialised from the seed). Reads
`$FLAN_JAX_DATA_DIR/hh_rlhf/harmless-base-test.jsonl.gz` (2,312 pairs): every 8th record is held out
(289, `data.CarvedSplits`) and evaluated (pair accuracy = % with score(chosen) > score(rejected)), the
other 2,023 train.
The 5 pairs whose dialogues have different prompts are counted and skipped; so are the 4 with an
empty response, because this config sets data.on_bad_record = "skip" (all skips are logged).
Export: `python -m flan_jax.convert --to_hf=OUT --workdir=workdirs/rm_hh` (LlamaForSequenceClassification, ...).
"""

import pathlib

from flan_jax import default_config


def get_config(init: str = ""):
    config = default_config.get_config()
    config.data.train_mixture = "hh_rlhf.harmless_base.split"
    config.data.seq_len = 1024
    config.data.batch_size = 8
    config.data.on_bad_record = "skip"  # the 4 empty responses of the file (counted and logged)
    config.data.tokenizer.vocab_size = 8000
    config.data.tokenizer.train_examples = 2000

    config.objective.name = "reward_model"
    config.objective.margin = 0.0

    config.checkpoint.init_from = init
    if init and (pathlib.Path(init) / "tokenizer.json").is_file():  # converted HF weights
        config.data.tokenizer.kind = "hf"
        config.data.tokenizer.path = str(pathlib.Path(init) / "tokenizer.json")

    config.optimizer.learning_rate = 1e-5 if init else 3e-4
    config.optimizer.warmup_steps = 20
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 250  # ~1 epoch of the ~2,000 training pairs at 8 rows per step
    config.train.log_every = 10
    config.checkpoint.every_steps = 125

    config.eval.mixtures = ("hh_rlhf.harmless_base.split",)
    config.eval.split = "validation"
    config.eval.max_examples_per_task = 0  # all held-out pairs
    config.eval.every_steps = 125
    config.eval.at_start = True
    return config
