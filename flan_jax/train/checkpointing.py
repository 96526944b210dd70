"""Orbax checkpoints of a run: save, resume (with fallback past broken ones) and load for inference.

A checkpoint `DIR/checkpoints/<step>/` holds six items:

  params      the trained parameters (pure dict; restorable alone, see `load_model`)
  opt_state   the optax state
  train_meta  step, RNG key data and the non-finite counters
  data_iter   the grain iterator state (one JSON file per process)
  config      the resolved config (JSON)
  frozen      {slot: fingerprint} of the train state's frozen slots (JSON): their arrays are not
              saved but rebuilt at start, and a resume checks they are the same (train/state.py)

Arrays are restored into `ShapeDtypeStruct`s carrying the *current* shardings, so a run can
resume on another mesh or device count; the data iterator's per-process files are merged when
the process count changed (`restore_data_iterator`). Layers saved unrolled restore into a
scanned model and back (`config.model.scan_layers` changed): params and optimizer state are
read in the saved layout and converted on the devices (`flan_jax.model.layout`). Orbax writes
into a temporary directory and renames it when complete, so a crash mid-save never leaves a half checkpoint that looks finished; a
finished one that cannot be read (disk corruption, deleted files) is moved aside to
`DIR/checkpoints_corrupt/` with a warning, and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flan_jax.model import layout
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

    def restore_latest(self, abstract_state: TrainState, data_iter: Any) -> TrainState | None:
        """The newest readable checkpoint restored into `abstract_state`'s shardings, or None.

        Newer checkpoints that fail while an older one restores are corrupt: they are moved aside.
        If every checkpoint fails the cause is almost surely this run's config (another model
        shape, another process count), so nothing is moved and the first error is raised.
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved_stacked = saved_layers_stacked(self.directory / str(step) / "params")
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
                restore_data_iterator(self.directory / str(step) / "data_iter", data_iter)
            except Exception as error:  # noqa: BLE001 (judged below, once an older one is tried)
                logging.warning("Checkpoint %s cannot be restored: %s: %s", self.directory / str(step), type(error).__name__, str(error)[:500])
                failed.append((step, error))
                continue
            for bad_step, error in failed:
                self._set_aside(bad_step, error)
            state = TrainState(params=restored["params"], opt_state=restored["opt_state"], **restored["train_meta"])
            logging.info("Resumed from checkpoint %s", self.directory / str(step))
            return state
        if failed:
            step, error = failed[0]
            raise RuntimeError(
                f"No checkpoint in {self.directory} can be restored into this run (newest: step {step}). "
                "Does the config (model shape, optimizer, number of processes) differ from the run that "
                "wrote them? Use another --workdir for a different run."
            ) from error
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_model(workdir: str | os.PathLike, step: int | None = None):
    """(model, config, step) from a run's checkpoint: params only, on the first local device.

    For evaluation, notebooks and conversion. `step=None` takes the newest readable checkpoint.
    """
    from flax import nnx

    from flan_jax.model import registry
    from flan_jax.train import objectives, partitioning, state as state_lib

    manager = ocp.CheckpointManager(
        epath.Path(workdir) / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {epath.Path(workdir) / 'checkpoints'}")
    errors = []
    for candidate in steps:
        try:
            config = config_from_dict(manager.restore(candidate, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
            mesh = jax.make_mesh((1, 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.local_devices()[:1])
            cfg = registry.config_from(config.model)
            heads = objectives.get_objective(config).model_heads if "objective" in config else ()
            parts = state_lib.ModelParts(
                lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), heads=heads), mesh, partitioning.axis_rules(config.mesh)
            )
            abstract = jax.tree.map(
                lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), parts.abstract_params, parts.param_shardings
            )
            item = epath.Path(workdir) / "checkpoints" / str(candidate) / "params"
            target, _ = in_saved_layout(abstract, saved_layers_stacked(item))
            params = manager.restore(candidate, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            params = layout.to_layout_placed(params, abstract)
        except Exception as error:  # noqa: BLE001
            if step is not None:
                raise
            logging.warning("Checkpoint %s unreadable (%s); trying an older one", candidate, error)
            errors.append(error)
            continue
        manager.close()
        return parts.merge(params), config, int(candidate)
    raise RuntimeError(f"No readable checkpoint in {workdir}: {errors}")
