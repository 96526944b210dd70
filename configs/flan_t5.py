"""FLAN-T5 at its published sizes, tuned on the real FLAN data folder (`flan_mini`).

    python -m flan_jax.train --config=configs/flan_t5.py:base --workdir=/tmp/flan_t5_base \\
        --config.checkpoint.init_from=/ckpt/flan-t5-base      # python -m flan_jax.convert --from_hf=...

The argument picks the size (small | base | large | xl | xxl; default base). The shapes are
google/flan-t5-* (= T5 v1.1 = t5x's t5_1_1/*.gin); tests/test_t5_configs.py checks them and their
parameter counts against transformers' T5ForConditionalGeneration built from the same config.json
fields. To start from the released weights, convert the Hugging Face checkpoint and point
`checkpoint.init_from` at it; its tokenizer (spiece.model: T5's ids, 100 sentinels) is copied along:
set `data.tokenizer.path` to it.

Memory and mesh (AdamW keeps 12 bytes per parameter in float32: params + two moments; Adafactor,
T5's own optimizer, about 4 + a little):

  size   params  one 80 GB GPU (H100/H200)               TPU pod slice (16 GB/chip v4: 32 GB)
  small  77M     data parallel                          data parallel
  base   248M    data parallel                          data parallel
  large  783M    fits with AdamW, bf16 compute          fsdp=4..8 (v4-8)
  xl     2.85B   AdamW + remat="full", bf16            fsdp=8 (v4-8), remat="full"
  xxl    11.1B   fsdp=8 over 8 GPUs, remat="full",       fsdp=16..32 (v4-32/64), tensor=1..4
                 Adafactor (AdamW's 134 GB of state)

The default rules (flan_jax.sharding.DEFAULT_RULES) shard every weight's `embed` dimension over
`fsdp` and heads / mlp / vocab over `tensor`; T5's relative position tables are tiny and replicated.
`tensor` > 1 pays an all-reduce per attention and FFN block: prefer fsdp until the per-device batch
gets too small (rows per device = batch_size / (data * fsdp)).
"""

from flan_jax import default_config

# google/flan-t5-<size> config.json: d_model, d_ff, n_heads (d_kv = 64), layers (encoder = decoder).
SIZES = {
    "small": dict(d_model=512, d_ff=1024, n_heads=6, n_layers=8),
    "base": dict(d_model=768, d_ff=2048, n_heads=12, n_layers=12),
    "large": dict(d_model=1024, d_ff=2816, n_heads=16, n_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, n_heads=32, n_layers=24),
    "xxl": dict(d_model=4096, d_ff=10240, n_heads=64, n_layers=24),
}
# (data, fsdp, tensor, remat, optimizer) that fit the size on the hardware of the docstring.
MESH = {
    "small": (-1, 1, 1, "none", "adamw"),
    "base": (-1, 1, 1, "none", "adamw"),
    "large": (-1, 1, 1, "none", "adamw"),
    "xl": (-1, 1, 1, "full", "adamw"),  # one 80 GB GPU; on a v4-8 set mesh.fsdp=8
    "xxl": (-1, 8, 1, "full", "adafactor"),
}


def get_config(size: str = "base"):
    if size not in SIZES:
        raise ValueError(f"configs/flan_t5.py:{size}: expected one of {sorted(SIZES)}")
    config = default_config.get_config()

    config.data.train_mixture = "flan_mini"
    config.data.seq_len = 1024  # encoder rows (FLAN-T5 was tuned with long inputs)
    config.data.targets_len = 256  # decoder rows
    config.data.batch_size = 64
    config.data.tokenizer.kind = "sentencepiece"
    config.data.tokenizer.path = ""  # set to the converted checkpoint's spiece.model (see above)
    config.data.tokenizer.vocab_size = 32100

    config.model.family = "t5"
    config.model.vocab_size = 32128  # 32,000 pieces + 100 sentinels, padded to a multiple of 128
    config.model.head_dim = 64
    config.model.relative_buckets = 32
    config.model.relative_max_distance = 128
    shape = SIZES[size]
    config.model.d_model = shape["d_model"]
    config.model.d_ff = shape["d_ff"]
    config.model.n_heads = shape["n_heads"]
    config.model.n_layers = shape["n_layers"]
    config.model.n_decoder_layers = shape["n_layers"]
    config.model.dropout_rate = 0.1  # as the released checkpoints' config.json
    config.model.param_dtype = "float32"
    config.model.dtype = "bfloat16"  # compute dtype on accelerators

    data, fsdp, tensor, remat, optimizer = MESH[size]
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.model.remat = remat
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = 5e-4
    config.optimizer.schedule = "constant"  # FLAN-T5 tuning used a constant rate
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.0

    config.train.num_steps = 10_000
    config.train.log_every = 50
    config.checkpoint.every_steps = 1000

    config.eval.mixtures = ("gsm8k", "instruction_eval")
    config.eval.every_steps = 1000
    config.eval.max_examples_per_task = 100
    config.eval.max_new_tokens = 128
    return config
