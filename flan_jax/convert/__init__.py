"""Hugging Face (safetensors) and GGUF -> flan_jax checkpoints, and back to HF, proven by logit parity.

    python -m flan_jax.convert --from_hf=HF_DIR --out=OUT_DIR
    python -m flan_jax.convert --from_gguf=FILE.gguf --out=OUT_DIR      (llama.cpp files, dequantised)
    python -m flan_jax.convert --to_hf=OUT_HF_DIR --workdir=DIR [--step=N]
    python -m flan_jax.convert --to_hf=OUT_HF_DIR --checkpoint=CONVERTED_DIR

`load_converted(OUT_DIR) -> (ModelConfig, params)` is what `checkpoint.init_from` uses.
"""

from flan_jax.convert.checkpoint import config_model_overrides, load_converted, save_converted
from flan_jax.convert.hf_export import convert_checkpoint_to_hf, convert_workdir_to_hf, hf_tensors, write_hf
from flan_jax.convert.gguf_import import GGUFError, convert_from_gguf, load_gguf_params
from flan_jax.convert.hf_import import RefusedCheckpointError, convert_from_hf, load_hf_params

__all__ = [
    "config_model_overrides",
    "RefusedCheckpointError",
    "GGUFError",
    "convert_checkpoint_to_hf",
    "convert_from_gguf",
    "convert_from_hf",
    "convert_workdir_to_hf",
    "hf_tensors",
    "load_converted",
    "load_gguf_params",
    "load_hf_params",
    "save_converted",
    "write_hf",
]
