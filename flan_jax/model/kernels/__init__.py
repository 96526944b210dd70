"""Backend-specific kernels, kept in one place and chosen by platform and `config.model.kernels`.

Some computations of the model have two forms that give the same result (up to float rounding):

  xla   the plain formulation (`tensordot`, `jax.nn.dot_product_attention`, cos/sin, autodiff for
        every backward pass) that XLA's GPU and TPU compilers are built to optimise;
  cpu   hand-written forms tuned for XLA's CPU backend: custom VJPs whose backward matmuls keep
        bf16 operands with float32 accumulation (`matmul.py`), causal attention that skips the
        masked blocks in one custom VJP (`causal_attention.py`), RoPE tables computed once per step
        and RoPE's backward as the inverse rotation (`rope.py`). Why each one is faster on a CPU:
        docs/training.md, "CPU performance".

`config.model.kernels` picks one: "auto" (the default) takes "cpu" on a CPU backend and "xla" on
GPUs and TPUs, "cpu" or "xla" force one everywhere (tests compare the two; benchmarks measure
them). The choice is resolved when the model is traced, from `jax.default_backend()`.
Measured on this project's CPU machines in benchmarks/RESULTS.md ("kernels").
"""

from __future__ import annotations

import jax

CHOICES = ("auto", "cpu", "xla")
# What "auto" means per backend platform; every platform not listed takes "xla".
AUTO = {"cpu": "cpu"}


def resolve(choice: str, platform: str | None = None) -> str:
    """"cpu" or "xla" for `config.model.kernels` on `platform` (default: jax's default backend)."""
    if choice not in CHOICES:
        raise ValueError(f"config.model.kernels={choice!r}; expected one of {CHOICES}")
    if choice != "auto":
        return choice
    return AUTO.get(platform or jax.default_backend(), "xla")
