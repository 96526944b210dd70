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
]

EXTRAS = {
    # Parity tests against the reference implementations (trl: the preference losses). torch is pinned to the CPU build
    # (an unpinned torch pulls a multi-GB CUDA build).
    "hf": ["torch==2.13.0", "transformers==5.23.0", "trl==1.16.0"],
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
    packages=setuptools.find_packages(include=["flan_jax", "flan_jax.*", "tasks", "tasks.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
)
