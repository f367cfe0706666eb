"""From a file / dataset id / Dataset to rows SFTTrainer takes: `messages` or `text`.

load -> detect format -> drop or stop on malformed rows -> convert to chat messages ->
drop or stop on over-long rows (measured with the chat template, in tokens). Row
indices in every report are positions in the dataset as loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from desktune.data.formats import FORMATS, detect_format, load_rows, row_to_messages
from desktune.data.validate import apply_policy, check_lengths, find_bad_rows, kept_row_ids
from desktune.log import logger


def rendered_length(tokenizer, row: dict) -> int:
    """Tokens the row becomes in training (chat template for `messages`, plain tokenization for `text`)."""
    if "messages" in row:
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        return len(out["input_ids"])
    return len(tokenizer(row["text"])["input_ids"]) + 1  # TRL appends eos to plain text


def prepare_dataset(
    data,
    tokenizer=None,
    *,
    format: str = "auto",
    max_seq_length: int | None = None,
    on_bad_row: str = "stop",
    system: str | None = None,
    split: str = "train",
    max_rows: int | None = None,
    **load_kwargs: Any,
):
    """A `datasets.Dataset` with one column, `messages` (chat formats) or `text` (plain text).

    `data` is a path, a HF dataset id, or a `datasets.Dataset`. With `tokenizer` and
    `max_seq_length`, rows longer than `max_seq_length` tokens after the chat template are
    bad rows too (reported with their length). `on_bad_row` is "stop" (raise at the first
    bad row) or "skip" (log each, drop it, keep the rest).
    """
    dataset = load_rows(data, split=split, **load_kwargs) if isinstance(data, (str, Path)) else data
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    fmt = detect_format(dataset.column_names) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    n_loaded = len(dataset)

    problems = list(find_bad_rows(dataset, fmt))
    dataset = apply_policy(dataset, problems, on_bad_row)
    row_ids = kept_row_ids(n_loaded, problems)  # later checks report rows by their loaded index

    if fmt == "text":
        dataset = dataset.select_columns(["text"])
    else:
        dataset = dataset.map(
            lambda row: {"messages": row_to_messages(row, fmt, system)},
            remove_columns=dataset.column_names,
            desc=f"Converting {fmt} rows to chat messages",
        )

    if tokenizer is not None and max_seq_length is not None:
        lengths = [rendered_length(tokenizer, row) for row in dataset]
        dataset = check_lengths(dataset, lengths, max_seq_length, on_bad_row, row_ids)
    logger.info("dataset: %d rows (%s format), %d kept", n_loaded, fmt, len(dataset))
    return dataset


def apply_chat_template(dataset, tokenizer, column: str | None = None, text_column: str = "text"):
    """Render each conversation to a `text` column with the tokenizer's chat template.

    For the Unsloth-style recipe that trains on `text`. A leading bos is dropped from the
    rendered text when the tokenizer adds one itself, so rows do not start with two.
    """
    column = column or next((c for c in ("messages", "conversations") if c in dataset.column_names), None)
    if column is None:
        raise ValueError(f"apply_chat_template: no messages/conversations column in {dataset.column_names}")
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(row):
        text = tokenizer.apply_chat_template(row[column], tokenize=False)
        if adds_bos and text.startswith(bos):
            text = text[len(bos) :]
        return {text_column: text}

    return dataset.map(render, desc="Rendering chat template")
