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
    # Modules imported at start to register tasks and mixtures: the built-in ones (the repository's
    # tasks/, installed as `flan_jax_tasks`) plus, e.g., a lab's own package. Replacing the tuple drops
    # the built-ins: ("flan_jax_tasks", "my_lab.tasks") keeps both.
    data.task_modules = ("flan_jax_tasks",)
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
    # Chat formatting (flan_jax/data/chat.py). "": inputs/targets examples stay plain text (a
    # `messages` task still uses the tokenizer's own template); "tokenizer": every example and
    # evaluation prompt is rendered with the tokenizer's own chat template (tokenizer_config.json),
    # as an instruct model was trained; a path: that .jinja template instead.
    tok.chat_template = ""
    tok.system_prompt = ""  # with chat_template: a system message before every example

    # ---------------------------------------------------------------- model
    config.model = model = ml_collections.ConfigDict()
    # Decoder-only: llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3 | phi3 | olmo2 | gpt2;
    # encoder-decoder: t5 (T5 v1.1 / FLAN-T5 / mT5) | t5_original (ReLU, tied rescaled head).
    # Sets the architecture defaults (model/registry.py).
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
    model.layer_types = ml_collections.config_dict.placeholder(tuple)  # per layer "full" | "sliding"; (): all alike
    model.local_rope_theta = ml_collections.config_dict.placeholder(float)  # Gemma 3's sliding-layer rope base
    model.qk_norm = ml_collections.config_dict.placeholder(str)  # none | head | full
    model.block_norms = ml_collections.config_dict.placeholder(str)  # pre | sandwich | post
    model.attn_softcap = ml_collections.config_dict.placeholder(float)  # Gemma 2; 0: off
    model.final_softcap = ml_collections.config_dict.placeholder(float)  # Gemma 2; 0: off
    model.query_scale = ml_collections.config_dict.placeholder(float)  # Gemma's query_pre_attn_scalar; 0: head_dim
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
    # xla: jax.nn.dot_product_attention's XLA path (with the "cpu" kernels below, causal training
    #      batches take a blocked version that skips the masked upper triangle, see docs/training.md)
    # cudnn: jax.nn.dot_product_attention with cuDNN flash attention (use this on NVIDIA GPUs)
    # reference: plain einsum + softmax (tests)
    model.attention = "xla"
    # auto: the hand-written CPU kernels (custom-VJP matmuls, blocked causal attention, RoPE tables
    # once per step; flan_jax/model/kernels) on a CPU backend, the plain XLA formulation on GPU/TPU;
    # cpu | xla: force one (both compute the same model; benchmarks/RESULTS.md measures them).
    model.kernels = "auto"
    # Layers as one stacked block run by lax.scan (True: compile time independent of depth) or a
    # Python loop (False), for the decoder's stack and each of T5's two; None: scanned from 8 layers
    # (T5: encoder layers) on, except on CPU with bf16 compute and no remat
    # (flan_jax/model/family_config.py default_scan_layers: measured there). The parameter layout
    # follows; checkpoints in the other layout are converted when loaded.
    model.scan_layers = ml_collections.config_dict.placeholder(bool)

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

    # ---------------------------------------------------------------- trained parameters
    # Which parameters the optimizer trains (flan_jax/train/trainable.py): gradients, optimizer state
    # and weight decay cover only them; the rest is the frozen base, not saved in the run's
    # checkpoints but rebuilt from checkpoint.init_from (or the seed) and checked on resume.
    config.trainable = trainable = ml_collections.ConfigDict()
    # Regular expressions searched in parameter paths ("layers/0/attn/q/kernel"). Empty: every
    # parameter, or with LoRA the adapters (+ new scalar heads); with LoRA these add to the adapters.
    trainable.paths = ()
    trainable.logical_axes = ()  # also train parameters with a dimension of these names, e.g. ("heads",)
    trainable.exclude = ()  # regexes of parameters to keep frozen, e.g. (r"^embed", r"^lm_head")
    trainable.frozen_dtype = ""  # "" (param_dtype) | bfloat16 | float16: the dtype the frozen base is held in

    # ---------------------------------------------------------------- LoRA (flan_jax/model/lora.py)
    config.lora = lora = ml_collections.ConfigDict()
    lora.rank = 0  # 0: no LoRA; r > 0 adds adapters to `targets` and trains only them (see config.trainable)
    lora.alpha = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    lora.dropout = 0.0  # dropout on the adapters' input while training
    # "all-linear" (every projection; the output head excluded), projection names (q k v o gate up
    # down; PEFT's q_proj ... too) or regexes over projection paths ("layers/[0-3]/attn/(q|v)$").
    lora.targets = ("all-linear",)
    lora.rslora = False  # rank-stabilised scaling (Kalajdzievski 2023)
    lora.init_from = ""  # a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to start from

    # ---------------------------------------------------------------- objective
    config.objective = objective = ml_collections.ConfigDict()
    # What the step minimises (flan_jax/train/objectives): "sft" = next-token cross-entropy on the
    # responses, configured by config.loss below.
    objective.name = "sft"
    # Preference objectives (on data.PreferenceTask pairs): "reward_model", "dpo", "ipo", "simpo".
    objective.beta = 0.1  # dpo / ipo / simpo: the inverse temperature of the implicit reward
    objective.label_smoothing = 0.0  # dpo: > 0 is conservative DPO (the share of labels assumed flipped)
    objective.sft_weight = 0.0  # dpo / ipo: + weight x the chosen response's mean token NLL (RPO)
    objective.simpo_gamma = 0.5  # simpo: the target reward margin
    objective.margin = 0.0  # reward_model: -log sigmoid(r_chosen - r_rejected - margin)
    # dpo / ipo: where the reference log-probs come from: "cache" (one pass of the initial policy over
    # the run's pairs before training, kept in DIR/reference_cache/), "model" (a frozen copy of the
    # initial policy run at every step), "adapters_off" (LoRA: the policy with its adapters switched
    # off, the initial policy while they start at zero: one copy of the weights, no pre-pass), or
    # "auto": "adapters_off" where that is exact (LoRA from the seed, only adapters trained), else "cache".
    objective.reference = "auto"
    # Online RL (flan_jax/rl, docs/training.md "Reinforcement learning"): "grpo" or "ppo", configured by
    # config.rl below; train.num_steps then counts rollouts (each followed by rl.epochs x rl.minibatches updates).

    # ---------------------------------------------------------------- online RL ("grpo" / "ppo")
    config.rl = rl = ml_collections.ConfigDict()
    # Rollouts: data.batch_size completions per step = data.batch_size / group_size prompts of
    # data.train_mixture (rendered with its templates), group_size samples each. A completion has at
    # most max_new_tokens tokens; a prompt (BOS included) at most data.seq_len - max_new_tokens.
    rl.group_size = 8
    rl.max_new_tokens = 32
    rl.temperature = 1.0
    rl.top_p = 1.0
    rl.top_k = 0
    rl.on_long_prompt = "error"  # error | skip (draw the next prompt, counted) | truncate (cut the middle, counted)
    # Rewards (flan_jax/rl/rewards.py): registered names, summed with reward_weights (empty: all 1).
    # "task_metric": the prompt's task scores the completion with its own metric (exact match, GSM8K
    # number, ROUGE-L, ...); "reward_model": the score head of rl.reward_model; or a user's.
    rl.rewards = ("task_metric",)
    rl.reward_weights = ()
    rl.task_metric = ""  # the metric task_metric uses ("" = each task's first generation metric)
    rl.reward_model = ""  # a reward_model run's workdir or a HF *ForSequenceClassification folder
    rl.reward_model_batch_size = 32  # completions scored per reward-model pass
    rl.on_bad_reward = "error"  # error | skip (a reward raised or is NaN: the completion leaves the loss, counted)
    # Format penalties subtracted from the reward: no_eos_penalty for a completion with no EOS within
    # max_new_tokens; DAPO's soft over-length penalty, growing linearly to overlong_penalty over the
    # last overlong_buffer tokens.
    rl.no_eos_penalty = 0.0
    rl.overlong_buffer = 0
    rl.overlong_penalty = 0.0
    # Updates: each rollout is split into `minibatches` row subsets, visited `epochs` times.
    rl.epochs = 1
    rl.minibatches = 1
    rl.epsilon = 0.2  # clipped importance ratio: [1 - epsilon, 1 + epsilon_high]
    rl.epsilon_high = 0.0  # 0: = epsilon (DAPO's clip-higher sets e.g. 0.28)
    rl.kl_coef = 0.04  # GRPO: k3 KL to the reference in the loss; PPO: per-token KL penalty in the reward; 0: no reference
    rl.kl_ratio_correction = False  # GRPO: k3 x ratio (DeepSeek-V3.2's unbiased KL gradient; trl 1.16's default)
    # GRPO: advantages = (r - group mean) / (group std + 1e-4) with scale_rewards="group" ("batch": the
    # batch std; "none": no division, Dr. GRPO). loss_type: "grpo" = mean over tokens per completion,
    # then over completions; "dapo" = over all tokens of the batch; "dr_grpo" = token sum / (completions x max_new_tokens).
    rl.scale_rewards = "group"
    rl.loss_type = "grpo"
    # PPO: GAE over the completion tokens, clipped value loss, advantages whitened over the batch.
    rl.gamma = 1.0
    rl.lam = 0.95
    rl.vf_coef = 0.1
    rl.cliprange_value = 0.2
    rl.whiten_advantages = True
    # PPO-ptx (InstructGPT): + ptx_coef x the SFT loss of ptx_batch_size packed rows of ptx_mixture per update.
    rl.ptx_coef = 0.0
    rl.ptx_mixture = ""
    rl.ptx_batch_size = 8

    # ---------------------------------------------------------------- loss (the "sft" objective)
    config.loss = loss = ml_collections.ConfigDict()
    loss.normalization = "tokens"  # tokens: mean over weighted tokens of the global batch; sequences: mean of per-sequence means
    loss.z_loss = 0.0
    loss.label_smoothing = 0.0

    # ---------------------------------------------------------------- training loop
    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 1000
    train.log_every = 10
    train.on_nonfinite = "stop"  # stop | skip (skip the update, count it; bounded by the two limits below)
    train.max_consecutive_skips = 10  # "skip": stop after more consecutive skipped updates than this (0: no limit)
    train.max_skipped_steps = 100  # "skip": stop after more skipped updates in all than this (0: no limit)
    # A resume whose config changes what the run computes (learning rate, schedule, num_steps,
    # grad accumulation, loss, dtypes, ...) is refused unless this is True; the changes are then
    # logged and recorded in metrics.jsonl. Architecture / batch / data-stream changes are always
    # refused (flan_jax/train/config_change.py).
    train.allow_config_change = False
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
