"""The trainer: mesh and sharding rules, Optax optimizer, loss, Orbax checkpoints, the loop.

    python -m flan_jax.train --config=configs/demo.py --workdir=DIR
    flan_jax.train.loop.train(config, workdir)
    flan_jax.train.checkpointing.load_model(workdir) -> (model, config, step)

See docs/training.md. Submodules are imported on use so `import flan_jax.train` stays cheap.
"""
