"""Row checks: a malformed row is named by its index with the reason, then skipped or fatal.

`on_bad_row="stop"` raises `BadRowError` at the first bad row; `"skip"` logs every bad
row, drops it, logs a summary, and keeps every other row untouched (same order).
Indices are 0-based positions in the dataset as loaded (for a JSONL file: line
number minus one, blank lines excluded).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

from desktune.log import logger

ON_BAD_ROW = ("skip", "stop")
_ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_text(value) -> bool:
    return isinstance(value, str)


def _type(value) -> str:
    return type(value).__name__


def _check_alpaca(row: dict, **_) -> str | None:
    for field in ("instruction", "output"):
        value = row.get(field)
        if value is None:
            return f"missing field {field!r}"
        if not _is_text(value):
            return f"field {field!r} should be a string, got {_type(value)}"
        if not value.strip():
            return f"field {field!r} is empty"
    extra = row.get("input")
    if extra is not None and not _is_text(extra):
        return f"field 'input' should be a string, got {_type(extra)}"
    return None


def _check_turns(turns, role_key: str, text_key: str, role_of: Callable[[str], str | None]) -> str | None:
    if turns is None:
        return "missing conversation"
    if not isinstance(turns, list):
        return f"conversation should be a list of turns, got {_type(turns)}"
    if not turns:
        return "empty conversation"
    has_assistant = False
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {i} should be an object, got {_type(turn)}"
        for key in (role_key, text_key):
            if turn.get(key) is None:
                return f"turn {i} has no {key!r}"
        if not _is_text(turn[role_key]):
            return f"turn {i}: {role_key!r} should be a string, got {_type(turn[role_key])}"
        if not _is_text(turn[text_key]):
            return f"turn {i}: {text_key!r} should be a string, got {_type(turn[text_key])}"
        role = role_of(turn[role_key])
        if role is None:
            return f"turn {i}: unknown {role_key} {turn[role_key]!r}"
        has_assistant |= role == "assistant"
    if not has_assistant:
        return "conversation has no assistant turn to learn from"
    return None


def _check_sharegpt(row: dict, roles: dict[str, str] | None = None, **_) -> str | None:
    from desktune.data.formats import SHAREGPT_ROLES

    known = {**SHAREGPT_ROLES, **(roles or {})}
    return _check_turns(row.get("conversations"), "from", "value", lambda r: known.get(r.lower()))


def _check_messages(row: dict, **_) -> str | None:
    return _check_turns(row.get("messages"), "role", "content", lambda r: r if r in _ROLES else None)


def _check_text(row: dict, **_) -> str | None:
    value = row.get("text")
    if value is None:
        return "missing field 'text'"
    if not _is_text(value):
        return f"field 'text' should be a string, got {_type(value)}"
    if not value.strip():
        return "field 'text' is empty"
    return None


CHECKS = {"alpaca": _check_alpaca, "sharegpt": _check_sharegpt, "messages": _check_messages, "text": _check_text}


def find_bad_rows(rows: Iterable[dict], fmt: str, roles: dict[str, str] | None = None) -> Iterable[tuple[int, str]]:
    """(index, reason) for each malformed row, in order."""
    check = CHECKS[fmt]
    for index, row in enumerate(rows):
        reason = check(row, roles=roles)
        if reason is not None:
            yield index, reason


def apply_policy(
    dataset, problems: Iterable[tuple[int, str]], on_bad_row: str, row_ids: list[int] | None = None
):
    """Raise on the first problem ("stop") or drop every problem row and log it ("skip").

    `row_ids[i]` is the index reported for position i (the row's index in the dataset as
    loaded, when earlier checks already dropped rows).
    """
    from desktune.errors import BadRowError

    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    bad: dict[int, str] = {}
    for index, reason in problems:
        shown = row_ids[index] if row_ids is not None else index
        if on_bad_row == "stop":
            raise BadRowError(shown, reason)
        logger.warning("skipping row %d: %s", shown, reason)
        bad[index] = reason
    if not bad:
        return dataset
    reasons = Counter(re.sub(r"\d+", "N", reason) for reason in bad.values())
    logger.warning(
        "skipped %d of %d rows (%s); the other %d are kept",
        len(bad),
        len(dataset),
        ", ".join(f"{n}x {r}" for r, n in reasons.most_common()),
        len(dataset) - len(bad),
    )
    keep = [i for i in range(len(dataset)) if i not in bad]
    return dataset.select(keep) if hasattr(dataset, "select") else [dataset[i] for i in keep]


def check_dataset(dataset, fmt: str, on_bad_row: str = "stop", roles: dict[str, str] | None = None):
    """The dataset without its malformed rows (skip) or a `BadRowError` for the first one (stop)."""
    return apply_policy(dataset, find_bad_rows(dataset, fmt, roles), on_bad_row)


def kept_row_ids(n_rows: int, problems: Iterable[tuple[int, str]]) -> list[int]:
    """Indices that survive skipping `problems` (to report later problems by original index)."""
    bad = {index for index, _ in problems}
    return [i for i in range(n_rows) if i not in bad]


def check_lengths(
    dataset, lengths: Iterable[int], max_seq_length: int, on_bad_row: str = "stop", row_ids: list[int] | None = None
):
    """Rows whose tokenized length passes `max_seq_length`, as bad rows with their length."""
    problems = (
        (i, f"over-long example: {n} tokens, max_seq_length is {max_seq_length}")
        for i, n in enumerate(lengths)
        if n > max_seq_length
    )
    return apply_policy(dataset, problems, on_bad_row, row_ids)
