"""Loading rows from files and converting Alpaca / ShareGPT / OpenAI / text rows."""

from __future__ import annotations

import json
import logging

import pytest

datasets = pytest.importorskip("datasets")

from desktune.data import (  # noqa: E402
    check_dataset,
    detect_format,
    load_rows,
    prepare_dataset,
    standardize_data_formats,
    standardize_sharegpt,
)
from desktune.errors import BadRowError, DatasetFormatError  # noqa: E402

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hello"},
            {"from": "gpt", "value": "Hi!"},
        ]
    }
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_load_rows_reads_each_file_type(tmp_path, suffix):
    ds = datasets.Dataset.from_list(ALPACA)
    path = tmp_path / f"data{suffix}"
    {".jsonl": ds.to_json, ".csv": ds.to_csv, ".parquet": ds.to_parquet}[suffix](str(path))
    loaded = load_rows(path)
    assert loaded.num_rows == 2
    assert loaded[0]["output"] == "5" and loaded[1]["instruction"] == "Say hi."


def test_load_rows_rejects_unknown_file_type_and_missing_path(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(DatasetFormatError, match=r"\.txt"):
        load_rows(bad)
    with pytest.raises(DatasetFormatError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["text"]) == "text"
    with pytest.raises(DatasetFormatError, match="question"):
        detect_format(["question", "answer"])


def test_standardize_sharegpt_maps_speakers_to_roles():
    ds = standardize_sharegpt(datasets.Dataset.from_list(SHAREGPT))
    assert ds[0]["conversations"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
    ]


def test_standardize_data_formats_alpaca_puts_input_after_instruction():
    ds = standardize_data_formats(datasets.Dataset.from_list(ALPACA))
    assert ds.column_names == ["conversations"]
    assert ds[0]["conversations"] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert ds[1]["conversations"][0] == {"role": "user", "content": "Say hi."}


BAD_ROWS = [
    ("alpaca", {"instruction": "x"}, "missing field 'output'"),
    ("alpaca", {"instruction": "x", "output": 3}, "should be a string, got int"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "field 'instruction' is empty"),
    ("sharegpt", {"conversations": []}, "empty conversation"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "unknown from 'alien'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ("messages", {"messages": [{"role": "user"}]}, "turn 0 has no 'content'"),
    ("messages", {"messages": "hello"}, "should be a list of turns, got str"),
    ("text", {"text": None}, "missing field 'text'"),
]


@pytest.mark.parametrize("fmt,row,reason", BAD_ROWS)
def test_bad_row_is_reported_with_index_and_reason(fmt, row, reason):
    good = {
        "alpaca": {"instruction": "a", "output": "b"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "text": {"text": "abc"},
    }[fmt]
    rows = [good, good, row, good]  # a plain list keeps the malformed types as they are
    with pytest.raises(BadRowError, match=reason) as err:
        check_dataset(rows, fmt, on_bad_row="stop")
    assert err.value.index == 2
    assert "row 2" in str(err.value) and "on_bad_row='skip'" in str(err.value)


def test_skip_drops_only_bad_rows_and_logs_each(caplog, tmp_path):
    rows = [
        {"instruction": "first", "output": "1"},
        {"instruction": "no output"},
        {"instruction": "third", "output": "3"},
        {"instruction": "", "output": "4"},
        {"instruction": "fifth", "output": "5"},
    ]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="desktune"):
        ds = prepare_dataset(path, on_bad_row="skip")
    assert [m[1]["content"] for m in ds["messages"]] == ["1", "3", "5"]
    assert [m[0]["content"] for m in ds["messages"]] == ["first", "third", "fifth"]
    text = caplog.text
    assert "skipping row 1: missing field 'output'" in text
    assert "skipping row 3: field 'instruction' is empty" in text
    assert "skipped 2 of 5 rows" in text


def test_over_long_rows_reported_by_original_index(tmp_path):
    from desktune.fixtures.tokenizer import make_tokenizer

    tok = make_tokenizer()
    rows = [
        {"instruction": "no output"},  # dropped first, so the indices below must not shift
        {"instruction": "short", "output": "ok"},
        {"instruction": "long " * 200, "output": "ok"},
        {"instruction": "short too", "output": "ok"},
    ]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    ds = prepare_dataset(path, tok, max_seq_length=64, on_bad_row="skip")
    assert [m[0]["content"] for m in ds["messages"]] == ["short", "short too"]
    with pytest.raises(BadRowError, match=r"row 2: over-long example: \d+ tokens, max_seq_length is 64"):
        prepare_dataset(datasets.Dataset.from_list([rows[1], rows[1], rows[2]]), tok, max_seq_length=64)


@pytest.mark.parametrize("rows", [ALPACA[:1], SHAREGPT, [{"messages": [{"role": "user", "content": "a"},
                                                                     {"role": "assistant", "content": "b"}]}]])
def test_default_system_prompt_only_where_a_row_has_none(rows):
    ds = prepare_dataset(datasets.Dataset.from_list(rows), system="Default.")
    first = ds[0]["messages"][0]
    want = "Be brief." if "conversations" in rows[0] else "Default."  # the ShareGPT row brings its own
    assert first == {"role": "system", "content": want}
