"""Checks of the NVIDIA GPU paths (cuDNN fused attention); skipped where jax has no GPU.

CI has no GPU, so these run only when the suite runs on one (`pytest tests/test_gpu.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model import transformer

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention)")


def _packed_bf16_inputs(n_kv_heads: int, b: int = 2, t: int = 256, h: int = 8, d: int = 64):
    kq, kk, kv, kw = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, n_kv_heads, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, n_kv_heads, d), jnp.bfloat16)
    out_weights = jax.random.normal(kw, (b, t, h, d))
    # Packed rows: three documents in one, two and trailing padding in the other.
    segments = np.ones((b, t), np.int32)
    segments[0, 40:150], segments[0, 150:] = 2, 3
    segments[1, 100:200], segments[1, 200:] = 2, 0
    return q, k, v, transformer.attention_mask(jnp.asarray(segments)), out_weights


def _relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_cudnn_attention_matches_reference_on_packed_rows(n_kv_heads):
    """The model's cuDNN call (mask + is_causal) vs float32 masked attention: values and gradients."""
    q, k, v, mask, out_weights = _packed_bf16_inputs(n_kv_heads)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

    def reference(q, k, v):
        return transformer.reference_attention(q, k, v, mask)

    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    assert _relative_error(jax.jit(cudnn)(q, k, v), jax.jit(reference)(*upcast)) < 1e-2

    def objective(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * out_weights)

    got = jax.jit(jax.grad(objective(cudnn), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.jit(jax.grad(objective(reference), argnums=(0, 1, 2)))(*upcast)
    for name, g, e in zip("qkv", got, expected):
        assert _relative_error(g, e) < 2e-2, f"d{name}"


def test_cudnn_model_matches_reference_model_in_bf16():
    """The whole bf16 model with attention="cudnn" vs "reference" on a packed batch."""
    from flax import nnx

    from flan_jax import model as fm

    shape = dict(vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, max_positions=256)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 512, (2, 256)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 100 + [2] * 156], 2, axis=0), jnp.int32)
    logits = {}
    for attention in ("cudnn", "reference"):
        cfg = fm.ModelConfig.for_family("llama", **shape, attention=attention, dtype="bfloat16")
        model = fm.Transformer(cfg, rngs=nnx.Rngs(0))
        logits[attention] = jax.jit(lambda t, s, m=model: m(t, segment_ids=s))(tokens, segments)
    assert _relative_error(logits["cudnn"], logits["reference"]) < 2e-2


def _lora_loss_and_adapter_grads(attention: str, dtype: str, base_dtype: str, *, scan_layers: bool):
    """Mean next-token loss of a LoRA model (rank 4, B random so the adapters matter) and its
    gradients for the adapters only; the base held in `base_dtype`, as the trainer's frozen slot
    holds it with `trainable.frozen_dtype`."""
    from flax import nnx
    from flax.nnx import traversals

    from flan_jax import model as fm
    from flan_jax.model import lora, registry

    shape = dict(vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, max_positions=256)
    cfg = fm.ModelConfig.for_family("llama", **shape, attention=attention, dtype=dtype, scan_layers=scan_layers)
    model = registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=4, alpha=8.0))
    for i, (_, module) in enumerate(lora.adapters(model)):
        module.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), module.lora_b.shape)
    graphdef, params = nnx.split(model, nnx.Param)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(params))
    is_adapter = {path: path[-1] in ("lora_a", "lora_b") for path in flat}
    adapters = {p: v for p, v in flat.items() if is_adapter[p]}
    base = {p: v.astype(base_dtype) for p, v in flat.items() if not is_adapter[p]}
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 512, (2, 257)), jnp.int32)

    def loss(adapters):
        merged = nnx.merge(graphdef, nnx.State(traversals.unflatten_mapping({**base, **adapters})))
        logits = merged(tokens[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
    return float(value), grads


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_with_cudnn_and_a_bf16_base_matches_float32_reference(scan_layers):
    """LoRA's merged-kernel projection on the GPU (bf16 compute, cuDNN attention, the frozen base in
    bf16, layers scanned or unrolled) against the float32 reference model: loss and every
    adapter's gradient."""
    loss, grads = _lora_loss_and_adapter_grads("cudnn", "bfloat16", "bfloat16", scan_layers=scan_layers)
    with jax.default_matmul_precision("float32"):
        want_loss, want = _lora_loss_and_adapter_grads("reference", "float32", "float32", scan_layers=scan_layers)
    assert abs(loss - want_loss) < 1e-2 * abs(want_loss)
    assert set(grads) == set(want)
    for path, g in grads.items():
        assert _relative_error(g, want[path]) < 5e-2, "/".join(map(str, path))
