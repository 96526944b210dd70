"""Every configuration field, its default and its meaning, in one place.

Experiment configs in `configs/` start from `get_config()` and change only what differs, so a
reader sees an experiment as a short diff. Any field can be overridden on the command line:

  python -m flan_jax.train --config=configs/demo.py --workdir=DIR --config.train.num_steps=50

The structure is locked after `get_config()` returns, so a misspelt override fails at once.
"""

import ml_collections

from flan_jax import sharding


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # ---------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    data.train_mixture = ""  # a registered task or mixture name (see tasks/)
    data.task_modules = ()  # extra modules to import that register tasks outside tasks/ (e.g. "my_lab.tasks")
    data.train_split = "train"
    data.seq_len = 512  # tokens per packed row (encoder-decoder families: per encoder row, the inputs)
    data.targets_len = 0  # encoder-decoder families (T5): tokens per decoder row, the targets; 0: seq_len
    data.batch_size = 8  # global rows per step, across all processes
    data.pack = True  # False: one example per row (for comparisons)
    data.loss_on_inputs = False  # True: also train on the instruction tokens
    data.prefix_lm = False  # True: bidirectional attention over the instruction part
    data.overlong = "truncate"  # "truncate" (cut inputs, keep the response) or "drop"; both counted
    data.num_packing_bins = 64  # look-ahead of the best-fit packer
    data.on_bad_record = "error"  # "error" or "skip" (counted and logged)
    data.worker_count = 0  # grain worker processes (0: in the main process); fixed within a run (resume checks it)
    data.tokenizer = tok = ml_collections.ConfigDict()
    tok.kind = "sentencepiece"  # "sentencepiece" (.model) or "hf" (tokenizer.json)
    tok.path = ""  # empty: train a sentencepiece model on the training mixture into the workdir
    tok.vocab_size = 8000  # only used when training a tokenizer
    tok.train_examples = 50_000  # only used when training a tokenizer
    tok.bos_token = ""  # hf only: BOS token text ("": from tokenizer_config.json or the usual names)
    tok.eos_token = ""  # hf only: EOS token text (same rule)

    # ---------------------------------------------------------------- model
    config.model = model = ml_collections.ConfigDict()
    # Decoder-only: llama | mistral | qwen2 | gemma | gpt2; encoder-decoder: t5 (T5 v1.1 / FLAN-T5 /
    # mT5) | t5_original (ReLU, tied rescaled head). Sets the architecture defaults (model/registry.py).
    model.family = "llama"
    model.vocab_size = 8000
    model.d_model = 256
    model.n_layers = 4  # T5: encoder layers
    model.n_heads = 4
    model.n_kv_heads = 4
    model.head_dim = 64
    model.d_ff = 768
    model.max_positions = 2048
    model.rope_theta = 10_000.0
    # None: the family's default (tied for gemma and gpt2, untied otherwise).
    model.tie_embeddings = ml_collections.config_dict.placeholder(bool)
    model.norm_eps = ml_collections.config_dict.placeholder(float)  # None: the family's default
    # Architecture switches a family fixes (see flan_jax/model/config.py); None keeps the family's
    # value. Set them only to match a converted checkpoint (its model_config.json) or to experiment.
    model.norm = ml_collections.config_dict.placeholder(str)  # rms | layer
    model.norm_bias = ml_collections.config_dict.placeholder(bool)
    model.norm_scale_plus_one = ml_collections.config_dict.placeholder(bool)  # Gemma's (1 + w)
    model.gated_mlp = ml_collections.config_dict.placeholder(bool)  # SwiGLU / GeGLU
    model.activation = ml_collections.config_dict.placeholder(str)  # silu | gelu_tanh | gelu
    model.position = ml_collections.config_dict.placeholder(str)  # rope | learned
    model.rope_scaling = ml_collections.config_dict.placeholder(str)  # none | llama3 | linear
    model.rope_factor = ml_collections.config_dict.placeholder(float)
    model.rope_low_freq_factor = ml_collections.config_dict.placeholder(float)  # llama3
    model.rope_high_freq_factor = ml_collections.config_dict.placeholder(float)  # llama3
    model.rope_original_max_positions = ml_collections.config_dict.placeholder(int)  # llama3
    model.qkv_bias = ml_collections.config_dict.placeholder(bool)
    model.out_bias = ml_collections.config_dict.placeholder(bool)
    model.mlp_bias = ml_collections.config_dict.placeholder(bool)
    model.embed_scale = ml_collections.config_dict.placeholder(bool)  # Gemma's sqrt(d_model)
    model.sliding_window = ml_collections.config_dict.placeholder(int)  # 0: off
    model.init_std = ml_collections.config_dict.placeholder(float)  # None: 0.02
    # Encoder-decoder (T5) fields; decoder families leave them at None (model/t5_config.py).
    model.n_decoder_layers = ml_collections.config_dict.placeholder(int)  # None: n_layers
    model.relative_buckets = ml_collections.config_dict.placeholder(int)  # None: 32 relative position buckets
    model.relative_max_distance = ml_collections.config_dict.placeholder(int)  # None: 128
    model.scale_decoder_outputs = ml_collections.config_dict.placeholder(bool)  # original T5's d_model**-0.5
    model.dropout_rate = ml_collections.config_dict.placeholder(float)  # None: 0.0
    model.init_scale = ml_collections.config_dict.placeholder(float)  # None: 1.0 (HF's initializer_factor)
    model.param_dtype = "float32"
    model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    model.remat = "none"  # none | full | dots (which activations to recompute in backprop)
    # xla: jax.nn.dot_product_attention's XLA path, and for causal training batches a blocked
    #      version that skips the masked upper triangle (faster on CPU, see docs/training.md)
    # cudnn: jax.nn.dot_product_attention with cuDNN flash attention (use this on NVIDIA GPUs)
    # reference: plain einsum + softmax (tests)
    model.attention = "xla"

    # ---------------------------------------------------------------- mesh
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1: all remaining devices
    mesh.fsdp = 1
    mesh.tensor = 1
    mesh.axis_rules = tuple(sharding.DEFAULT_RULES)

    # ---------------------------------------------------------------- optimizer
    config.optimizer = opt = ml_collections.ConfigDict()
    opt.name = "adamw"  # adamw | adafactor
    opt.learning_rate = 1e-3  # peak
    opt.schedule = "cosine"  # cosine | linear | constant (all after a linear warmup)
    opt.warmup_steps = 100
    opt.end_learning_rate_fraction = 0.1  # final lr = fraction * peak (cosine, linear)
    opt.b1 = 0.9
    opt.b2 = 0.95
    opt.eps = 1e-8
    opt.weight_decay = 0.1
    # Parameters whose path matches one of these regular expressions get no weight decay.
    opt.no_decay_patterns = (r"norm", r"bias", r"embed")
    opt.clip_norm = 1.0  # global gradient norm; 0 disables
    opt.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)

    # ---------------------------------------------------------------- objective
    config.objective = objective = ml_collections.ConfigDict()
    # What the step minimises (flan_jax/train/objectives): "sft" = next-token cross-entropy on the
    # responses, configured by config.loss below.
    objective.name = "sft"

    # ---------------------------------------------------------------- loss (the "sft" objective)
    config.loss = loss = ml_collections.ConfigDict()
    loss.normalization = "tokens"  # tokens: mean over weighted tokens of the global batch; sequences: mean of per-sequence means
    loss.z_loss = 0.0
    loss.label_smoothing = 0.0

    # ---------------------------------------------------------------- training loop
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 1000
    train.log_every = 10
    train.on_nonfinite = "stop"  # stop | skip (skip the update, count it)
    train.progress_bar = True
    # Peak FLOP/s of one device for the MFU estimate; 0: known accelerators from a table, on CPU a
    # dense matmul measured at start; -1: do not report MFU.
    train.peak_flops_per_device = 0.0

    # ---------------------------------------------------------------- checkpoints
    config.checkpoint = ckpt = ml_collections.ConfigDict()
    ckpt.every_steps = 500
    ckpt.keep = 3
    ckpt.keep_best_metric = ""  # e.g. "overall/exact_match": also keep the best checkpoint by it
    ckpt.best_mode = "max"  # max | min: which end of keep_best_metric is best
    ckpt.async_save = True
    ckpt.init_from = ""  # a converted checkpoint (flan_jax.convert) to start from, params only

    # ---------------------------------------------------------------- evaluation
    config.eval = ev = ml_collections.ConfigDict()
    ev.mixtures = ()  # tasks or mixtures to evaluate (their validation/test split)
    ev.split = "validation"
    ev.every_steps = 0  # 0: only at_start / at_end
    ev.at_start = False
    ev.at_end = True
    ev.max_examples_per_task = 200
    ev.max_new_tokens = 64
    ev.batch_size = 16
    ev.num_shots = 0  # few-shot exemplars drawn from the training split
    ev.extra_metrics = ("loss",)  # computed for every task on top of the task's own `metrics`
    # Rank classification: False scores an option by the SUM of its token log-probs (T0/FLAN);
    # True by their mean, which removes the sum's bias towards short options.
    ev.length_normalized_options = False

    # ---------------------------------------------------------------- multi-host
    config.distributed = dist = ml_collections.ConfigDict()
    dist.initialize = False  # True: jax.distributed.initialize (from the fields or the environment)
    dist.coordinator_address = ""
    dist.num_processes = 0
    dist.process_id = -1
    return config
