"""Loading training rows and bringing the common dataset shapes to one: chat messages.

Shapes users bring:
- Alpaca: `instruction`, optional `input`, `output` (optional `system`).
- ShareGPT: `conversations` = [{"from": "human"|"gpt"|"system"|..., "value": str}, ...].
- OpenAI: `messages` = [{"role": "user"|"assistant"|"system", "content": str}, ...].
- Plain text: `text` (trained on as is, no chat template).

Everything except plain text becomes a list of {"role", "content"} messages, which
the tokenizer's chat template renders. Rows are checked by `desktune.data.validate`
before they are converted, so the converters here assume well-formed rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

FORMATS = ("alpaca", "sharegpt", "messages", "text")

# ShareGPT speaker names seen in the wild -> OpenAI roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def load_rows(source: str | Path, split: str = "train", **load_kwargs: Any):
    """A `datasets.Dataset` from a JSONL/JSON/CSV/Parquet file, a folder of them, or a HF dataset id.

    A local path wins over a hub id of the same name. Extra keyword arguments go to
    `datasets.load_dataset` (e.g. `name=` for a hub dataset's configuration).
    """
    import datasets

    from desktune.errors import DatasetFormatError

    path = Path(source).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetFormatError(
                f"{path}: unknown data file type {path.suffix!r}; use one of "
                f"{', '.join(sorted(_FILE_BUILDERS))} or a Hugging Face dataset id"
            )
        return datasets.load_dataset(builder, data_files=str(path), split="train", **load_kwargs)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FILE_BUILDERS)
        builders = {_FILE_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) != 1:
            raise DatasetFormatError(
                f"{path}: a data folder must hold files of one type (.jsonl, .csv or .parquet); found "
                f"{sorted(p.name for p in files) or 'none'}"
            )
        return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train", **load_kwargs)
    if str(source).startswith((".", "/", "~")) or path.suffix.lower() in _FILE_BUILDERS:
        raise DatasetFormatError(f"{source}: no such file or folder")
    return datasets.load_dataset(str(source), split=split, **load_kwargs)


def detect_format(columns: Iterable[str]) -> str:
    """Which of FORMATS a dataset with these columns is; raises if none fits."""
    from desktune.errors import DatasetFormatError

    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise DatasetFormatError(
        f"cannot tell the dataset format from its columns {sorted(cols)}: expected `messages` (OpenAI), "
        "`conversations` (ShareGPT), `instruction`+`output` (Alpaca) or `text`; rename the columns or "
        "pass the format explicitly"
    )


def alpaca_to_messages(row: dict, system: str | None = None) -> list[dict[str, str]]:
    """One Alpaca row as a system?/user/assistant conversation; the input follows the instruction."""
    user = row["instruction"].strip()
    extra = (row.get("input") or "").strip()
    if extra:
        user = f"{user}\n\n{extra}"
    messages = []
    system = row.get("system") or system
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": row["output"]})
    return messages


def sharegpt_to_messages(conversation: list[dict], roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """ShareGPT turns ({"from", "value"}) as OpenAI messages ({"role", "content"})."""
    roles = {**SHAREGPT_ROLES, **(roles or {})}
    return [{"role": roles[turn["from"].lower()], "content": turn["value"]} for turn in conversation]


def row_to_messages(row: dict, fmt: str, system: str | None = None) -> list[dict[str, str]]:
    """The row as chat messages; `system` is the system prompt for rows that bring none."""
    if fmt == "alpaca":
        return alpaca_to_messages(row, system)
    if fmt == "sharegpt":
        messages = sharegpt_to_messages(row["conversations"])
    elif fmt == "messages":
        # extra per-turn fields (gpt-oss "thinking", Qwen3 "reasoning_content", ...) stay for the template
        messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
    else:
        raise ValueError(f"row_to_messages: format {fmt!r} has no messages (one of alpaca, sharegpt, messages)")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def standardize_sharegpt(dataset, roles: dict[str, str] | None = None, column: str = "conversations"):
    """ShareGPT `conversations` ({"from", "value"}) rewritten as {"role", "content"} turns, in place of the column.

    The Unsloth name: after it, `tokenizer.apply_chat_template(row["conversations"])` works.
    `roles` adds or overrides speaker names (e.g. {"narrator": "system"}).
    """
    from desktune.data.validate import check_dataset

    check_dataset(dataset, "sharegpt", on_bad_row="stop", roles=roles)
    return dataset.map(
        lambda row: {column: sharegpt_to_messages(row[column], roles)},
        desc="Standardizing ShareGPT turns",
    )


def standardize_data_formats(dataset, system: str | None = None, column: str = "conversations"):
    """Alpaca, ShareGPT or OpenAI rows -> one `conversations` column of {"role", "content"} turns.

    Plain `text` datasets are returned unchanged. Other columns are dropped, since
    every turn now lives in the conversation.
    """
    from desktune.data.validate import check_dataset

    fmt = detect_format(dataset.column_names)
    if fmt == "text":
        return dataset
    check_dataset(dataset, fmt, on_bad_row="stop")
    return dataset.map(
        lambda row: {column: row_to_messages(row, fmt, system)},
        remove_columns=[c for c in dataset.column_names if c != column],
        desc=f"Converting {fmt} rows to conversations",
    )
