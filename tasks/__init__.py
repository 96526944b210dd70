"""Task and mixture definitions, registered by name when this package is imported.

Installed as the package `flan_jax_tasks` (a source checkout has a `flan_jax_tasks` symlink to this
folder), the default of `config.data.task_modules`, which the trainer imports at start, so configs
only name things:

  synthetic         the built-in FLAN-style mixture generated in code (the demo's data)
  t0                P3/T0 tasks (one per file), 8 clusters, t0_<cluster>, t0_minus_<cluster>
  flan_cot          FLAN chain-of-thought tasks (+ answer-only variants) and GSM8K
  instruction_eval  evaluation-only: Self-Instruct user-oriented, AlpacaEval, MT-bench first turns
  flan_mini         T0 + CoT + GSM8K with FLAN 2022's weights

Real-data tasks read their files only when used (paths say "{data_dir}", resolved from
FLAN_JAX_DATA_DIR), so importing this package never needs the data on disk.
"""

from . import flan_cot, flan_mini, instruction_eval, synthetic, t0  # noqa: F401  (register on import)
