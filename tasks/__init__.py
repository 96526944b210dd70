"""Task and mixture definitions, registered by name when this package is imported.

`flan_jax.data.get(name)` imports this package on first lookup, so configs only name things:

  synthetic   the built-in FLAN-style mixture generated in code (the demo's data)

Real-data tasks read their files only when used (paths say "{data_dir}", resolved from
FLAN_JAX_DATA_DIR), so importing this package never needs the data on disk.
"""

from tasks import synthetic  # noqa: F401  (registers on import)
