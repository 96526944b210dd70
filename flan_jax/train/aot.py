"""Compile the trainer's own step ahead of time, on abstract arrays: does a config fit, how long does
it compile, and what does GSPMD move between devices?

    from flan_jax.train import aot
    report = aot.compile_train_step(config)      # on as many (simulated) devices as the mesh needs
    report.compile_s, report.state_bytes_per_device, report.collectives["all-gather"]

The step is built from the trainer's pieces exactly as `loop.train` builds it (the objective,
`loop.build_model`, `optimizer.make_optimizer`, `state.state_shardings`, `step.make_train_step`)
and lowered with `jax.ShapeDtypeStruct`s that carry the shardings, so nothing is allocated: an
8B or 70B step compiles on a CPU host with `--xla_force_host_platform_device_count` simulated
devices (`benchmarks/aot_fit.py` runs the named shapes).

Collectives are read from the program right after SPMD partitioning (XLA's dump of that pass):
that is what GSPMD decided to move. XLA:CPU later rewrites every bf16 collective as f32 (its
float normalisation; the CPU runtime has no bf16 collectives), so the compiled CPU program would
report the wrong dtypes.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Printed by XLA's SPMD partitioner when it must replicate a tensor to change its sharding.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"


@dataclasses.dataclass
class StepReport:
    batch_shapes: dict[str, tuple[int, ...]]  # the abstract batch the step was compiled for
    lower_s: float
    compile_s: float
    param_bytes_per_device: int
    opt_bytes_per_device: int
    largest_leaf_bytes_per_device: int
    replicated_large_leaves: list[str]  # state arrays over 16 MiB that are not sharded at all
    temp_bytes: int | None  # XLA's temporary buffers as this backend plans them
    partitioned_hlo: str  # the step after SPMD partitioning ("" if the backend ran no such pass)
    # The compiled program (after the backend's own passes: XLA:GPU forms reduce-scatters there).
    optimized_hlo: str = ""

    @property
    def state_bytes_per_device(self) -> int:
        return self.param_bytes_per_device + self.opt_bytes_per_device

    @property
    def collectives(self) -> dict[str, dict[str, int]]:
        return count_collectives(self.partitioned_hlo)

    @property
    def all_gathered_matrix_dtypes(self) -> dict[str, int]:
        """Dtypes of the all-gathers of rank >= 2 (weights, activations), with counts."""
        return count_collectives(self.partitioned_hlo, min_rank=2).get("all-gather", {})

    @property
    def all_reduces_then_sliced(self) -> int:
        return count_all_reduce_then_slice(self.partitioned_hlo)

    def gradient_reductions(self) -> dict[str, int]:
        """How the weight gradients are reduced: after partitioning (all-reduces of matrices, and
        those sliced right after: the reduce-scatter pattern) and in the compiled program
        (reduce-scatters and matrix all-reduces the backend kept). On XLA:CPU the compiled
        program keeps the all-reduces; XLA:GPU should turn the sliced ones into reduce-scatters."""
        def matrices(hlo: str, kind: str) -> int:
            return sum(count_collectives(hlo, min_rank=2).get(kind, {}).values())

        return {
            "partitioned_matrix_all_reduces": matrices(self.partitioned_hlo, "all-reduce"),
            "partitioned_all_reduces_then_sliced": self.all_reduces_then_sliced,
            "compiled_reduce_scatters": sum(count_collectives(self.optimized_hlo).get("reduce-scatter", {}).values()),
            "compiled_matrix_all_reduces": matrices(self.optimized_hlo, "all-reduce"),
        }


def abstract_batch(config: Any, objective: Any, sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The objective's batch features as abstract [batch_size, ...] arrays, shaped and typed like the
    rows its family's feature converter builds (an empty row of `converter.row_shape`); features no
    converter row holds (an objective's own, e.g. RL's advantages) are [batch_size, seq_len],
    float32 for `*weights` and int32 otherwise."""
    from flan_jax.data import features as features_lib

    converter = getattr(objective, "converter", None)
    row: dict[str, np.ndarray] = {}
    if converter is not None:
        row = converter.build_row([], converter.row_shape(features_lib.FeatureConfig.from_data_config(config.data)))
    rows = int(config.data.batch_size)
    out = {}
    for key in objective.features:
        if key in row:
            out[key] = jax.ShapeDtypeStruct((rows, *row[key].shape), row[key].dtype, sharding=sharding)
        else:
            dtype = jnp.float32 if key.endswith("weights") else jnp.int32
            out[key] = jax.ShapeDtypeStruct((rows, int(config.data.seq_len)), dtype, sharding=sharding)
    return out


def compile_train_step(config: Any, *, devices: list | None = None) -> StepReport:
    """Lowers and compiles the trainer's jitted step for `config` on abstract state and batch.

    The batch holds the objective's features in the layout its feature converter builds (see
    `abstract_batch`: e.g. T5's decoder rows are `data.targets_len` long, not `seq_len`).
    `config.model.scan_layers=None` is resolved as on an accelerator (the CPU exception of
    `default_scan_layers` is about running on CPU, not compiling for a pod).
    """
    from flan_jax.model.family_config import default_scan_layers
    from flan_jax.model.registry import config_from
    from flan_jax.train import loop, objectives, optimizer, partitioning, state as state_lib, step as step_lib

    if config.model.get("scan_layers") is None:  # as the target accelerator would pick
        config = config.copy_and_resolve_references()
        config.model.scan_layers = default_scan_layers(config_from(config.model), backend="accelerator")
    objective = objectives.get_objective(config)
    mesh = partitioning.make_mesh(config.mesh, devices)
    rules = partitioning.axis_rules(config.mesh)
    _, parts = loop.build_model(config, mesh, rules, heads=objective.model_heads)
    tx, schedule = optimizer.make_optimizer(config.optimizer, int(config.train.num_steps))
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    state = state_lib.abstract_state(parts, tx, shardings, config.seed)
    frozen_params = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), parts.abstract_params, parts.param_shardings
    )
    state = state.replace(frozen={slot: frozen_params for slot in objective.frozen_slots})
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)
    batch = abstract_batch(config, objective, partitioning.batch_sharding(mesh, rules))
    with tempfile.TemporaryDirectory(prefix="flan_jax_aot_") as dump, jax.set_mesh(mesh):
        started = time.perf_counter()
        lowered = train_step.lower(state, batch)
        lower_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_pass_re": "spmd-partitioning"})
        compile_s = time.perf_counter() - started
        hlo = _read_partitioned(dump)
    param_bytes, largest_param, replicated_params = _per_device(state.params)
    opt_bytes, largest_opt, replicated_opt = _per_device(state.opt_state)
    memory = compiled.memory_analysis()
    return StepReport(
        batch_shapes={key: tuple(value.shape) for key, value in batch.items()},
        lower_s=lower_s,
        compile_s=compile_s,
        param_bytes_per_device=param_bytes,
        opt_bytes_per_device=opt_bytes,
        largest_leaf_bytes_per_device=max(largest_param, largest_opt),
        replicated_large_leaves=replicated_params + replicated_opt,
        temp_bytes=getattr(memory, "temp_size_in_bytes", None) if memory is not None else None,
        partitioned_hlo=hlo,
        optimized_hlo=compiled.as_text() or "",
    )


def _per_device(tree: Any) -> tuple[int, int, list[str]]:
    total, largest, replicated = 0, 0, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        local = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += local
        largest = max(largest, local)
        if leaf.sharding.is_fully_replicated and local > 16 * 2**20:
            replicated.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")
    return total, largest, replicated


def _read_partitioned(dump: str) -> str:
    files = sorted(glob.glob(os.path.join(dump, "*after_spmd-partitioning*.txt")))
    if not files:
        return ""
    with open(max(files, key=os.path.getsize)) as f:  # the step (other modules are tiny helpers)
        return f.read()


_COLLECTIVE = re.compile(r"= (\([^=]*?\)|\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo: str, *, min_rank: int = 0) -> dict[str, dict[str, int]]:
    """{kind: {dtype: count}} of the collective ops in an HLO text (a tuple result counts per element).

    Ops inside a loop body (the layer scan) are counted once, not once per iteration.
    """
    counts: dict[str, dict[str, int]] = {}
    for match in _COLLECTIVE.finditer(hlo):
        kind = match.group(2)
        for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", match.group(1)):
            if len([d for d in dims.split(",") if d]) < min_rank:
                continue
            counts.setdefault(kind, {})
            counts[kind][dtype] = counts[kind].get(dtype, 0) + 1
    return counts


def count_all_reduce_then_slice(hlo: str) -> int:
    """All-reduces whose result feeds a dynamic-slice: the reduce-scatter pattern.

    XLA:GPU runs ReduceScatterCreator right after partitioning (its "collective-optimizations"
    pipeline), which turns each such pair into one reduce-scatter; XLA:CPU has no such pass.
    """
    names = set(re.findall(r"%(all-reduce[.\w-]*) = ", hlo))
    sliced = set(re.findall(r"dynamic-slice\(%(all-reduce[.\w-]*)", hlo))
    return len(names & sliced)
