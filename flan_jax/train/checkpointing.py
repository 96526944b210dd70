"""Orbax checkpoints of a run: save, resume (with fallback past broken ones) and load for inference.

A checkpoint `DIR/checkpoints/<step>/` holds six items:

  params      the trained parameters (pure dict; restorable alone, see `load_model`)
  opt_state   the optax state
  train_meta  step, RNG key data and the non-finite counters
  data_iter   the grain iterator state (one JSON file per process)
  config      the resolved config (JSON)
  frozen      {slot: fingerprint} of the train state's frozen slots (JSON): their arrays are not
              saved but rebuilt at start, and a resume checks they are the same (train/state.py)

and `CHECKSUMS` (integrity.py), written when Orbax has finished the save and verified on every
restore.

Arrays are restored into `ShapeDtypeStruct`s carrying the *current* shardings, so a run can
resume on another mesh or device count; the data iterator's per-process files are merged when
the process count changed (`restore_data_iterator`). Layers saved unrolled restore into a
scanned model and back (`config.model.scan_layers` changed): params and optimizer state are
read in the saved layout and converted on the devices (`flan_jax.model.layout`). Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save never leaves a half
checkpoint that looks finished; a finished one whose checksums fail or that cannot be read (disk
corruption, deleted files) is moved aside to `DIR/checkpoints_corrupt/` with a warning, and the
previous one is used. A failed asynchronous save is reported at the next step boundary (`poll`),
not at the next save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flan_jax.model import layout
from flan_jax.train import integrity
from flan_jax.train.exit_codes import CheckpointSaveError, NoUsableCheckpointError
from flan_jax.train.state import TrainState

# Orbax splits each replicated array among its replicas to save in parallel; every slice is a
# separately compiled jax op, which for a model's many small arrays costs far more (seconds per
# save on CPU) than it saves. Only arrays of >= 4 MiB per replica slice are split.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20), override=True
)


def saved_layers_stacked(item_directory: epath.Path) -> bool | None:
    """Whether the `layers` of a saved params item are stacked; None when it has none or cannot be read."""
    try:
        tree = ocp.StandardCheckpointHandler().metadata(epath.Path(item_directory)).tree
    except Exception:  # noqa: BLE001 (the restore itself then reports what is wrong)
        return None
    return layout.is_stacked(tree)


def in_saved_layout(abstract: Any, saved_stacked: bool | None) -> tuple[Any, bool]:
    """(restore target in the saved layout, whether it differs from `abstract`'s layout)."""
    wanted = layout.is_stacked(abstract)
    if saved_stacked is None or wanted is None or saved_stacked == wanted:
        return abstract, False
    return layout.to_layout(abstract, stacked=saved_stacked), True


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_from_dict(values: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `config_to_dict` (JSON lists back to the tuples the config uses)."""

    def tuplify(x):
        if isinstance(x, list):
            return tuple(tuplify(v) for v in x)
        if isinstance(x, Mapping):
            return {k: tuplify(v) for k, v in x.items()}
        return x

    return ml_collections.ConfigDict(tuplify(dict(values)))


def restore_data_iterator(directory: epath.Path, data_iter: Any) -> None:
    """Moves `data_iter` to its checkpointed position, also under another process count.

    grain saves one `process_<i>-of-<n>.json` per process. With the same process count this
    process reads its own file, as grain's own restore does. Otherwise the files are merged
    (`loader.merge_process_states`): the loader's state is a set of row-slot states and row
    slots do not depend on the process count, so each process takes the slots it now owns.
    """
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
        state = json.loads(own.read_text())
        check_worker_count(state, data_iter, own)
        data_iter.set_state(state)
        return
    files = sorted(directory.glob("process_*-of-*.json"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no data iterator state")
    from flan_jax.data import loader

    logging.info("Data iterator saved by %d process(es), restored by %d: merging row slots", len(files), jax.process_count())
    states = [json.loads(f.read_text()) for f in files]
    for state, path in zip(states, files):
        check_worker_count(state, data_iter, path)
        if _worker_count(state):
            raise ValueError(
                f"{path}: data iterator states of grain worker processes (config.data.worker_count > 0) cannot "
                f"move to another process count ({len(files)} -> {jax.process_count()}); resume with the same "
                "number of processes, or train with worker_count=0"
            )
    data_iter.set_state(loader.merge_process_states(states))


def _worker_count(state: Mapping[str, Any]) -> int:
    """0 for the loader's own iterator state; grain's worker-process iterator holds one per worker."""
    return len(state["iterators_in_use_states"]) if "iterators_in_use_states" in state else 0


def check_worker_count(state: Mapping[str, Any], data_iter: Any, path: Any) -> None:
    """A clear error when the run resumes with another `config.data.worker_count`.

    Each worker count gives its own (deterministic) interleaving of batches, so continuing a run
    under another one would silently change its data stream; grain itself fails on it with a bare
    KeyError. Worker-process states cannot be merged across process counts either.
    """
    saved, current = _worker_count(state), _worker_count(data_iter.get_state())
    if saved != current:
        raise ValueError(
            f"{path}: the data iterator was saved with config.data.worker_count={saved} and this run uses "
            f"{current}; resume with worker_count={saved} (another value gives another batch order)"
        )


def _no_usable_checkpoint_message(directory: epath.Path, failed: list[tuple[int, Exception]]) -> str:
    """Why each checkpoint failed, and what that points at: corruption, or this run's environment."""
    corrupt = [step for step, error in failed if isinstance(error, integrity.ChecksumMismatchError)]
    reasons = "\n".join(f"  step {step}: {type(error).__name__}: {str(error)[:300]}" for step, error in failed)
    if len(corrupt) == len(failed):
        cause = ("Every one fails its checksums: the files changed after they were saved (disk or copy errors). "
                 "Nothing was moved. Restore the checkpoints from a backup, or move the folder aside to start over.")
    elif corrupt:
        cause = ("Some fail their checksums (corrupt); the others verify but cannot be restored here. Nothing was moved.")
    else:
        cause = ("Their checksums verify (or they predate checksums), so the files are as saved: the cause is this "
                 "run, whose config (model shape, optimizer) or environment (number of processes, grain workers, a "
                 "code change that renamed parameters) differs from the run that wrote them. Nothing was moved. "
                 "Use the config and environment they were written with, or another --workdir.")
    return f"No checkpoint in {directory} can be used:\n{reasons}\n{cause}"


class Checkpointer:
    """A `CheckpointManager` keeping the last `keep` checkpoints (and the best by a metric)."""

    def __init__(self, workdir: str | os.PathLike, ckpt_config: Any, *, read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.corrupt_directory = epath.Path(workdir) / "checkpoints_corrupt"
        self.best_metric = ckpt_config.get("keep_best_metric", "") if ckpt_config else ""
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(int(ckpt_config.keep), 1))]
        if self.best_metric:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[self.best_metric],
                    reverse=ckpt_config.get("best_mode", "max") == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=bool(ckpt_config.async_save),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unfinished: list[int] = []  # saved steps whose completion (and checksums) is not yet seen

    def save(
        self,
        step: int,
        state: TrainState,
        data_iter: Any,
        config: ml_collections.ConfigDict,
        *,
        metrics: Mapping[str, float] | None = None,
        frozen_fingerprints: Mapping[str, str] | None = None,
    ) -> None:
        """Starts an (async) save of everything needed to continue the run exactly."""
        self._finish_saves()  # Orbax waits for the previous save anyway; its checksums go first
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train_meta=ocp.args.StandardSave(state.meta()),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_to_dict(config)),
            frozen=ocp.args.JsonSave(dict(frozen_fingerprints or {})),
        )
        self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)
        self._unfinished.append(step)
        if not self.manager.is_saving_in_progress():  # a synchronous save: finished already
            self._finish_saves()

    def poll(self) -> None:
        """At a step boundary: completes a finished asynchronous save (checksums), or reports its failure.

        Cheap when nothing finished (one flag read), so the loop calls it every step.
        """
        if self._unfinished and not self.manager.is_saving_in_progress():
            self._finish_saves()

    def _finish_saves(self) -> None:
        """Waits for the save in flight, raises CheckpointSaveError if it failed, writes its checksums."""
        if not self._unfinished:
            return
        steps, self._unfinished = self._unfinished, []
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 (reported with its cause)
            raise CheckpointSaveError(
                f"Saving checkpoint step {steps[-1]} to {self.directory} failed: {type(error).__name__}: {str(error)[:1000]}"
            ) from error
        for step in steps:
            directory = self.directory / str(step)
            if not directory.exists():
                raise CheckpointSaveError(
                    f"Checkpoint step {step} was not finalized in {self.directory} (Orbax logged the cause above); "
                    "the previous checkpoint is the latest complete one"
                )
            if jax.process_index() == 0:
                integrity.write_manifest(directory)

    def restore_latest(
        self,
        abstract_state: TrainState,
        data_iter: Any,
        check_config: Callable[[dict, str], None] | None = None,
    ) -> TrainState | None:
        """The newest usable checkpoint restored into `abstract_state`'s shardings, or None if there is none.

        Each candidate, newest first: checksums verified, then its saved config handed to
        `check_config(saved_config, name)` (which raises to refuse the resume; that stops the
        search: it is this run's config, not the checkpoint, that is wrong), then restored.
        Candidates that fail their checksums or cannot be read are moved aside once an older one
        restores. When none restores nothing is moved and NoUsableCheckpointError says, per
        checkpoint, why.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            directory = self.directory / str(step)
            try:
                if integrity.verify(directory) == "unverified":
                    logging.warning("Checkpoint %s has no %s (an older flan_jax, or a crash right after its save): "
                                    "restoring it unverified", directory, integrity.MANIFEST)
                saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            except Exception as error:  # noqa: BLE001 (judged below, once an older one is tried)
                logging.warning("Checkpoint %s cannot be used: %s: %s", directory, type(error).__name__, str(error)[:500])
                failed.append((step, error))
                continue
            if check_config is not None:
                check_config(saved_config, f"checkpoint {directory}")
            try:
                saved_stacked = saved_layers_stacked(directory / "params")
                target, convert = in_saved_layout({"params": abstract_state.params, "opt_state": abstract_state.opt_state}, saved_stacked)
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target["params"]),
                        opt_state=ocp.args.StandardRestore(target["opt_state"]),
                        train_meta=ocp.args.StandardRestore(abstract_state.meta()),
                    ),
                )
                restored = {item: restored[item] for item in ("params", "opt_state", "train_meta")}
                if convert:
                    logging.info(
                        "Checkpoint %s holds %s layers; converting params and optimizer state to this run's layout",
                        step, "stacked" if saved_stacked else "unrolled",
                    )
                    for item in ("params", "opt_state"):
                        restored[item] = layout.to_layout_placed(restored[item], getattr(abstract_state, item))
                restore_data_iterator(directory / "data_iter", data_iter)
            except Exception as error:  # noqa: BLE001 (judged below, once an older one is tried)
                logging.warning("Checkpoint %s cannot be restored: %s: %s", directory, type(error).__name__, str(error)[:500])
                failed.append((step, error))
                continue
            for bad_step, error in failed:
                self._set_aside(bad_step, error)
            state = TrainState(params=restored["params"], opt_state=restored["opt_state"], **restored["train_meta"])
            logging.info("Resumed from checkpoint %s", directory)
            return state
        if failed:
            raise NoUsableCheckpointError(_no_usable_checkpoint_message(self.directory, failed)) from failed[0][1]
        return None

    def last_verified_step(self) -> int | None:
        """The newest checkpoint whose checksums verify (what a stop message may call "good")."""
        self._finish_saves()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                if integrity.verify(self.directory / str(step)) == "verified":
                    return step
            except integrity.ChecksumMismatchError as error:
                logging.error("%s", error)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        logging.warning(
            "Checkpoint %s is corrupt (%s) while an older one restores: moving it to %s.",
            self.directory / str(step), type(error).__name__, self.corrupt_directory,
        )
        if jax.process_index() == 0:
            self.corrupt_directory.mkdir(parents=True, exist_ok=True)
            target = self.corrupt_directory / f"{step}-{int(time.time())}"
            shutil.move(os.fspath(self.directory / str(step)), os.fspath(target))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"flan_jax_set_aside_{step}")
        self.manager.reload()

    def frozen_fingerprints(self, step: int) -> dict[str, str]:
        """The frozen-slot fingerprints checkpoint `step` was saved with ({} before they existed)."""
        if "frozen" not in self.manager.item_metadata(step):
            return {}
        return dict(self.manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore()))["frozen"])

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self._finish_saves()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._finish_saves()
        finally:
            self.manager.close()


def load_model(workdir: str | os.PathLike, step: int | None = None):
    """(model, config, step) from a run's checkpoint: params only, on the first local device.

    For evaluation, notebooks and conversion. `step=None` takes the newest readable checkpoint.
    A run that trained only some parameters (LoRA adapters, config.trainable) saved only those:
    its frozen base is rebuilt from `checkpoint.init_from` (or the seed) and must have the
    fingerprint the checkpoint recorded. The model keeps its adapters unmerged.
    """
    from flan_jax.train import loop, objectives, partitioning

    directory = epath.Path(workdir) / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    available = sorted(manager.all_steps())
    if step is not None and step not in available:
        raise FileNotFoundError(
            f"There is no checkpoint of step {step} in {directory}: it was never saved, or retention removed it "
            f"(checkpoint.keep); the checkpoints there are steps {available or 'none'}"
        )
    steps = [step] if step is not None else available[::-1]
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}")
    errors = []
    for candidate in steps:
        try:
            if integrity.verify(directory / str(candidate)) == "unverified":
                logging.warning("Checkpoint %s has no checksums: loading it unverified", directory / str(candidate))
            config = config_from_dict(manager.restore(candidate, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
            mesh = jax.make_mesh((1, 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.local_devices()[:1])
            heads = objectives.get_objective(config).model_heads if "objective" in config else ()
            cfg, parts = loop.build_model(config, mesh, partitioning.axis_rules(config.mesh), heads=heads)
            abstract = jax.tree.map(
                lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), parts.trained_abstract, parts.trained_shardings
            )
            target, _ = in_saved_layout(abstract, saved_layers_stacked(directory / str(candidate) / "params"))
            params = manager.restore(candidate, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            params = layout.to_layout_placed(params, abstract)
            base = _rebuilt_base(manager, candidate, config, parts, mesh, cfg, workdir) if parts.has_base else None
        except Exception as error:  # noqa: BLE001
            if step is not None:
                raise
            logging.warning("Checkpoint %s unreadable (%s); trying an older one", candidate, error)
            errors.append(error)
            continue
        manager.close()
        return parts.merge(params, base), config, int(candidate)
    raise RuntimeError(f"No readable checkpoint in {workdir}: {errors}")


def _rebuilt_base(manager, step: int, config, parts, mesh, model_cfg, workdir) -> Any:
    """The frozen base of a run that trained a subset, rebuilt and checked against the checkpoint."""
    from flan_jax.train import loop, state as state_lib

    base = parts.base_part(loop.initial_params(config, parts, mesh, model_cfg))
    saved = {}
    if "frozen" in manager.item_metadata(step):
        saved = manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore()))["frozen"]
    now = state_lib.fingerprint(base)
    if saved.get(state_lib.BASE) != now:
        source = config.checkpoint.get("init_from") or f"the seed ({config.seed})"
        raise ValueError(
            f"{workdir}: checkpoint {step} holds only the trained parameters; its frozen base is rebuilt from "
            f"{source}, but that is not the base it was trained on (fingerprint {saved.get(state_lib.BASE)}, now {now}). "
            "Restore the original checkpoint.init_from."
        )
    return base
