"""The RL prompt stream and the reward registry, without a model: order, resume, bad input, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flan_jax import data, default_config, rl
from flan_jax.rl import loop as rl_loop
from flan_jax.rl import prompts as prompts_lib
from flan_jax.rl.rewards import Completion, RewardError, RewardSet, TaskMetricReward
from tests import data_fakes

data.import_task_modules([data.BUILTIN_TASK_MODULE])  # the synthetic tasks the task_metric reward scores with


def _iterator(examples, policy="error", per_step=3, budget=12):
    return prompts_lib.PromptIterator(
        data_fakes.example_source(examples), data_fakes.tiny_tokenizer(), prompts_per_step=per_step,
        max_prompt_tokens=budget, on_long_prompt=policy, fingerprint={"source": "fake"},
    )


def _examples(n=200, seed=0):
    return data_fakes.fake_examples(n, seed=seed, max_input_words=12)


def test_prompts_are_bos_plus_the_rendered_inputs_in_stream_order():
    examples = _examples()
    it = _iterator(examples, policy="skip", budget=64)
    tok = data_fakes.tiny_tokenizer()
    first, second = next(it), next(it)
    assert [p.position for p in first + second] == list(range(6))
    for p in first + second:
        assert p.tokens == [tok.bos_id, *tok.encode(examples[p.position]["inputs"])]
        assert p.example is not None and p.example["task"] == examples[p.position]["task"]


def test_the_prompt_stream_resumes_exactly_from_its_state():
    examples = _examples()
    it = _iterator(examples, policy="skip")
    next(it)
    state = it.get_state()
    expected = [[p.position for p in next(it)] for _ in range(3)]
    restored = _iterator(examples, policy="skip")
    restored.set_state(state)
    assert [[p.position for p in next(restored)] for _ in range(3)] == expected
    assert restored.counts() == it.counts()


def test_a_resume_with_other_settings_is_refused():
    it = _iterator(_examples(), policy="skip")
    state = it.get_state()
    with pytest.raises(ValueError, match="max_prompt_tokens: 12 -> 20"):
        _iterator(_examples(), policy="skip", budget=20).set_state(state)


def test_an_overlong_prompt_is_an_error_naming_its_task_template_and_position():
    examples = _examples()
    tok = data_fakes.tiny_tokenizer()
    long_at = next(i for i, ex in enumerate(examples) if len(tok.encode(ex["inputs"])) + 1 > 12)
    it = _iterator(examples)
    with pytest.raises(prompts_lib.PromptTooLongError, match=rf"stream position {long_at} \(task '{examples[long_at]['task']}'.*prompt '#{long_at}:"):
        for _ in range(20):
            next(it)


def test_overlong_prompts_are_skipped_or_truncated_and_counted():
    examples = _examples()
    tok = data_fakes.tiny_tokenizer()
    too_long = [len(tok.encode(ex["inputs"])) + 1 > 12 for ex in examples]
    skip = _iterator(examples, policy="skip")
    taken = [p for _ in range(6) for p in next(skip)]
    assert len(taken) == 18 and all(len(p.tokens) <= 12 for p in taken)
    assert skip.counts()["prompts_skipped"] == sum(too_long[: skip.counts()["prompts_read"]]) > 0
    cut = _iterator(examples, policy="truncate")
    taken = [p for _ in range(6) for p in next(cut)]
    assert [p.position for p in taken] == list(range(18))
    assert all(len(p.tokens) <= 12 for p in taken) and cut.counts()["prompts_truncated"] == sum(too_long[:18])
    assert all(p.tokens_cut > 0 for p in taken if too_long[p.position])


# ----------------------------------------------------------------------------- rewards
def _config(**rl_fields):
    config = default_config.get_config()
    config.rl.max_new_tokens = 8
    for key, value in rl_fields.items():
        config.rl[key] = value
    return config


def _completion(text, task="synthetic.addition", references=("5",), ended=True, n_tokens=3, template="train0"):
    example = {"inputs": "What is 2 plus 3?", "task": task, "references": list(references), "template": template, "options": []}
    return Completion(text=text, example=example, prompt_tokens=[2, 5], tokens=list(range(n_tokens)), ended=ended)


def test_task_metric_reward_is_the_tasks_own_metric_through_its_answer_extractor():
    scored = RewardSet(_config(), None)([_completion("5"), _completion("6"), _completion(" 5 ")])
    np.testing.assert_array_equal(scored.total, [1.0, 0.0, 1.0])
    task = data.get_task("synthetic.addition")
    assert TaskMetricReward().metric_for(task).name == "exact_match"


def test_a_task_without_a_metric_is_refused_by_name():
    task = data.Task("rl_test.no_metric", data.InMemorySource({"train": [{"q": "a", "a": "b"}]}), [("{q}", "{a}")], metrics=())
    with pytest.raises(ValueError, match="task 'rl_test.no_metric' has no metric that scores a prediction"):
        RewardSet(_config(), None).check_tasks([task])


def test_user_rewards_register_in_a_few_lines_and_are_weighted_with_penalties():
    @rl.register_reward("rl_test_words", replace=True)
    def words(completion: str, example: dict) -> float:
        return float(len(completion.split()))

    config = _config(rewards=("task_metric", "rl_test_words"), reward_weights=(2.0, 0.5), no_eos_penalty=1.0,
                     overlong_buffer=4, overlong_penalty=2.0)
    scored = RewardSet(config, None)([
        _completion("5", n_tokens=2),                      # 2*1 + 0.5*1, short, ended
        _completion("5 apples", ended=False, n_tokens=8),   # 2*0 + 0.5*2 - 1 (no EOS) - 2 * 4/4 (over length)
        _completion("5", n_tokens=6),                      # 2*1 + 0.5*1 - 2 * 2/4
    ])
    np.testing.assert_allclose(scored.total, [2.5, 1.0 - 1.0 - 2.0, 2.5 - 1.0])
    np.testing.assert_allclose(scored.per_reward["rl_test_words"], [1, 2, 1])


def test_a_reward_that_raises_for_one_completion_names_it():
    @rl.register_reward("rl_test_fragile", replace=True)
    def fragile(completion: str, example: dict) -> float:
        if completion == "boom":
            raise ZeroDivisionError("no")
        return 1.0

    items = [_completion("fine"), _completion("boom", template="train3")]
    with pytest.raises(RewardError, match=r"reward 'rl_test_fragile' raised ZeroDivisionError\('no'\) for the completion 'boom' of "
                                          r"task 'synthetic.addition', template 'train3', prompt 'What is 2 plus 3\?'"):
        RewardSet(_config(rewards=("rl_test_fragile",)), None)(items)
    skipping = RewardSet(_config(rewards=("rl_test_fragile",), on_bad_reward="skip"), None)
    scored = skipping(items)
    assert scored.bad.tolist() == [False, True] and scored.total[0] == 1.0 and math.isnan(scored.total[1])
    assert skipping.bad_count == 1


def test_a_nan_reward_is_an_error_or_a_counted_skip():
    rl.register_reward("rl_test_nan", lambda completion, example: float("nan") if completion == "x" else 0.5, replace=True)
    with pytest.raises(RewardError, match="returned nan for the completion 'x'"):
        RewardSet(_config(rewards=("rl_test_nan",)), None)([_completion("x")])
    skipping = RewardSet(_config(rewards=("rl_test_nan",), on_bad_reward="skip"), None)
    assert skipping([_completion("x"), _completion("y"), _completion("x")]).bad.tolist() == [True, False, True]
    assert skipping.bad_count == 2


def test_unknown_rewards_and_bad_weights_are_refused():
    with pytest.raises(ValueError, match="unregistered reward.*'nope'"):
        RewardSet(_config(rewards=("nope",)), None)
    with pytest.raises(ValueError, match="2 values for 1 rewards"):
        RewardSet(_config(reward_weights=(1.0, 2.0)), None)


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 3, "group_size=3 must divide config.data.batch_size=8"),
    ("group_size", 1, "GRPO's advantages compare completions of one prompt"),
    ("minibatches", 3, "minibatches dividing data.batch_size=8"),
    ("max_new_tokens", 64, "leave room for a prompt"),
])
def test_rl_settings_that_cannot_work_are_refused_before_anything_runs(field, value, message):
    config = default_config.get_config()
    config.objective.name = "grpo"
    config.data.batch_size, config.data.seq_len = 8, 64
    config.rl[field] = value
    with pytest.raises(ValueError, match=message):
        rl_loop.check_rl_config(config)
