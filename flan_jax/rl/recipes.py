"""What the RL recipe configs share: a run's model section and tokenizer taken from where it starts.

`checkpoint.init_from` must describe the same architecture as `config.model` (the trainer checks
every field). A config that starts from "whatever the user trained or converted" therefore reads
it from there instead of asking for the fields as flags:

  a run's workdir (checkpoints/ + config.json)   its model section; its tokenizer (copied by the trainer)
  converted weights (flan_jax.convert --from_hf)  model_config.json; its tokenizer.json
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from flan_jax.model.config import RUNTIME_FIELDS


def start_from(config: Any, init: str) -> Any:
    """Sets `config.checkpoint.init_from = init` and the model / tokenizer fields that must match it."""
    config.checkpoint.init_from = init
    if not init:
        return config
    folder = pathlib.Path(init)
    if (folder / "checkpoints").is_dir() and (folder / "config.json").is_file():
        model = json.loads((folder / "config.json").read_text())["model"]
        for key, value in model.items():
            if key in config.model and key not in RUNTIME_FIELDS:
                config.model[key] = tuple(value) if isinstance(value, list) else value
        config.data.tokenizer.path = ""  # the run's own tokenizer.model (copied into the new workdir)
        return config
    from flan_jax.convert.checkpoint import config_model_overrides, read_model_config

    for key, value in config_model_overrides(read_model_config(folder)).items():
        config.model[key] = value
    if (folder / "tokenizer.json").is_file():
        config.data.tokenizer.kind = "hf"
        config.data.tokenizer.path = str(folder / "tokenizer.json")
    return config
