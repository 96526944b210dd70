"""Sources: file formats, field mapping, located errors for bad input, counted skips, TFDS, real-data quirks."""

import json
import logging
import pathlib
import pickle

import pytest

from flan_jax import data


def _write(path: pathlib.Path, text: str | bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path, records, extra=""):
    return _write(path, "".join(json.dumps(r) + "\n" for r in records) + extra)


# ---------------------------------------------------------------- JSONL


def test_jsonl_reads_records_maps_fields_and_ignores_blank_lines(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"q": "x", "a": "1", "id": 7}\n\n{"q": "y", "a": "2", "id": 8}\n')
    source = data.JsonlSource({"train": path}, field_map={"question": "q", "answer": "a"})
    assert list(source.records("train")) == [
        {"id": 7, "question": "x", "answer": "1"},
        {"id": 8, "question": "y", "answer": "2"},
    ]
    assert source.num_records("train") == 2 and source.splits == ("train",)


def test_source_loads_lazily_and_caches(tmp_path):
    path = tmp_path / "later.jsonl"
    source = data.JsonlSource({"train": path})  # the file does not exist yet: building is free
    _jsonl(path, [{"a": 1}])
    first = source.records("train")
    path.unlink()
    assert source.records("train") is first


def test_globs_and_data_dir_are_resolved_at_load_time(tmp_path, monkeypatch):
    _jsonl(tmp_path / "d" / "part-1.jsonl", [{"i": 1}])
    _jsonl(tmp_path / "d" / "part-0.jsonl", [{"i": 0}])
    source = data.JsonlSource({"train": "{data_dir}/d/part-*.jsonl"})
    monkeypatch.delenv("FLAN_JAX_DATA_DIR", raising=False)
    with pytest.raises(data.DataUnavailableError, match="FLAN_JAX_DATA_DIR"):
        source.records("train")
    monkeypatch.setenv("FLAN_JAX_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    assert [r["i"] for r in source.records("train")] == [0, 1]  # sorted file order


def test_missing_files_raise_data_unavailable(tmp_path):
    with pytest.raises(data.DataUnavailableError, match="file not found"):
        data.JsonlSource({"train": tmp_path / "nope.jsonl"}).records("train")
    with pytest.raises(data.DataUnavailableError, match="no file matches"):
        data.JsonlSource({"train": str(tmp_path / "nope-*.jsonl")}).records("train")


def test_malformed_json_line_error_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(data.DataError) as error:
        data.JsonlSource({"train": path}).records("train")
    assert f"{path}:2" in str(error.value) and "malformed JSON" in str(error.value)
    assert error.value.line == 2


def test_non_object_line_is_an_error(tmp_path):
    path = _write(tmp_path / "list.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(data.DataError, match=r"list.jsonl:2.*expected a JSON object"):
        data.JsonlSource({"train": path}).records("train")


def test_missing_mapped_field_error_names_file_record_and_field(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"q": "x", "a": "1"}, {"q": "y"}])
    with pytest.raises(data.DataError) as error:
        data.JsonlSource({"train": path}, field_map={"answer": "a"}).records("train")
    assert error.value.file == str(path) and error.value.line == 2 and error.value.record == 1
    assert error.value.field == "a" and "field 'a'" in str(error.value)


def test_undecodable_bytes_error_names_file_and_line(tmp_path):
    path = _write(tmp_path / "latin.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(data.DataError) as error:
        data.JsonlSource({"train": path}).records("train")
    assert error.value.line == 2 and "undecodable" in str(error.value)


def test_skip_mode_counts_and_logs_every_bad_record(tmp_path, caplog):
    path = _write(
        tmp_path / "mixed.jsonl",
        b'{"q": "ok1", "a": "1"}\n{"q": broken\n{"q": "caf\xe9", "a": "2"}\n{"q": "no answer"}\n{"q": "ok2", "a": "3"}\n',
    )
    source = data.JsonlSource({"train": path}, field_map={"answer": "a"}, on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        records = source.records("train")
    assert [r["q"] for r in records] == ["ok1", "ok2"]
    assert source.skipped == {"train": 3}
    assert "skipped 3 bad record(s)" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_default_bad_record_mode_is_configurable(tmp_path):
    path = _write(tmp_path / "b.jsonl", '{"a": 1}\nnot json\n')
    try:
        data.set_default_on_bad_record("skip")
        assert len(data.JsonlSource({"train": path}).records("train")) == 1
    finally:
        data.set_default_on_bad_record("error")
    with pytest.raises(data.DataError):
        data.JsonlSource({"train": path}).records("train")
    with pytest.raises(ValueError):
        data.set_default_on_bad_record("ignore")


def test_empty_file_is_an_error_by_default_and_a_warning_when_asked(tmp_path, caplog):
    empty = _write(tmp_path / "empty.jsonl", b"")
    full = _jsonl(tmp_path / "full.jsonl", [{"a": 1}])
    with pytest.raises(data.DataError, match=r"empty.jsonl.*no records.*on_empty='warn'"):
        data.JsonlSource({"train": empty}).records("train")
    source = data.JsonlSource({"train": [empty, full]}, on_empty="warn")
    with caplog.at_level(logging.WARNING):
        assert len(source.records("train")) == 1
    assert source.empty_files == [str(empty)] and "empty.jsonl" in caplog.text


# ---------------------------------------------------------------- JSON, TSV, CSV


def test_json_list_and_keyed_list(tmp_path):
    listed = _write(tmp_path / "l.json", json.dumps([{"x": 1}, {"x": 2}]))
    keyed = _write(tmp_path / "k.json", json.dumps({"meta": {}, "rows": [{"x": 3}]}))
    assert [r["x"] for r in data.JsonSource({"test": listed}).records("test")] == [1, 2]
    assert [r["x"] for r in data.JsonSource({"test": keyed}, records_key="rows").records("test")] == [3]
    with pytest.raises(data.DataError, match="records_key"):
        data.JsonSource({"test": keyed}).records("test")


def test_json_syntax_error_names_line(tmp_path):
    path = _write(tmp_path / "bad.json", '[\n{"x": 1},\n{"x": }\n]')
    with pytest.raises(data.DataError) as error:
        data.JsonSource({"test": path}).records("test")
    assert error.value.line == 3


def test_json_missing_field_names_record(tmp_path):
    path = _write(tmp_path / "m.json", json.dumps([{"x": 1}, {"y": 2}]))
    with pytest.raises(data.DataError) as error:
        data.JsonSource({"test": path}, field_map={"value": "x"}).records("test")
    assert error.value.record == 1 and error.value.field == "x"


def test_tsv_without_header_keeps_quotes_and_checks_column_count(tmp_path):
    path = _write(tmp_path / "cot.tsv", '"Quoted" claim?\\nOptions:\\n- yes\tyes\tbecause\nbroken\tline\n')
    source = data.TsvSource({"train": path}, columns=["question", "answer", "rationale"])
    with pytest.raises(data.DataError, match=r"cot.tsv:2.*expected 3 columns"):
        source.records("train")
    skipping = data.TsvSource({"train": path}, columns=["question", "answer", "rationale"], on_bad_record="skip")
    (record,) = skipping.records("train")
    assert record["question"].startswith('"Quoted" claim?\\n')
    assert data.UnescapeNewlines("question")(dict(record))["question"] == '"Quoted" claim?\nOptions:\n- yes'


def test_tsv_with_header_and_csv_with_quoting(tmp_path):
    tsv = _write(tmp_path / "h.tsv", "q\ta\nx\t1\n")
    assert list(data.TsvSource({"train": tsv}, header=True).records("train")) == [{"q": "x", "a": "1"}]
    csv_path = _write(tmp_path / "c.csv", 'name,text\nt1,"a, b"\nt2,"multi\nline"\n')
    rows = list(data.CsvSource({"train": csv_path}, header=True).records("train"))
    assert rows == [{"name": "t1", "text": "a, b"}, {"name": "t2", "text": "multi\nline"}]
    no_header = _write(tmp_path / "n.csv", "t1,x\n")
    assert list(data.CsvSource({"train": no_header}, columns=["a", "b"]).records("train")) == [{"a": "t1", "b": "x"}]
    with pytest.raises(ValueError, match="columns"):
        data.TsvSource({"train": tsv})


# ---------------------------------------------------------------- Python sources, reprs


def _make_records():
    return [{"i": i} for i in range(3)]


def test_function_and_in_memory_sources_have_deterministic_reprs():
    source = data.FunctionSource({"train": _make_records})
    assert list(source.records("train")) == _make_records()
    assert repr(source) == repr(data.FunctionSource({"train": _make_records}))
    assert "_make_records" in repr(source)
    one = data.InMemorySource({"train": [{"a": 1}]})
    assert repr(one) == repr(data.InMemorySource({"train": [{"a": 1}]}))
    assert repr(one) != repr(data.InMemorySource({"train": [{"a": 2}]}))
    assert repr(data.JsonlSource({"train": "x.jsonl"})) == "JsonlSource({'train': ('x.jsonl',)})"
    assert repr(source.records("train")).startswith("Records(")


def test_unknown_split_names_the_available_ones():
    with pytest.raises(data.DataError, match="available: train"):
        data.FunctionSource({"train": _make_records}).records("test")


def test_function_source_must_yield_dicts():
    with pytest.raises(data.DataError, match="not a dict"):
        data.FunctionSource({"train": lambda: [1]}).records("train")


# ---------------------------------------------------------------- instruction formats


def test_alpaca_prompt_completion_and_chat_formats():
    alpaca = data.AlpacaFormat()
    with_input = alpaca({"instruction": "Add.", "input": "2 3", "output": "5"})
    assert with_input["prompt"] == data.ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 3")
    assert with_input["prompt"].endswith("### Input:\n2 3\n\n### Response:\n") and with_input["response"] == "5"
    no_input = alpaca({"instruction": "Say hi {name}.", "input": "", "output": "hi"})
    assert no_input["prompt"] == data.ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "Say hi {name}.")

    completion = data.PromptCompletionFormat(strip_suffix="<|endoftext|>")({"prompt": "P", "completion": " yes<|endoftext|>\n"})
    assert completion["prompt"] == "P" and completion["response"] == " yes"

    chat = data.ChatFormat()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    record = chat({"messages": turns})
    assert record["prompt"] == "<|user|>\nhi\n<|assistant|>\n" and record["response"] == "hello"
    open_ended = chat({"messages": turns[:1]})
    assert open_ended["prompt"] == "<|user|>\nhi\n<|assistant|>\n" and open_ended["response"] == ""
    with pytest.raises(data.DataError, match="role"):
        chat({"messages": [{"role": "robot", "content": "x"}]})


def test_format_tasks_render_end_to_end(tmp_path):
    path = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "1 1", "output": "2"}])
    task = data.alpaca_task("src_alpaca", data.JsonlSource({"train": path}))
    example = task.get_dataset("train")[0]
    assert example["inputs"].startswith("Below is an instruction") and example["targets"] == "2"
    chat = data.chat_task("src_chat", data.InMemorySource({"train": [{"messages": [{"role": "user", "content": "q"}]}]}))
    assert chat.get_dataset("train")[0]["inputs"] == "<|user|>\nq\n<|assistant|>\n"


# ---------------------------------------------------------------- TFDS


try:  # optional dependency; the builder must be a module-level class so that datasets pickle
    import numpy as np
    import tensorflow_datasets as tfds
except ImportError:  # pragma: no cover
    tfds = None

if tfds is not None:

    class FlanJaxTinyQa(tfds.core.GeneratorBasedBuilder):
        """A 4 + 2 example text dataset, prepared locally in array_record format (no download)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text(), "label": np.int64}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"question": f"q{i} é", "answer": f"a{i}", "label": i}


@pytest.mark.skipif(tfds is None, reason="tensorflow_datasets is not installed")
def test_tfds_source_reads_a_locally_prepared_array_record_dataset(tmp_path):
    FlanJaxTinyQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = data.TfdsSource("flan_jax_tiny_qa", data_dir=tmp_path, field_map={"target": "answer"})
    assert set(source.splits) == {"train", "test"}
    records = sorted(source.records("train"), key=lambda r: r["label"])
    assert records[1] == {"question": "q1 é", "target": "a1", "label": 1}
    assert source.num_records("test") == 2
    assert repr(source) == repr(data.TfdsSource("flan_jax_tiny_qa", data_dir=tmp_path, field_map={"target": "answer"}))
    task = data.Task("src_tfds", source, [("{question}", "{target}")])
    assert {e["targets"] for e in task.get_dataset("train")} == {"a0", "a1", "a2", "a3"}
    clone = pickle.loads(pickle.dumps((task, task.get_dataset("train", seed=2))))  # grain workers pickle datasets
    assert clone[1][0] == task.get_dataset("train", seed=2)[0] and clone[0].num_examples("train") == 4
    with pytest.raises(data.DataUnavailableError, match="not prepared|not found"):
        data.TfdsSource("flan_jax_tiny_qa", data_dir=tmp_path / "elsewhere", splits=["train"]).records("train")


# ---------------------------------------------------------------- the shared real data


def test_real_t0_empty_files_are_reported_not_fatal(real_data_dir, caplog):
    empty = sorted(p for p in (real_data_dir / "t0").glob("*.jsonl") if p.stat().st_size == 0)
    assert len(empty) == 11 and all(p.name.startswith("trec_fine_grained_") for p in empty)
    with pytest.raises(data.DataError, match="no records"):
        data.JsonlSource({"train": empty[0]}).records("train")
    source = data.JsonlSource({"train": [str(p) for p in empty]}, on_empty="warn")
    with caplog.at_level(logging.WARNING):
        assert source.num_records("train") == 0
    assert len(source.empty_files) == 11


def test_real_t0_file_strips_endoftext(real_data_dir):
    path = real_data_dir / "t0" / "adversarial_qa_dbert_based_on.jsonl"
    task = data.prompt_completion_task("src_real_t0", data.JsonlSource({"train": path}), strip_suffix="<|endoftext|>")
    examples = [task.get_dataset("train", shuffle=False)[i] for i in range(20)]
    assert all("<|endoftext|>" not in e["targets"] and e["targets"] for e in examples)


def test_real_cot_tsv_decodes_escaped_newlines(real_data_dir):
    source = data.TsvSource({"train": real_data_dir / "flan_cot" / "creak_train.tsv"}, columns=["question", "answer", "rationale"])
    record = data.UnescapeNewlines("question", "rationale")(dict(source.records("train")[0]))
    assert "\\n" not in record["question"] and "\nOptions:\n- yes\n- no" in record["question"]
    assert record["answer"] in {"yes", "no"}


def test_carved_splits_are_deterministic_disjoint_and_point_at_the_original_line(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(f'{{"i": {i}}}\n' for i in range(10)))
    test = tmp_path / "test.jsonl"
    test.write_text('{"i": 100}\n')
    base = data.JsonlSource({"train": path, "test": test})
    carved = data.CarvedSplits(base, every=4)
    assert carved.splits == ("train", "validation", "test")  # other splits of the base pass through
    validation, train = carved.records("validation"), carved.records("train")
    assert [r["i"] for r in validation] == [0, 4, 8] and [r["i"] for r in train] == [1, 2, 3, 5, 6, 7, 9]
    assert [r["i"] for r in carved.records("test")] == [100]
    assert validation.where(1) == {"file": str(path), "line": 5, "record": 4}  # the line in all.jsonl
    assert train.where(0)["line"] == 2
    assert repr(carved) == f"CarvedSplits({base!r}, every=4, base_split='train')"  # grain checkpoints compare it
    again = data.CarvedSplits(data.JsonlSource({"train": path, "test": test}), every=4)
    assert [r["i"] for r in again.records("validation")] == [0, 4, 8]
    renamed = data.CarvedSplits(base, every=5, train_split="fit", validation_split="dev")
    assert renamed.splits == ("fit", "dev", "test") and len(renamed.records("dev")) == 2
    assert data.CarvedSplits(data.InMemorySource({"train": [{"i": 0}, {"i": 1}]}), every=2).in_memory
    with pytest.raises(ValueError, match="every must be >= 2"):
        data.CarvedSplits(base, every=1)
