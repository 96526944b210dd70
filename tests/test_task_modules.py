"""config.data.task_modules: tasks registered by a user's own package, outside tasks/."""

import textwrap

import pytest

from flan_jax import data


def test_task_modules_register_a_users_jsonl_task(tmp_path, monkeypatch):
    (tmp_path / "qa.jsonl").write_text('{"q": "Who wrote Hamlet?", "a": "Shakespeare"}\n{"q": "2+2?", "a": "4"}\n')
    (tmp_path / "my_lab_tasks.py").write_text(textwrap.dedent(f"""
        from flan_jax import data

        data.register_task(data.Task(
            "my_lab.qa",
            data.JsonlSource({{"train": {str(tmp_path / "qa.jsonl")!r}}}, field_map={{"question": "q", "answer": "a"}}),
            templates=[data.Template("Question: {{question}}\\nAnswer:", "{{answer}}")],
        ))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    data.import_task_modules(["my_lab_tasks"])
    try:
        example = data.get("my_lab.qa").get_dataset("train", shuffle=False)[0]
        assert example["inputs"] == "Question: Who wrote Hamlet?\nAnswer:"
        assert example["targets"] == "Shakespeare"
    finally:
        data.unregister("my_lab.qa")


def test_an_unimportable_task_module_names_the_config_field():
    with pytest.raises(ModuleNotFoundError, match="config.data.task_modules names 'no_such_lab.tasks'"):
        data.import_task_modules(["no_such_lab.tasks"])
