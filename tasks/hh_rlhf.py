"""Anthropic HH-RLHF human preference pairs (the harmless-base test split shipped in the data folder).

Each record is two whole dialogues ("\\n\\nHuman: ... \\n\\nAssistant: ...") that differ in the last
assistant turn; `HHRLHFFormat` takes the text up to the last "\\n\\nAssistant:" as the prompt.
Of the 2,312 pairs, 5 have dialogues whose prompts differ and 4 have an empty (whitespace-only)
chosen response: the first are always counted and reported (`task.pair_skips`), the second raise
unless the config skips bad records (`config.data.on_bad_record = "skip"`, as
configs/reward_model_hh.py does).

Names:
  hh_rlhf.harmless_base        all pairs ("test" split, as published)
  hh_rlhf.harmless_base.split  the same pairs carved into "train" and "validation" (every 8th record,
                               `data.CarvedSplits`), so a reward model is scored on held-out pairs of one file
"""

from __future__ import annotations

from flan_jax import data
from flan_jax.data.preference import HHRLHFFormat, PreferenceTask

FILE = "{data_dir}/hh_rlhf/harmless-base-test.jsonl.gz"
VALIDATION_EVERY = 8  # 289 of the 2,312 records


def register() -> None:
    description = "Anthropic HH-RLHF harmless-base test pairs (human preferences)"
    source = data.JsonlSource({"test": FILE})
    data.register_task(PreferenceTask(
        "hh_rlhf.harmless_base", source, pair_format=HHRLHFFormat(),
        cluster="hh_rlhf", description=description,
    ))
    carved = data.CarvedSplits(source, every=VALIDATION_EVERY, base_split="test")
    data.register_task(PreferenceTask(
        "hh_rlhf.harmless_base.split", carved, pair_format=HHRLHFFormat(), cluster="hh_rlhf",
        description=description + f", carved into train and validation (every {VALIDATION_EVERY}th record)",
    ))


register()
