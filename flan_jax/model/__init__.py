"""The model: one config-driven decoder-only transformer
(Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2, GPT-2).

    from flan_jax import model as fm
    cfg = fm.ModelConfig.from_config(config.model)
    m = fm.Transformer(cfg, rngs=nnx.Rngs(0))
    logits = m(input_tokens, positions=positions, segment_ids=segment_ids)   # [B, L, V] float32
    fm.logical_axes(m)   # the logical axis names of every parameter

Generation lives in `flan_jax.model.generate`; the CPU-tuned kernels and their plain XLA
counterparts in `flan_jax.model.kernels` (chosen by `config.model.kernels`).
"""

from flan_jax.model.config import FAMILIES, ModelConfig
from flan_jax.model.transformer import Transformer, attention_mask, logical_axes

__all__ = ["FAMILIES", "ModelConfig", "Transformer", "attention_mask", "logical_axes"]
