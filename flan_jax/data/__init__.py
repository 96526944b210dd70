"""flan_jax.data: tasks, templates, mixtures (this file's exports), then tokenization, packing, loading.

    from flan_jax import data
    task = data.Task("my_qa", data.JsonlSource({"train": "{data_dir}/qa/train.jsonl"}),
                     [data.Template("Question: {question}\nAnswer:", "{answer}")])
    data.register_task(task)
    ds = data.get("my_qa").get_dataset("train", seed=0)   # grain.MapDataset of rendered examples

See docs/tasks.md for templates, few-shot, chain-of-thought, answer options, answer extraction,
metrics, carved validation splits and mixtures.
Tokenizer, packing and loader live in their own modules (`flan_jax.data.tokenizer`, ...), imported
explicitly, so that defining tasks stays cheap.
"""

from flan_jax.data.answers import (
    AnswerAfter,
    AnswerChoice,
    AnswerExtractor,
    AnswerFunction,
    AnswerRegex,
    normalize_answer,
    option_labels,
)
from flan_jax.data.checks import check_examples
from flan_jax.data.errors import DataError, DataUnavailableError
from flan_jax.data.formats import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    PROMPT_RESPONSE,
    AlpacaFormat,
    ChatFormat,
    PromptCompletionFormat,
    StripSuffix,
    UnescapeNewlines,
    alpaca_task,
    chat_task,
    prompt_completion_task,
)
from flan_jax.data.metric_registry import Metric, get_metric, metric_names, register_metric, unregister_metric
from flan_jax.data.mixing import proportional_rates
from flan_jax.data.registry import (
    BUILTIN_TASK_MODULE,
    Mixture,
    Task,
    UnknownNameError,
    get,
    get_mixture,
    get_task,
    import_task_modules,
    list_names,
    register_mixture,
    register_task,
    unregister,
)
from flan_jax.data.sources import (
    CsvSource,
    FunctionSource,
    InMemorySource,
    JsonlSource,
    JsonSource,
    Records,
    Source,
    TfdsSource,
    TsvSource,
    data_dir,
    set_default_on_bad_record,
)
from flan_jax.data.splits import CarvedSplits
from flan_jax.data.templates import (
    COT_TARGETS,
    COT_TRIGGERS,
    DEFAULT_OPTION_STYLES,
    OPTION_STYLES,
    FewShot,
    Template,
    answer_only_templates,
    cot_templates,
    render_options,
)

__all__ = [
    "ALPACA_PROMPT_NO_INPUT", "ALPACA_PROMPT_WITH_INPUT", "COT_TARGETS", "COT_TRIGGERS", "DEFAULT_OPTION_STYLES",
    "OPTION_STYLES", "PROMPT_RESPONSE", "AlpacaFormat", "AnswerAfter", "AnswerChoice", "AnswerExtractor",
    "AnswerFunction", "BUILTIN_TASK_MODULE", "AnswerRegex", "CarvedSplits", "ChatFormat", "CsvSource", "DataError",
    "DataUnavailableError", "FewShot", "FunctionSource", "InMemorySource", "JsonSource", "JsonlSource", "Metric",
    "Mixture", "PromptCompletionFormat", "Records", "Source", "StripSuffix", "Task", "Template", "TfdsSource",
    "TsvSource", "UnescapeNewlines", "UnknownNameError", "alpaca_task", "answer_only_templates", "chat_task",
    "check_examples", "cot_templates", "data_dir", "get", "get_metric", "get_mixture", "get_task",
    "import_task_modules", "list_names", "metric_names", "normalize_answer", "option_labels",
    "prompt_completion_task", "proportional_rates", "register_metric", "register_mixture", "register_task",
    "render_options", "set_default_on_bad_record", "unregister", "unregister_metric",
]
