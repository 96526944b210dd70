"""The training loop: mesh -> data -> state (fresh, resumed or from converted weights) -> jit step -> loop.

Read top to bottom; the pieces it wires live beside it (partitioning, optimizer, losses, step,
checkpointing, metrics). The hooks at step boundaries (log, evaluate, checkpoint, preemption, in
that order) are step_loop.py's, shared with the online RL loop. A restart with the same workdir resumes from the newest usable checkpoint and
continues bit for bit (same batches, same RNG, same compiled step).

Run safety, in the order it happens: the SIGTERM handler is installed first (a preemption during
start-up is honoured too), the workdir is locked (workdir_lock.py), the checkpoint's checksums
and config are checked before it is restored (integrity.py, config_change.py), and only then is
DIR/config.json written (atomically). Failures raise the RunErrors of exit_codes.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from flan_jax import atomic_write
from flan_jax.model import layout
from flan_jax.train import (
    checkpointing,
    config_change,
    metrics as metrics_lib,
    objectives,
    optimizer,
    partitioning,
    state as state_lib,
    step as step_lib,
    step_loop,
)
from flan_jax.train.exit_codes import ConfigMismatchError, NonFiniteError, WorkdirLockedError  # noqa: F401  (NonFiniteError: re-exported)
from flan_jax.train.nonfinite import NonfiniteGuard
from flan_jax.train.preemption import PreemptionWatcher
from flan_jax.train.workdir_lock import WorkdirLock


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

    Ends with a `RunError` (exit_codes.py) when the run cannot go on: non-finite loss, no usable
    checkpoint, a refused config change, a locked workdir, a failed save.
    """
    preemption = PreemptionWatcher()  # before anything slow: SIGTERM during start-up is honoured
    try:
        check_config(config)
        if maybe_initialize_distributed(config.distributed):
            preemption.reinstall()  # jax.distributed installs a SIGTERM handler of its own: take it back
        workdir = epath.Path(workdir)
        from flan_jax.data import sources

        # What sources and pair checks do with bad records (config.data.on_bad_record).
        with sources.default_on_bad_record(config.data.on_bad_record), lock_workdir(workdir):
            if getattr(objectives.get_objective(config), "loop", "") == "rl":  # GRPO / PPO sample their own batches
                from flan_jax.rl import loop as rl_loop

                return rl_loop.train(config, workdir, preemption)
            return _train(config, workdir, preemption)
    finally:
        preemption.close()


@contextlib.contextmanager
def lock_workdir(workdir: epath.Path):
    """Process 0 holds the workdir lock for the run; every process stops if it is taken."""
    lock, error = None, None
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if not multihost_utils.broadcast_one_to_all(np.int32(error is None)) and error is None:
            error = WorkdirLockedError(f"Process 0 found the workdir {workdir} locked by another trainer (see its log)")
    if error is not None:
        raise error
    try:
        if lock is not None:
            atomic_write.remove_stale_temporaries(workdir)
        yield
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, preemption: PreemptionWatcher) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.axis_rules(config.mesh)
    logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    objective = objectives.get_objective(config)
    tokenizer = build_tokenizer(config, workdir)
    check_evaluation(config)
    model_cfg, parts = build_model(config, mesh, rules, heads=objective.model_heads)
    check_model_fits(config, model_cfg, tokenizer)
    converter = build_converter(config, objective, model_cfg, tokenizer, parts, mesh, rules, workdir)
    data_iter = build_train_iterator(config, tokenizer, converter)
    num_steps = int(config.train.num_steps)
    tx, schedule = optimizer.make_optimizer(config.optimizer, num_steps)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)

    checkpoints = checkpointing.Checkpointer(workdir, config.checkpoint)
    state, frozen_fingerprints, config_changes = start_state(
        config, workdir, checkpoints, data_iter, parts, tx, shardings, mesh, model_cfg, objective
    )
    start_step = int(state.step)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)

    flops_per_token = training_flops_per_token(parts, model_cfg, config.data)
    reporter = metrics_lib.Reporter(workdir, config, flops_per_token, start_step=start_step, enabled=is_main)
    guard = NonfiniteGuard(config.train, skipped_before=int(state.nonfinite_steps))
    batch_sharding = partitioning.batch_sharding(mesh, rules)

    def eval_reference(state):
        """The initial policy, for the implicit rewards of DPO-family runs: the policy with its
        adapters switched off (LoRA), the held reference slot, or rebuilt from its source."""
        from flan_jax.train.objectives.pairwise import ADAPTERS_OFF

        if getattr(objective, "reference", None) == ADAPTERS_OFF:
            from flan_jax.model import lora

            return lora.adapters_off(parts.merge(state.params, state.frozen.get("base")))
        if "reference" in state.frozen:
            return parts.merge(state.frozen["reference"], state.frozen.get("base"))
        return parts.merge(initial_params(config, parts, mesh, model_cfg))

    def evaluate(step: int, state) -> dict | None:
        reference = (lambda: eval_reference(state)) if getattr(objective, "compares_with_reference", False) else None
        return run_evaluation(config, parts.merge(state.params, state.frozen.get("base")), tokenizer, workdir, step, reference)

    def take_step(step: int, state) -> step_loop.StepOutcome:
        batch = next(data_iter)
        if step == start_step + 1:
            step_lib.check_batch(batch, config, mesh, objective)
        state, step_metrics = train_step(state, partitioning.global_batch(batch, batch_sharding))
        guard.record(step_metrics)
        return step_loop.StepOutcome(state, step_metrics, extra=lambda: data_counts(data_iter))

    return step_loop.run_steps(
        take_step, state, start_step=start_step, config=config, mesh=mesh, data_iter=data_iter, checkpoints=checkpoints,
        reporter=reporter, guard=guard, preemption=preemption, evaluate=evaluate, fingerprints=frozen_fingerprints,
        config_changes=config_changes,
    )


def check_model_fits(config, model_cfg, tokenizer) -> None:
    """The rows and the vocabulary must fit the model (else NaNs or out-of-range lookups later)."""
    from flan_jax.data import converters

    model_cfg.check_data(config.data)  # the family's own checks: a learned position table, T5's decoder rows
    converters.for_model_config(model_cfg).check_tokenizer(tokenizer)  # e.g. a T5 tokenizer has no BOS for a decoder
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but config.model.vocab_size={model_cfg.vocab_size}"
        )


def start_state(
    config, workdir: epath.Path, checkpoints: checkpointing.Checkpointer, data_iter, parts, tx, shardings, mesh, model_cfg,
    objective, *, extra_fingerprints: dict[str, str] | None = None, updates_per_step: int = 1,
) -> tuple[state_lib.TrainState, dict[str, str], dict[str, list]]:
    """The run's state: the newest usable checkpoint (its config checked, `data_iter` restored with
    it), else step 0 (from `checkpoint.init_from` / LoRA's init or the seed), with the frozen slots
    attached and, on a resume, their fingerprints (and `extra_fingerprints`: e.g. an RL run's reward
    model) checked; then DIR/config.json is written. Returns (state, fingerprints, the allowed config
    changes). `updates_per_step`: optimizer steps per checkpointed step (an RL run's updates per rollout).
    """
    config_changes: dict[str, list] = {}

    def check_resume(saved_config: dict, name: str) -> None:
        config_changes.update(config_change.check_resume(
            saved_config, checkpointing.config_to_dict(config), _default_config_dict(),
            allow=bool(config.train.get("allow_config_change", False)), checkpoint=name,
        ))

    state = checkpoints.restore_latest(state_lib.abstract_state(parts, tx, shardings, config.seed), data_iter, check_resume)
    resumed = state is not None
    initial = None
    if state is None:
        state = state_lib.init_state(parts, tx, shardings, config.seed, mesh)
        if config.checkpoint.init_from or config.lora.get("init_from"):
            initial = initial_params(config, parts, mesh, model_cfg)
            state = state.replace(params=parts.trained_part(initial))
    state, fingerprints = attach_frozen_slots(
        state, objective, parts, mesh, config, model_cfg, resumed=resumed, initial=initial
    )
    del initial
    fingerprints.update(extra_fingerprints or {})
    if resumed:
        check_frozen_fingerprints(checkpoints, int(state.step) // updates_per_step, fingerprints)
    if parts.has_base:
        logging.info("Trainable-parameter filter: %s", parts.selection.summary(parts.abstract_params))
    if jax.process_index() == 0:  # only now: a restart refused above leaves the run's config.json as it was
        atomic_write.write_text(workdir / "config.json", json.dumps(checkpointing.config_to_dict(config), indent=2) + "\n")
    return state, fingerprints, config_changes


def _default_config_dict() -> dict:
    from flan_jax import default_config

    return checkpointing.config_to_dict(default_config.get_config())


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for trainer settings that would otherwise fail deep inside the loop."""
    positive = {
        "train.num_steps": config.train.num_steps,
        "train.log_every": config.train.log_every,
        "checkpoint.every_steps": config.checkpoint.every_steps,
        "checkpoint.keep": config.checkpoint.keep,
        "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
    }
    bad = {name: value for name, value in positive.items() if int(value) < 1}
    if bad:
        raise ValueError(f"These config fields must be >= 1: {bad}")
    if config.eval.every_steps < 0:
        raise ValueError(f"config.eval.every_steps={config.eval.every_steps} must be >= 0 (0: only at start/end)")
    if config.checkpoint.get("best_mode", "max") not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode={config.checkpoint.best_mode!r}: expected 'max' or 'min'")


def build_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path):
    """The run's tokenizer (trained into the workdir when config.data.tokenizer.path is empty)."""
    from flan_jax import data
    from flan_jax.data import tokenizer as tokenizer_lib
    from flan_jax.model import registry

    data.import_task_modules(config.data.task_modules)
    family = registry.get_family(config.model.family)
    init_from = config.checkpoint.init_from
    source = epath.Path(init_from) / "tokenizer.model" if init_from else None
    if not config.data.tokenizer.path and source is not None and source.is_file():
        # A run that starts from another run's workdir (SFT -> reward model / DPO) must read its
        # vocabulary, not train a new one on its own data: it is copied into this workdir, where
        # everything that later reads the run (evaluate, convert, a resume) finds it.
        own = workdir / "tokenizer.model"
        if not own.exists():
            logging.info("Using the tokenizer of checkpoint.init_from=%s (copied to %s)", init_from, own)
            if jax.process_index() == 0:
                _copy_file(source, own)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_processes("flan_jax_tokenizer_copied")
        elif own.read_bytes() != source.read_bytes():
            raise ValueError(
                f"{own} differs from the tokenizer of checkpoint.init_from={init_from}: this workdir was made with "
                "another vocabulary; use another --workdir"
            )
    return tokenizer_lib.load_tokenizer(
        config.data.tokenizer,
        workdir=workdir,
        train_mixture=config.data.train_mixture,
        train_split=config.data.train_split,
        convention=family.tokenizer_convention,
    )


def _copy_file(source: epath.Path, target: epath.Path) -> None:
    """Copies via a temporary file renamed into place, so a crash never leaves half a file."""
    tmp = target.parent / f".{target.name}.tmp"
    tmp.write_bytes(source.read_bytes())
    tmp.rename(target)


def build_train_iterator(config: ml_collections.ConfigDict, tokenizer, converter=None):
    """This process's checkpointable batch iterator, in `converter`'s layout (decoder rows by default)."""
    from flan_jax.data import converters, loader

    return loader.make_train_iterator(
        config.data,
        tokenizer,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        converter=converter or converters.for_model_config(config.model),
    )


def build_data(config: ml_collections.ConfigDict, workdir: epath.Path):
    """(tokenizer, this process's checkpointable batch iterator) of an SFT run."""
    tokenizer = build_tokenizer(config, workdir)
    return tokenizer, build_train_iterator(config, tokenizer)


def build_converter(config, objective, model_cfg, tokenizer, parts, mesh, rules, workdir):
    """The batch layout the objective trains on (its own, e.g. preference pairs, else the family's).

    An objective that reads cached reference log-probs (DPO / IPO with objective.reference="cache")
    gets a converter that attaches them; the cache is computed here, before training, by one pass
    of the initial policy over the run's pairs (flan_jax.train.reference_cache), or reused.
    """
    from flan_jax.data import converters
    from flan_jax.model import registry

    family_converter = registry.get_family(model_cfg.family).feature_converter
    name = getattr(objective, "feature_converter", "") or family_converter
    if name != family_converter and family_converter != converters.DECODER.name:
        raise ValueError(
            f"config.objective.name={objective.name!r} trains on {name!r} rows, which are decoder rows; "
            f"config.model.family={model_cfg.family!r} takes {family_converter!r} rows"
        )
    if converters.REFERENCE_FEATURE not in objective.features:
        return converters.get_converter(name)
    from flan_jax.train import reference_cache

    reference = initial_params(config, parts, mesh, model_cfg)
    cache = reference_cache.prepare(
        config, workdir, tokenizer, objective, parts=parts, reference_params=reference, mesh=mesh, rules=rules,
        make_iterator=lambda: build_train_iterator(config, tokenizer, converters.PAIRS),
    )
    del reference
    return converters.PairConverter(reference=cache)


def build_model(config: ml_collections.ConfigDict, mesh, rules, heads: tuple[str, ...] = ()):
    """(model config, ModelParts) of `config.model`, through the family registry.

    `config.lora` adds adapters; `config.trainable` (train/trainable.py) says which parameters
    the optimizer trains (default: all, or with LoRA the adapters).
    """
    from flan_jax.model import lora, registry
    from flan_jax.train import trainable

    model_cfg = registry.config_from(config.model)
    lora_cfg = lora.LoRAConfig.from_config(config.get("lora"))
    spec = trainable.spec_from_config(config)
    parts = state_lib.ModelParts(
        lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(config.seed), heads=heads, lora=lora_cfg),
        mesh,
        rules,
        trainable=None if spec.trains_everything else spec,
    )
    return model_cfg, parts


def initial_params(config, parts: state_lib.ModelParts, mesh, model_cfg) -> dict:
    """The parameters step 0 starts from: `checkpoint.init_from`'s, or the seed's initialisation.

    LoRA adapters (absent from a converted base) start from the seed, or from the PEFT adapter of
    `config.lora.init_from`. Frozen parameters come in the dtype they are held in.
    """
    if config.checkpoint.init_from:
        params = load_init_params(config.checkpoint.init_from, parts, model_cfg, mesh=mesh)
    else:
        params = state_lib.init_params(parts, mesh)
    if config.get("lora") is not None and config.lora.get("init_from"):
        from flan_jax.convert import peft

        params = peft.load_into(config.lora.init_from, params, parts, model_cfg, config)
    return params


def attach_frozen_slots(
    state: state_lib.TrainState, objective, parts, mesh, config, model_cfg, *, resumed: bool, initial: dict | None = None
) -> tuple[state_lib.TrainState, dict[str, str]]:
    """Fills the frozen slots of the run; returns the state and their fingerprints.

    "base" holds the parameters the trainable filter leaves out, "reference" (for objectives that
    ask for it) a copy of the initial trained parameters: with LoRA that is the base with the
    initial adapters (B = 0: the adapters switched off), so the reference shares the base and the
    run holds one copy of the weights. On a fresh run the reference copies the step-0 parameters;
    on a resume both are rebuilt from the same source (`initial`, or init_from / the seed), so
    neither is ever stored in the run's checkpoints.
    """
    slots = tuple(objective.frozen_slots)
    for slot in slots:
        if slot != "reference":
            raise ValueError(f"Objective {objective.name!r} asks for frozen slot {slot!r}; the trainer builds 'reference' only")
    frozen, base = {}, None
    if initial is None and (parts.has_base or (resumed and slots)):
        from_seed = not config.checkpoint.init_from and not config.lora.get("init_from")
        if from_seed and not (resumed and slots):
            base = state_lib.init_base(parts, mesh)  # only the base is initialised
        else:
            initial = initial_params(config, parts, mesh, model_cfg)
    for slot in slots:
        frozen[slot] = parts.trained_part(initial) if resumed else state_lib.copy_params(state.params)
    if parts.has_base:
        frozen[state_lib.BASE] = base if base is not None else parts.base_part(initial)
    fingerprints = {slot: state_lib.fingerprint(params) for slot, params in frozen.items()}
    return state.replace(frozen=frozen), fingerprints


def training_flops_per_token(parts: state_lib.ModelParts, model_cfg, data_config) -> float:
    """The MFU numerator: frozen weights cost no weight gradient (4 FLOPs per token, not 6).

    A family's config may count its own (`flops_per_token(n_matmul, config.data, n_frozen_matmul)`:
    T5's counts encoder and decoder positions); else the decoder's formula (train/metrics.py)."""
    tied = model_cfg.tie_embeddings
    axes_of = lambda tree: parts.selection.trained_part(tree) if parts.has_base else tree  # noqa: E731
    trained = metrics_lib.matmul_param_count(parts.trained_abstract, axes_of(parts.logical_axes), tied_embeddings=tied)
    frozen = 0
    if parts.has_base:
        frozen = metrics_lib.matmul_param_count(
            parts.base_abstract, parts.selection.frozen_part(parts.logical_axes), tied_embeddings=tied
        )
    if hasattr(model_cfg, "flops_per_token"):
        return model_cfg.flops_per_token(trained, data_config, n_frozen_matmul=frozen)
    return metrics_lib.flops_per_token(model_cfg, trained, data_config.seq_len, n_frozen_matmul=frozen)


def check_frozen_fingerprints(checkpoints: checkpointing.Checkpointer, step: int, fingerprints: dict[str, str]) -> None:
    """A resumed run must read the same frozen parameters as the run that wrote its checkpoint."""
    saved = checkpoints.frozen_fingerprints(step)
    differing = sorted(slot for slot in set(saved) | set(fingerprints) if saved.get(slot) != fingerprints.get(slot))
    if differing:
        raise ConfigMismatchError(
            f"Checkpoint step {step} in {checkpoints.directory} was trained against other frozen parameters "
            f"(slots {differing}: saved {[saved.get(s) for s in differing]}, now {[fingerprints.get(s) for s in differing]}). "
            "Did checkpoint.init_from or the seed change? Resume with the original ones or use another --workdir."
        )


def load_init_params(path: str, parts: state_lib.ModelParts, model_cfg, mesh=None) -> dict:
    """The parameters of `checkpoint.init_from` placed into this run's shardings.

    `path` is converted weights (`flan_jax.convert.load_converted`), another run's workdir (its
    newest checkpoint, e.g. an SFT run a reward model or DPO starts from; a LoRA run's adapters
    merged into its weights), or a Hugging Face `*ForSequenceClassification` reward model folder
    (flan_jax.convert.reward). Params only: the optimizer state, step and data position start
    fresh. In either layer layout, the parameters are converted to this run's
    (`config.model.scan_layers`). Scalar heads (`score`, `value`) this run needs but the source lacks start from the
    seed's initialisation; heads the source has and this run does not use are left out; both are
    logged. LoRA adapters of this run, which the source lacks, start from the seed's
    initialisation (needs `mesh`); frozen parameters are placed directly in the dtype they are
    held in (config.trainable.frozen_dtype). Any other difference is an error.
    """

    source_cfg, loaded = _init_from_source(path, model_cfg)
    loaded = layout.to_layout(loaded, stacked=model_cfg.scanned)  # this run's layer layout
    differing = {
        k: (v, model_cfg.to_dict().get(k))
        for k, v in source_cfg.to_dict().items()
        if k not in model_cfg.RUNTIME_FIELDS and model_cfg.to_dict().get(k) != v
    }
    if differing:
        raise ValueError(
            f"checkpoint.init_from={path}: its architecture differs from config.model "
            f"(field: (checkpoint, config)): {differing}"
        )
    heads = "scalar_heads"
    wanted, have = parts.abstract_params.get(heads) or {}, loaded.pop(heads, None) or {}
    if set(have) - set(wanted):
        logging.info("checkpoint.init_from=%s: leaving out its head(s) %s, unused by this run", path, sorted(set(have) - set(wanted)))
    missing = sorted(set(wanted) - set(have))
    if wanted:
        loaded[heads] = {name: have[name] for name in wanted if name in have}
    if missing:
        logging.info("checkpoint.init_from=%s: head(s) %s start from the seed's initialisation", path, missing)
        if mesh is None:
            raise ValueError(f"checkpoint.init_from={path} lacks the head(s) {missing} and no mesh was given to initialise them")
        with jax.set_mesh(mesh):
            fresh_heads = jax.device_get(jax.jit(lambda: parts.init_params()[heads])())
        loaded[heads].update({name: fresh_heads[name] for name in missing})
    from flan_jax.train import trainable

    adapters = trainable.adapter_paths(parts.abstract_params)  # converted weights and merged runs have none

    def place(path_, value, abstract, sharding):
        if tuple(np.shape(value)) != tuple(abstract.shape):
            raise ValueError(
                f"checkpoint.init_from={path}: {optimizer.param_path(path_)} has shape {np.shape(value)}, "
                f"config.model expects {abstract.shape}"
            )
        return jax.device_put(np.asarray(value, abstract.dtype), sharding)

    logging.info("Initialising parameters from %s", path)
    held = parts.selection.held(parts.abstract_params) if parts.has_base else parts.abstract_params
    try:
        placed = jax.tree_util.tree_map_with_path(
            place, loaded, trainable.without(held, adapters), trainable.without(parts.param_shardings, adapters)
        )
    except ValueError as error:
        if "shape" in str(error):
            raise
        raise ValueError(f"checkpoint.init_from={path}: its parameters do not match config.model's ({error})") from None
    if adapters:
        if mesh is None:
            raise ValueError("load_init_params: LoRA adapters start from the seed and need the mesh")
        with jax.set_mesh(mesh):
            fresh = jax.jit(lambda: trainable.only(parts.init_params(), adapters),
                            out_shardings=trainable.only(parts.param_shardings, adapters))()
        placed = trainable.join(placed, fresh)
    return placed


def _init_from_source(path: str, model_cfg) -> tuple[Any, dict]:
    """(model config, params as a pure dict of host arrays) of converted weights, a run's workdir
    (a LoRA run's adapters merged into its kernels) or a Hugging Face reward model."""
    if (epath.Path(path) / "checkpoints").is_dir():
        source, source_config, step = checkpointing.load_model(path)
        logging.info("checkpoint.init_from=%s: the run's checkpoint of step %d", path, step)
        from flan_jax.convert.hf_export import plain_params
        from flan_jax.model import registry

        source_cfg = registry.config_from(source_config.model)
        params = jax.device_get(plain_params(source, source_cfg))
        params = jax.tree.map(lambda x: np.asarray(x, model_cfg.param_dtype), params)
        return source_cfg, params
    from flan_jax import convert

    hf_config = epath.Path(path) / "config.json"
    if hf_config.is_file() and any(a.endswith("ForSequenceClassification") for a in json.loads(hf_config.read_text()).get("architectures", [])):
        cfg, flat = convert.load_hf_reward_model(path)  # a Hugging Face reward model, read directly
        params = convert.checkpoint.nest({p: np.asarray(v, model_cfg.param_dtype) for p, v in flat.items()})
        return cfg, params
    converted_cfg, params = convert.load_converted(path, dtype=model_cfg.param_dtype, stacked=model_cfg.scanned)
    return converted_cfg, nnx.to_pure_dict(params)


def data_counts(data_iter) -> dict[str, int]:
    """This process's running totals of examples read and over-long ones truncated or dropped.

    Logged with the metrics so no truncation goes unseen (per-task counts: `data_iter.stats`).
    """
    stats = getattr(data_iter, "stats", None)
    if stats is None:
        return {}
    total = stats.total()
    return {
        "data_examples": total.examples,
        "data_truncated": total.truncated,
        "data_response_truncated": total.response_truncated,
        "data_dropped": total.dropped,
    }


def check_evaluation(config) -> None:
    """Checks the evaluation tasks (metrics, every example) when the run starts, so a bad one fails before step 1."""
    ev = config.eval
    if ev.mixtures and (ev.at_start or ev.at_end or ev.every_steps):
        from flan_jax.eval import evaluator

        evaluator.check(config)


def run_evaluation(config, model, tokenizer, workdir, step: int, reference=None) -> dict | None:
    """Evaluates `config.eval.mixtures` and writes DIR/eval/step_<N>.json (no-op without mixtures).

    `reference` (a function returning the reference model) makes preference tasks score the DPO
    implicit reward.
    """
    if not config.eval.mixtures:
        return None
    from flan_jax.eval import evaluator

    started = time.perf_counter()
    extra = {"reference": reference} if reference is not None else {}
    results = evaluator.evaluate(model, tokenizer, config, workdir=os.fspath(workdir), step=step, **extra)
    logging.info("Evaluation at step %d took %.1fs: %s", step, time.perf_counter() - started, results.get("summary"))
    return results


def maybe_initialize_distributed(dist_config: Any) -> bool:
    """`jax.distributed.initialize` from config.distributed, or from JAX_COORDINATOR_ADDRESS & co.

    Must run before anything touches a jax backend. On CPU the cross-process collectives go
    through gloo. Returns whether it initialised it now.
    """
    from_env = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not (dist_config.initialize or from_env) or jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    address = dist_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = dist_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = dist_config.process_id if dist_config.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        kwargs["coordinator_address"] = address
    if num_processes:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True
