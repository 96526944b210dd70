"""Preference data: gzipped files, HH-RLHF and TRL formats, bad pairs, templates, synthetic pairs."""

from __future__ import annotations

import gzip
import json
import logging
import pathlib

import pytest

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax import data
from flan_jax.data import preference


def _gz(path: pathlib.Path, lines: list[bytes]) -> pathlib.Path:
    path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in lines)))
    return path


def _json(record) -> bytes:
    return json.dumps(record).encode()


def _pairs_task(path, name="pairs", **kwargs):
    return data.PreferenceTask(name, data.JsonlSource({"train": path}), **kwargs)


HH = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the cat sit?",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
}


# ---------------------------------------------------------------- .jsonl.gz


def test_gzipped_jsonl_reads_like_the_plain_file(tmp_path):
    records = [{"i": i, "text": f"line {i} ü"} for i in range(5)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    packed = _gz(tmp_path / "a.jsonl.gz", [_json(r) for r in records])
    from_gz = data.JsonlSource({"train": packed}).records("train")
    assert list(from_gz) == list(data.JsonlSource({"train": plain}).records("train")) == records
    assert from_gz.where(3) == {"file": str(packed), "line": 4, "record": 3}
    # Concatenated members (`cat a.gz b.gz`) are read one after another.
    double = tmp_path / "b.jsonl.gz"
    double.write_bytes(packed.read_bytes() + gzip.compress(_json({"i": 5}) + b"\n"))
    assert [r["i"] for r in data.JsonlSource({"train": double}).records("train")] == [0, 1, 2, 3, 4, 5]


def test_truncated_gz_raises_with_file_and_line_or_keeps_complete_lines_when_skipping(tmp_path, caplog):
    whole = gzip.compress(b"".join(_json({"i": i, "pad": "x" * 200}) + b"\n" for i in range(50)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(data.DataError, match=r"cut\.jsonl\.gz:\d+: truncated gzip file") as error:
        data.JsonlSource({"train": cut}).records("train")
    kept_lines = error.value.line - 1
    assert 0 < kept_lines < 50
    source = data.JsonlSource({"train": cut}, on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        records = source.records("train")
    assert [r["i"] for r in records] == list(range(kept_lines))  # the complete lines, nothing half-parsed
    assert source.skipped == {"train": 1} and "truncated gzip" in caplog.text


def test_non_utf8_line_in_gz_names_its_line_or_is_counted(tmp_path):
    path = _gz(tmp_path / "bad.jsonl.gz", [_json({"i": 0}), b'{"i": "\xff\xfe"}', _json({"i": 2})])
    with pytest.raises(data.DataError, match=r"bad\.jsonl\.gz:2: undecodable bytes"):
        data.JsonlSource({"train": path}).records("train")
    source = data.JsonlSource({"train": path}, on_bad_record="skip")
    assert [r["i"] for r in source.records("train")] == [0, 2] and source.skipped == {"train": 1}


def test_corrupt_gz_raises_naming_the_file(tmp_path):
    whole = bytearray(gzip.compress(b"".join(_json({"i": i}) + b"\n" for i in range(20))))
    whole[-8] ^= 0xFF  # the CRC
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(data.DataError, match=r"crc\.jsonl\.gz.*corrupt gzip data"):
        data.JsonlSource({"train": path}, on_bad_record="skip").records("train")


# ---------------------------------------------------------------- formats


def test_hh_rlhf_prompt_is_the_dialogue_up_to_the_last_assistant_turn(tmp_path):
    task = _pairs_task(_gz(tmp_path / "hh.jsonl.gz", [_json(HH)]), pair_format=data.HHRLHFFormat())
    pair = task.get_dataset("train")[0]
    assert pair["inputs"] == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    assert (pair["chosen"], pair["rejected"]) == (" Why did the cat sit?", " No.")
    assert pair["targets"] == pair["chosen"] and pair["references"] == [pair["chosen"]]
    assert pair["origin"].endswith("hh.jsonl.gz:1 (record 0)")


def test_hh_rlhf_pairs_with_different_prompts_are_counted_and_reported_not_dropped_silently(tmp_path, caplog):
    other = {"chosen": HH["chosen"], "rejected": "\n\nHuman: Bye\n\nAssistant: No."}
    path = _gz(tmp_path / "hh.jsonl.gz", [_json(HH), _json(other), _json(HH)])
    task = _pairs_task(path, pair_format=data.HHRLHFFormat())
    with caplog.at_level(logging.WARNING):
        assert task.num_examples("train") == 2
    assert task.pair_skips == {"train": {"prompt_mismatch": 1}} and task.filtered["train"] == 1
    assert "1 prompt mismatch" in caplog.text and "hh.jsonl.gz:2" in caplog.text
    strict = _pairs_task(path, name="strict", pair_format=data.HHRLHFFormat(), on_prompt_mismatch="error")
    with pytest.raises(data.DataError, match=r"hh\.jsonl\.gz:2, record 1, field 'rejected': the chosen and rejected"):
        strict.num_examples("train")


def test_trl_format_strings_messages_and_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "Sky color?"}
    records = [
        {"prompt": "Sky color?", "chosen": " Blue.", "rejected": " Green."},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Green."}]},
        {"chosen": [user, {"role": "assistant", "content": "Blue."}], "rejected": [user, {"role": "assistant", "content": "Green."}]},
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
    ]
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = _pairs_task(path, pair_format=data.TRLFormat())
    pairs = [task.get_dataset("train", shuffle=False)[i] for i in range(3)]
    assert (pairs[0]["inputs"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("Sky color?", " Blue.", " Green.")
    chat_prompt = "<|user|>\nSky color?\n<|assistant|>\n"
    for pair in pairs[1:]:
        assert (pair["inputs"], pair["chosen"], pair["rejected"]) == (chat_prompt, "Blue.", "Green.")
    assert task.pair_skips == {"train": {"prompt_mismatch": 1}}  # the last shares no opening turn


@pytest.mark.parametrize("record, reason, field", [
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty response", "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": "  \n"}, "empty response", "rejected"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical", "rejected"),
    ({"prompt": "p", "chosen": "c"}, "missing field", "rejected"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "expected text", "chosen"),
])
def test_bad_pairs_raise_naming_file_line_and_field_or_are_counted_when_skipping(tmp_path, record, reason, field):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path = _gz(tmp_path / "pairs.jsonl.gz", [_json(good), _json(record), _json(good)])
    with pytest.raises(data.DataError, match=rf"pairs\.jsonl\.gz:2, record 1, field '{field}': {reason}"):
        _pairs_task(path).num_examples("train")
    task = _pairs_task(path, on_bad_pair="skip")
    assert task.num_examples("train") == 2 and sum(task.pair_skips["train"].values()) == 1


def test_bad_pairs_follow_config_data_on_bad_record_by_default(tmp_path):
    path = _gz(tmp_path / "p.jsonl.gz", [_json({"prompt": "p", "chosen": "x", "rejected": "x"})])
    data.set_default_on_bad_record("skip")
    try:
        task = _pairs_task(path)
        assert task.num_examples("train") == 0 and task.pair_skips == {"train": {"identical_responses": 1}}
    finally:
        data.set_default_on_bad_record("error")


# ---------------------------------------------------------------- templates, tasks, mixtures


def test_templates_wrap_the_prompt_and_render_both_responses_alike(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "topic": "math"}) + "\n")
    task = _pairs_task(path, templates=[("[{topic}] Q: {prompt}\nA:", " {response}.")])
    pair = task.get_dataset("train")[0]
    assert (pair["inputs"], pair["chosen"], pair["rejected"]) == ("[math] Q: 2+2?\nA:", " 4.", " 5.")
    with pytest.raises(data.DataError, match="targets must place the response"):
        _pairs_task(path, name="x", templates=[("{prompt}", "{chosen}")])
    with pytest.raises(data.DataError, match="inputs must not contain"):
        _pairs_task(path, name="y", templates=[("{prompt} {response}", "{response}")])
    with pytest.raises(data.DataError, match="few-shot"):
        task.get_dataset("train", num_shots=2)
    copy = task.replace(name="pairs_copy")
    assert isinstance(copy, data.PreferenceTask) and copy.get_dataset("train")[0] == {**pair, "task": "pairs_copy"}


def test_preference_tasks_mix_and_split_like_any_task():
    mixture = data.get("synthetic_pairs_train")
    rates = mixture.rates()
    assert len(rates) == 15 and abs(sum(rates.values()) - 1) < 1e-9
    stream = mixture.get_dataset("train", seed=1)
    first = [stream[i] for i in range(40)]
    assert first == [mixture.get_dataset("train", seed=1)[i] for i in range(40)]  # deterministic
    assert len({e["task"] for e in first}) > 5 and all(e["chosen"] != e["rejected"] for e in first)


def test_synthetic_pairs_prefer_the_correct_answer_and_share_the_sft_splits():
    from flan_jax_tasks import synthetic, synthetic_families

    for family in synthetic_families.FAMILIES:
        task = data.get(f"synthetic_pairs.{family.name}")
        for split in ("train", "validation"):
            records = task.records(split)
            answers = synthetic._splits(family.name)[split]
            assert len(records) == len(answers)
            for record, original in zip(records, answers):
                assert record["chosen"] == original["answer"] and record["rejected"] != original["answer"]
    heldout = data.get("synthetic_pairs_eval_seen_heldout_templates").tasks
    assert len(heldout) == 15 and all(t.name.endswith(".heldout_templates") for t in heldout)
    assert {t.cluster for t in data.get("synthetic_pairs_eval_heldout_cluster").tasks} == {"extraction"}
    # The held-out wordings are those of the SFT tasks, with the answer replaced by the response.
    sft = data.get("synthetic.addition.heldout_templates").templates
    assert [t.inputs for t in data.get("synthetic_pairs.addition.heldout_templates").templates] == [t.inputs for t in sft]


def test_real_hh_rlhf_file_counts(real_data_dir):
    strict = data.get("hh_rlhf.harmless_base")
    with pytest.raises(data.DataError, match=r"harmless-base-test\.jsonl\.gz:87, record 86, field 'chosen': empty response"):
        strict.replace(name="hh_strict", on_bad_pair="error").num_examples("test")
    task = strict.replace(name="hh_skipping", on_bad_pair="skip")
    assert task.num_examples("test") == 2312 - 5 - 4
    assert task.pair_skips["test"] == {"prompt_mismatch": 5, "empty_response": 4}
    split = data.get("hh_rlhf.harmless_base.split").replace(name="hh_split_skipping", on_bad_pair="skip")
    assert split.num_examples("train") + split.num_examples("validation") == 2312 - 9
    assert preference.is_preference_task(split)
