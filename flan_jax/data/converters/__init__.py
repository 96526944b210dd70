"""Feature converters: how a rendered example becomes token features and packed rows for one kind of
model, and which of those features the model call takes.

seqio's idea (`LMFeatureConverter`, `EncDecFeatureConverter`): each converter lists the batch
features it produces; the model family names its converter (`model.registry.Family.feature_converter`)
and the loader, the SFT objective and the evaluator's scoring all go through it, so neither the
trainer nor the evaluator knows which family it runs. A converter provides

  name                       recorded in the data iterator's fingerprint (a resume checks it)
  batch_keys                 the arrays of every packed batch row
  loss_keys                  (targets, loss weights, segment ids): the predicted stream the loss reads
  row_shape(feature_config)  a row's capacity: an int (one stream) or a tuple (encoder, decoder rows)
  lengths(features)          what one example takes of each stream (same type as row_shape)
  featurize(example, tokenizer, feature_config) -> (features | None, Outcome)   one example, counted
  build_row(examples, row_shape) -> row          several examples in one row (`pad_one`: one alone)
  model_features(batch, prefix_lm=, rng=) -> dict the keyword arguments of the model's
                                                 `hidden_states(**...)` / `__call__(**...)`
  check_tokenizer(tokenizer)                     refuses a tokenizer without the ids it needs
  for evaluation:
  prompt_ids(tokenizer, text), prompt_from_ids(tokenizer, ids), target_ids(tokenizer, text)
                             what a prompt / a scored target is
  cut_prompt(ids, budget), prompt_budget(row_shape, max_new_tokens)   prompts for generation
  score_features(prompt, target, row_shape) -> (features, (start, end), truncated)
                                                 one scored sequence; `start:end` are the positions
                                                 of the target along the predicted stream

Converters:
  decoder  docs/design.md §4: one segment per example, inputs and targets in one row (decoder.py)
  encdec   t5x's encoder-decoder layout: inputs packed into encoder rows, targets into decoder rows
           with their own segment ids and positions (encdec.py)
  pairs    a preference pair as two segments kept in one row (reward model, DPO family) (pairs.py);
           the objective asks for it (its `feature_converter`), not the family
"""

from __future__ import annotations

from typing import Any

from flan_jax.data.converters.decoder import DECODER, DecoderConverter
from flan_jax.data.converters.encdec import ENCDEC, EncDecConverter
from flan_jax.data.converters.pairs import PAIRS, REFERENCE_FEATURE, PairConverter

CONVERTERS = {DECODER.name: DECODER, ENCDEC.name: ENCDEC, PAIRS.name: PAIRS}


def get_converter(name: str) -> Any:
    """The converter registered under `name` ("decoder", "encdec" or "pairs")."""
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ValueError(f"unknown feature converter {name!r}; known: {', '.join(sorted(CONVERTERS))}") from None


def for_model_config(model_section_or_cfg: Any) -> Any:
    """The converter of the family that `config.model` (or a built model config) selects."""
    from flan_jax.model import registry

    get = getattr(model_section_or_cfg, "get", None)
    family = get("family") if get is not None else getattr(model_section_or_cfg, "family", None)
    return get_converter(registry.get_family(family or "llama").feature_converter)


def for_model(model: Any) -> Any:
    """The converter of a built model's family (a stand-in module without a config: decoder)."""
    from flan_jax.model import registry

    return get_converter(registry.family_of(model).feature_converter)


__all__ = [
    "CONVERTERS", "DECODER", "DecoderConverter", "ENCDEC", "EncDecConverter", "PAIRS", "PairConverter", "REFERENCE_FEATURE",
    "for_model", "for_model_config", "get_converter",
]
