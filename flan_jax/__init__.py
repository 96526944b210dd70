"""flan_jax: FLAN-style instruction tuning of language models in JAX/Flax.

Stages (one subpackage each): `data` (tasks, templates, mixtures, tokenization, packing, loading),
`model` (the NNX decoder and generation), `train` (mesh, optimizer, checkpoints, loop), `eval`
(metrics, scoring, the evaluator) and `convert` (Hugging Face checkpoints); the command-line tools
(`python -m flan_jax.train`, `.evaluate`, `.inspect_mixture`, `.demo`) live in `cli`. See docs/design.md.
"""

__version__ = "0.1.0"
