"""XLA compiler options for the train step's executable, where a backend needs them.

They go to `jax.jit(..., compiler_options=...)`, so they apply to that compiled program only:
the caller's process, its `XLA_FLAGS` and every other jitted function stay as they were.

A frozen base held in bf16 under float32 compute, on CPU (LoRA with
`trainable.frozen_dtype="bfloat16"`): XLA:CPU's `float-normalization-bf16` pass rewrites the
bf16 ops its backend does not emit natively as float32 ones, and the scanned layers' per-layer
`dynamic-slice` of each bf16 stack is one of them. The float32 convert of the loop-invariant stack
is then hoisted out of the layer loop, so the step holds a float32 copy of the whole base (a
SmolLM2-135M-shape LoRA step: 2,331 MiB of temporaries against 1,818 with a float32 base,
benchmarks/RESULTS.md). With float32 compute and float32 trained parameters, the only bf16 ops
in the step move or convert the frozen weights (slices, gathers, transposes, converts); float32
arithmetic on the converted values is unchanged, so the pass can be left out of this executable.
tests/test_xla_options.py checks that the step is then bitwise the same and needs less memory.
(Under bf16 compute the pass does change values, so it stays there.) The option names this
executable's disabled passes: a `--xla_disable_hlo_passes` in the user's `XLA_FLAGS` does not
apply to this step then.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

CPU_BF16_NORMALIZATION = "float-normalization-bf16"


def train_step_options(parts: Any, compute_dtype: Any, platform: str) -> dict[str, str]:
    """The compiler options of the train step for these parameters, compute dtype and platform
    ("cpu", "gpu", "tpu"); empty unless a case above applies."""
    if platform != "cpu" or jnp.dtype(compute_dtype) != jnp.float32 or not parts.has_base:
        return {}
    dtypes = lambda tree: {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)}  # noqa: E731
    if dtypes(parts.trained_abstract) - {jnp.dtype(jnp.float32)} or jnp.dtype(jnp.bfloat16) not in dtypes(parts.base_abstract):
        return {}
    return {"xla_disable_hlo_passes": CPU_BF16_NORMALIZATION}
