"""Evaluation-only instruction-following tasks (a "test" split only; never in a training mixture).

  self_instruct_user_oriented   252 expert-written instructions (Self-Instruct's held-out set);
                                references = the instances' outputs; ROUGE-L
  alpaca_eval                   805 AlpacaEval instructions; reference = text-davinci-003's answer; ROUGE-L
  mt_bench_first_turn           the first turns of the 80 MT-bench questions; no references, so no
                                metric (a judge model would be needed)

Mixture: instruction_eval (the two with references).
"""

from __future__ import annotations

from flan_jax import data
from . import preprocessors

PROMPT = data.Template("{instruction}", "{output}", name="instruction")
PROMPT_WITH_INPUT = data.Template("{prompt}", "{output}", name="instruction_input")


def _with_input(record: dict) -> dict:
    """Self-instruct instances have an optional input; put it under the instruction, as the paper did."""
    text = record["input"].strip()
    return {**record, "prompt": record["instruction"] + (f"\n\n{text}" if text else "")}


def register() -> None:
    data.register_task(data.Task(
        "self_instruct_user_oriented",
        data.JsonlSource({"test": "{data_dir}/self_instruct/user_oriented_instructions.jsonl"}),
        [PROMPT_WITH_INPUT],
        preprocessors=[preprocessors.first_instance, _with_input],
        metrics=("rouge_l",), references_field="references", cluster="instruction_following",
        description="Self-Instruct user-oriented instructions (252), references = instance outputs",
    ))
    data.register_task(data.Task(
        "alpaca_eval",
        data.JsonSource({"test": "{data_dir}/alpaca_eval/text_davinci_003_outputs.json"}),
        [PROMPT],
        metrics=("rouge_l",), cluster="instruction_following",
        description="AlpacaEval (805 instructions), reference = text-davinci-003's answer",
    ))
    data.register_task(data.Task(
        "mt_bench_first_turn",
        data.JsonlSource({"test": "{data_dir}/mt_bench/question.jsonl"}),
        [data.Template("{instruction}", "", name="first_turn")],
        preprocessors=[preprocessors.first_turn],
        metrics=(), cluster="instruction_following",
        description="MT-bench first turns (80); no references",
    ))
    data.register_mixture(data.Mixture(
        "instruction_eval", [("self_instruct_user_oriented", 1.0), ("alpaca_eval", 1.0)],
        description="held-out instruction following with references (ROUGE-L)"))


register()
